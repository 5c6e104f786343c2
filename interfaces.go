package orchestrator

import (
	"context"

	"github.com/etcdworker/orchestrator/util"
)

// Reactor is the user's controller logic. The EtcdWorker calls Tick from one
// goroutine only; Tick never runs concurrently with itself or with
// ReactorState.Update.
type Reactor interface {
	// Tick is called with a ReactorState that is a consistent snapshot of
	// every key under the worker's prefix at one etcd revision: every event of
	// that revision and of all earlier ones has been applied, none of a later
	// one. The snapshot includes the worker's own last commit.
	//
	// Tick leaves the changes it wants in the state as DataPatch groups (see
	// ReactorState.GetPatches) and returns the state to use from now on
	// (usually the same one). The worker commits the patches before it calls
	// Tick again.
	//
	// Returning ErrReactorFinished (possibly wrapped) makes the worker commit
	// the patches of the returned state and then stop: Run returns nil. Any
	// other error stops the worker without committing and Run returns it,
	// wrapped. A panic is recovered and returned as an error wrapping ErrPanic.
	Tick(ctx context.Context, state ReactorState) (nextState ReactorState, err error)
}

// ReactorState is the user's in-memory model of the keys under the worker's
// prefix. The worker feeds it every change it sees and collects the patches
// the reactor leaves in it.
type ReactorState interface {
	// Update applies one key change. value == nil means the key was deleted;
	// a key put with an empty value arrives as a non-nil, zero-length slice.
	// isInit is true while the initial snapshot (or a full reload) is loaded.
	//
	// A full reload happens when the worker's watch revision was compacted
	// (for example after an outage): the prefix is read again at one
	// revision and only the differences are passed, all with isInit = true:
	// changed or new keys with their value, vanished keys with nil.
	//
	// The value slice is shared with the worker and must not be modified;
	// keeping a reference to it is fine. An error stops the worker and Run
	// returns it, wrapped.
	Update(key util.EtcdKey, value []byte, isInit bool) error

	// GetPatches returns the pending patches and clears them. Each inner
	// slice is a group that commits atomically (all or nothing).
	GetPatches() [][]DataPatch
}

// DataPatch is one change to the state, as a function of the current values.
type DataPatch interface {
	// Patch mutates valueMap (nil value or a deleted entry = key absent) and
	// records every key it touched in changedSet. It must be pure: it may run
	// more than once, on different states, and only its effect on valueMap
	// counts. Returning ErrEtcdIgnore skips this patch; ErrEtcdTryAgain
	// aborts the commit and retries on a newer state; any other error stops
	// the worker.
	//
	// valueMap holds every key under the worker's prefix; the worker restores
	// the keys recorded in changedSet after the commit (also when the patch
	// fails), so a patch must record every key it modifies before it returns,
	// error or not, and must not keep a reference to the map.
	//
	// Returning ErrEtcdSkipGroup drops the patch's whole group. The group's
	// commit compares only the keys it writes, plus the keys and ranges
	// declared with ReadDependency and ReadRangeDependency patches in the
	// group: a decision that depends on other keys must declare them, or a
	// concurrent change to them goes unnoticed.
	//
	// The values in valueMap are copies owned by the patches: a patch may
	// edit their bytes in place (and record the key). Neither the worker's
	// copy of the state nor the ReactorState changes because of it, and a
	// group that runs again (after a conflict or ErrEtcdTryAgain) starts from
	// the committed values.
	//
	// A patch never changes what another patch, a retry or a later flush
	// sees, unless its change is accepted: the keys it recorded are put back
	// when it returns an error (ErrEtcdIgnore, ErrEtcdSkipGroup and
	// ErrEtcdTryAgain included), when its group is skipped and when the
	// group's Txn does not land; and a value it puts into valueMap is copied
	// when it returns, so it may keep and reuse that slice.
	Patch(valueMap map[util.EtcdKey][]byte, changedSet map[util.EtcdKey]struct{}) error
}

// ReactorFunc adapts a function to Reactor.
type ReactorFunc func(ctx context.Context, state ReactorState) (ReactorState, error)

// Tick calls f(ctx, state).
func (f ReactorFunc) Tick(ctx context.Context, state ReactorState) (ReactorState, error) {
	return f(ctx, state)
}

var _ Reactor = ReactorFunc(nil)

// ScopedState is an optional interface of a ReactorState that only holds the
// keys of some part of etcd (a prefix, a single key). NewEtcdWorker calls
// CheckScope with the worker's prefix and fails with its error, wrapped in
// ErrInvalidArgument: a state whose keys all lie outside the worker's
// prefix + "/" would otherwise load nothing, silently. The jsonstate
// package's states implement it.
type ScopedState interface {
	CheckScope(workerPrefix util.EtcdPrefix) error
}

// SizedState is an optional interface of a ReactorState that is cheaper to
// fill when it knows its size in advance, such as one that keeps its keys in
// a map it can make with a capacity: a map filled one key at a time grows by
// doubling, which at a million keys costs a noticeable part of the load.
//
// Before a load fills an empty state (the first load of a worker, and a
// reload after every key the state held vanished) the worker calls
// ExpectKeys once with the number of keys under its prefix at the revision
// it loads, on the goroutine that calls Update, before the load's first
// Update. It is a hint: the number includes the worker's own bookkeeping
// keys, and when the count cannot be read the call is skipped. A panic in it
// ends Run with an error wrapping ErrPanic.
type SizedState interface {
	ExpectKeys(n int)
}

// InScope reports whether key lies under workerPrefix + "/" (that key
// itself included), where a worker on workerPrefix sees it: not in a
// worker's reserved area (a path segment "__orchestrator" below the
// prefix), whose keys never reach a state. It helps implement ScopedState.
func InScope(workerPrefix util.EtcdPrefix, key string) bool {
	return newKeyspace(workerPrefix).visible(key)
}
