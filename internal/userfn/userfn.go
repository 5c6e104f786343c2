// Package userfn is the one owner of calls into user code for the packages
// of this module: the worker's calls into a Reactor, a ReactorState or a
// DataPatch, and the leader package's calls into its NewWorkerFunc and
// callbacks. A panic in user code becomes an error matching ErrPanic that
// names where it happened and carries the stack; an error user code returns
// goes on as it is (the caller wraps it and says which call it was).
package userfn

import (
	"errors"
	"fmt"
	"runtime/debug"
)

// ErrPanic is wrapped by the error Call returns when fn panicked. The root
// package exports it as orchestrator.ErrPanic.
var ErrPanic = errors.New("orchestrator: panic in user callback")

// Call runs fn, a call into user code named where, and turns a panic in it
// into an error matching ErrPanic.
func Call[T any](where string, fn func() (T, error)) (out T, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("%w: %s: %v\n%s", ErrPanic, where, p, debug.Stack())
		}
	}()
	return fn()
}

// Do runs fn, a call into user code named where that returns nothing, and
// turns a panic in it into an error matching ErrPanic.
func Do(where string, fn func()) error {
	_, err := Call(where, func() (struct{}, error) {
		fn()
		return struct{}{}, nil
	})
	return err
}
