package orchestrator

import (
	"errors"
	"fmt"
	"reflect"

	"github.com/etcdworker/orchestrator/internal/userfn"
)

// Sentinel errors. Every error returned by this package that has one of these
// causes matches it with the standard errors.Is, also through the wrappers of
// github.com/pingcap/errors.
var (
	// ErrEtcdTryAgain is returned by a DataPatch (or a SingleDataPatch's Func)
	// to abort the current commit. The worker keeps the pending patches and
	// runs them again once the state has moved on (a newer revision was
	// applied) or the next timer interval has passed.
	ErrEtcdTryAgain = errors.New("orchestrator: try again")

	// ErrEtcdIgnore is returned by a DataPatch (or a SingleDataPatch's Func) to
	// skip that one patch: what it changed, in place or not, is undone and no
	// other patch sees it; the other patches of its group still apply.
	ErrEtcdIgnore = errors.New("orchestrator: ignore patch")

	// ErrEtcdSkipGroup is returned by a DataPatch (or a SingleDataPatch's
	// Func) to skip its whole group: what the group's earlier patches changed
	// is undone, its later patches do not run, and the group writes nothing.
	// The other groups still apply. With a ReadDependency it makes a
	// conditional group: "write these keys only if that key still says so".
	ErrEtcdSkipGroup = errors.New("orchestrator: skip patch group")

	// ErrReactorFinished is returned by Reactor.Tick to stop the worker. The
	// patches left in the returned state are committed first, then Run
	// returns nil.
	ErrReactorFinished = errors.New("orchestrator: reactor finished")

	// ErrEtcdSessionDone is returned by Run when the session given to it has
	// lost its lease. Nothing is written after the worker notices.
	ErrEtcdSessionDone = errors.New("orchestrator: etcd session done")

	// ErrEtcdTxnSizeExceed is returned by Run when one patch group alone needs
	// more bytes than the transaction size limit (see WithTxnLimits). Nothing
	// of that group is written.
	ErrEtcdTxnSizeExceed = errors.New("orchestrator: patch group exceeds the etcd txn size limit")

	// ErrEtcdTxnOpsExceed is returned by Run when one patch group alone needs
	// more operations than the transaction op limit (see WithTxnLimits).
	// Nothing of that group is written.
	ErrEtcdTxnOpsExceed = errors.New("orchestrator: patch group exceeds the etcd txn op limit")

	// ErrNotOwner is returned by Run when the fencing key configured with
	// WithFencingKey no longer exists with the configured create revision.
	// The commit that found out wrote nothing.
	ErrNotOwner = errors.New("orchestrator: fencing key lost, not the owner any more")

	// ErrInvalidArgument is returned by NewEtcdWorker and Run for nil or
	// out-of-range arguments.
	ErrInvalidArgument = errors.New("orchestrator: invalid argument")

	// ErrKeyOutsidePrefix is returned by Run when a patch writes a key that is
	// not under the worker's prefix + "/" (or is in the reserved
	// "/__orchestrator/" area under it). Nothing of that commit is written.
	ErrKeyOutsidePrefix = errors.New("orchestrator: patch writes a key outside the worker's prefix")

	// ErrNotReady is returned by EtcdWorker.Ready when the worker cannot
	// serve a consistent, fresh state: it is not running, its initial load
	// is not done, its state is older than the staleness bound, or etcd is
	// not answering.
	ErrNotReady = errors.New("orchestrator: worker not ready")

	// ErrPanic is wrapped by the error Run returns when a user callback (Tick,
	// Update, Patch) panicked. The panic value and stack are in the message
	// and in the log.
	ErrPanic = userfn.ErrPanic

	// ErrEtcdUnavailable is returned by Run when etcd could not be reached for
	// longer than the limit set with WithMaxOutage.
	ErrEtcdUnavailable = errors.New("orchestrator: etcd unavailable for longer than the outage limit")

	// ErrWorkerRunning is returned by Run when the same EtcdWorker is already
	// running in another goroutine.
	ErrWorkerRunning = errors.New("orchestrator: worker is already running")

	// ErrCommitUnresolved is returned by Run when it had to stop (ctx done)
	// while the outcome of its last commit could not be determined because
	// etcd was unreachable. The commit may or may not have landed.
	ErrCommitUnresolved = errors.New("orchestrator: outcome of the last commit is unknown")

	// ErrEtcdRejected is wrapped by the error Run returns when etcd rejected
	// a request in a way that retrying cannot heal: permission denied,
	// authentication failed, invalid argument, a request or key too large, or
	// a closed client. The error also wraps etcd's own, so
	// errors.Is(err, rpctypes.ErrPermissionDenied) holds.
	ErrEtcdRejected = errors.New("orchestrator: request rejected by etcd")
)

// errKeyOutside returns an error matching ErrKeyOutsidePrefix for key.
func errKeyOutside(key, why string) error {
	return fmt.Errorf("%w: key %q %s", ErrKeyOutsidePrefix, key, why)
}

// isNil reports whether v is nil or an interface holding a nil pointer, map,
// slice, func or channel.
func isNil(v any) bool {
	if v == nil {
		return true
	}
	rv := reflect.ValueOf(v)
	switch rv.Kind() {
	case reflect.Pointer, reflect.Map, reflect.Slice, reflect.Func, reflect.Chan, reflect.Interface:
		return rv.IsNil()
	default:
		return false
	}
}
