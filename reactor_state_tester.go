package orchestrator

import (
	"errors"
	"testing"

	"github.com/etcdworker/orchestrator/util"
)

// ReactorStateTester drives a ReactorState without etcd, for unit tests of
// reactors and states. It keeps the key-value map the state should mirror,
// feeds changes to the state and applies the state's patches with the same
// rules as the worker: each group atomically, ErrEtcdIgnore skips one patch,
// no-op writes are dropped, patches get copies of the values (an edit a
// patch does not report is seen by nothing), the state gets values of its
// own, never a slice a patch returned or put, a patch returning
// ErrEtcdTryAgain aborts the whole flush (no group of it is applied), and a
// write to a key in a reserved area ("/__orchestrator/" at any depth) fails
// the flush with ErrKeyOutsidePrefix. It knows no prefix, so it cannot
// refuse a key outside one as the worker does. It reports failures through
// testing.TB alone.
type ReactorStateTester struct {
	t      testing.TB
	state  ReactorState
	mirror *mirror
	ks     keyspace // the whole keyspace: the tester knows no prefix
}

// NewReactorStateTester returns a tester for state, first loading
// initKVEntries into it with isInit = true (a failing Update fails t).
func NewReactorStateTester(t testing.TB, state ReactorState, initKVEntries map[string]string) *ReactorStateTester {
	t.Helper()
	if isNil(state) {
		t.Errorf("NewReactorStateTester: nil state")
		t.FailNow()
		return nil
	}
	root := util.NormalizePrefix("")
	r := &ReactorStateTester{t: t, state: state, mirror: newMirror(root), ks: newKeyspace(root)}
	for k, v := range initKVEntries {
		key := util.NewEtcdKey(k)
		value := []byte(v)
		if err := state.Update(key, value, true); err != nil {
			t.Errorf("NewReactorStateTester: Update(%q): %v", k, err)
			t.FailNow()
		}
		r.set(key, value)
	}
	return r
}

func (r *ReactorStateTester) set(key util.EtcdKey, value []byte) {
	_, held := r.mirror.entry(key)
	if value == nil && !held {
		return
	}
	r.mirror.set(keyChange{key: key, value: value, created: !held})
	r.mirror.settle()
}

// Update feeds one change to the state (value == nil deletes the key) and
// records it in the tester's map when the state accepts it.
func (r *ReactorStateTester) Update(key string, value []byte) error {
	k := util.NewEtcdKey(key)
	if err := r.state.Update(k, value, false); err != nil {
		return err
	}
	r.set(k, value)
	return nil
}

// MustUpdate is Update that fails the test on error.
func (r *ReactorStateTester) MustUpdate(key string, value []byte) {
	r.t.Helper()
	if err := r.Update(key, value); err != nil {
		r.t.Errorf("ReactorStateTester.Update(%q): %v", key, err)
		r.t.FailNow()
	}
}

// ApplyPatches takes the state's pending patches, runs every group in order
// and feeds every changed key back to the state. Like the worker, it first
// runs all groups and applies nothing when a patch returns ErrEtcdTryAgain
// (tryAgain = true; the patches are dropped, as GetPatches cleared them) or
// another error.
func (r *ReactorStateTester) ApplyPatches() (tryAgain bool, err error) {
	view := newPatchView(r.mirror)
	defer view.reset()
	var all []groupWrites
	for _, group := range r.state.GetPatches() {
		writes, err := view.applyGroup(group)
		if errors.Is(err, ErrEtcdTryAgain) {
			return true, nil // view.reset undoes what the patches changed
		}
		// A worker on any prefix refuses a key in a reserved area.
		for i := 0; err == nil && i < len(writes); i++ {
			err = r.ks.notReserved(writes[i].key.String())
		}
		if err != nil {
			return false, err
		}
		all = append(all, writes)
	}
	view.reset()
	for _, writes := range all {
		for _, w := range writes {
			// The worker's state gets etcd's bytes: never the slice a
			// SingleDataPatch's Func returned (and may reuse).
			value := optValue{value: w.value, present: w.value != nil}.clone().value
			if err := r.state.Update(w.key, value, false); err != nil {
				return false, err
			}
			r.set(w.key, value)
		}
	}
	return false, nil
}

// MustApplyPatches is ApplyPatches that fails the test on error or when a
// patch asks to try again.
func (r *ReactorStateTester) MustApplyPatches() {
	r.t.Helper()
	tryAgain, err := r.ApplyPatches()
	switch {
	case err != nil:
		r.t.Errorf("ReactorStateTester.ApplyPatches: %v", err)
		r.t.FailNow()
	case tryAgain:
		r.t.Errorf("ReactorStateTester.ApplyPatches: a patch asked to try again")
		r.t.FailNow()
	}
}

// KVEntries returns a copy of the key-value map the state should mirror.
func (r *ReactorStateTester) KVEntries() map[string]string {
	out := make(map[string]string, r.mirror.len())
	r.mirror.each(func(k util.EtcdKey, e kvEntry) { out[k.String()] = string(e.value) })
	return out
}
