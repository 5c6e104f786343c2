package jsonstate

import (
	"errors"
	"fmt"
)

// ErrDecode is matched (errors.Is) by every *DecodeError: a value under the
// state's prefix or key could not be decoded into the document type.
var ErrDecode = errors.New("jsonstate: cannot decode document")

// DecodeError reports a value that could not be decoded. It matches ErrDecode
// and, through errors.As, the decoder's own error (e.g. *json.SyntaxError).
type DecodeError struct {
	// Key is the full etcd key of the document.
	Key string
	// Err is the decoder's error.
	Err error
}

// Error implements error.
func (e *DecodeError) Error() string {
	return fmt.Sprintf("jsonstate: cannot decode %q: %v", e.Key, e.Err)
}

// Unwrap returns ErrDecode and the decoder's error.
func (e *DecodeError) Unwrap() []error { return []error{ErrDecode, e.Err} }

// ErrOutOfScope is matched (errors.Is) by the error NewEtcdWorker returns for
// a State or Doc whose keys lie outside the worker's prefix: the worker would
// never show it a key.
var ErrOutOfScope = errors.New("jsonstate: keys outside the worker's prefix")

// ErrEmptyName is matched (errors.Is) by the error of a State's write to
// the document named "" (Put, Patch, Delete and their Ops): a State ignores
// the key prefix + "/" itself, so it could never read that document back.
// The error also matches orchestrator.ErrInvalidArgument; the commit writes
// nothing.
var ErrEmptyName = errors.New("jsonstate: empty document name")
