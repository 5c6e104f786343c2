package orchestrator

import (
	"fmt"
	"runtime/debug"
)

// guard runs fn, a call into user code, and turns a panic in it into an
// error matching ErrPanic that names where it happened and carries the
// stack. Every call the worker makes into a Reactor, a ReactorState or a
// DataPatch goes through it, so user code never crashes the process.
func guard[T any](where string, fn func() (T, error)) (out T, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("%w: %s: %v\n%s", ErrPanic, where, p, debug.Stack())
		}
	}()
	return fn()
}
