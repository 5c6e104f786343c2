package orchestrator

import "github.com/etcdworker/orchestrator/internal/userfn"

// guard runs fn, a call into user code, and turns a panic in it into an
// error matching ErrPanic that names where it happened and carries the
// stack (userfn.Call, which the leader package uses too). Every call the
// worker makes into a Reactor, a ReactorState or a DataPatch goes through
// it, so user code never crashes the process.
//
// guard is the one owner of "from user code": an error user code returns
// goes on as it is (its caller wraps it with %w and says which call it was),
// a panic becomes ErrPanic, and no error type marks an error as the user's,
// since nothing after guard needs to tell. The two wrapper types of the
// package mean other things: rangeCallbackError says that an error came from
// readRange's callback (the follower's own code) rather than from etcd, and
// runFailure that Run ended with a failure while its ctx was live, not with
// a stop.
func guard[T any](where string, fn func() (T, error)) (T, error) { return userfn.Call(where, fn) }
