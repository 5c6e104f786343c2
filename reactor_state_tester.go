package orchestrator

import (
	"errors"
	"testing"

	"github.com/etcdworker/orchestrator/util"
)

// ReactorStateTester drives a ReactorState without etcd, for unit tests of
// reactors and states. It keeps the key-value map the state should mirror,
// feeds changes to the state and applies the state's patches with the same
// rules as the worker: the groups of one flush all or nothing (a group that
// returns ErrEtcdTryAgain or another error aborts the whole flush), later
// groups see the writes of earlier ones, ErrEtcdIgnore skips one patch, and
// no-op writes are dropped. Failures are reported through testing.TB alone.
type ReactorStateTester struct {
	t         testing.TB
	state     ReactorState
	kvEntries map[util.EtcdKey][]byte
	values    map[util.EtcdKey][]byte
}

// NewReactorStateTester returns a tester for state, first loading
// initKVEntries into it with isInit = true (a failing Update fails t).
func NewReactorStateTester(t testing.TB, state ReactorState, initKVEntries map[string]string) *ReactorStateTester {
	t.Helper()
	if isNil(state) {
		t.Fatalf("NewReactorStateTester: nil state")
	}
	r := &ReactorStateTester{
		t:         t,
		state:     state,
		kvEntries: make(map[util.EtcdKey][]byte, len(initKVEntries)),
		values:    make(map[util.EtcdKey][]byte, len(initKVEntries)),
	}
	for k, v := range initKVEntries {
		key := util.NewEtcdKey(k)
		value := []byte(v)
		if err := state.Update(key, value, true); err != nil {
			t.Fatalf("NewReactorStateTester: Update(%q): %v", k, err)
		}
		r.set(key, value)
	}
	return r
}

func (r *ReactorStateTester) set(key util.EtcdKey, value []byte) {
	if value == nil {
		delete(r.kvEntries, key)
		delete(r.values, key)
		return
	}
	r.kvEntries[key] = value
	r.values[key] = value
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
		r.t.Fatalf("ReactorStateTester.Update(%q): %v", key, err)
	}
}

// ApplyPatches takes the state's pending patches and applies them as the
// worker commits one flush: every group is run first, each on the values
// left by the groups before it; then, only if all succeeded, every changed
// key is fed back to the state, group by group. When any group returns
// ErrEtcdTryAgain nothing of any group is applied and tryAgain is true;
// another error is returned with nothing applied either. Either way the
// patches are dropped (GetPatches cleared them).
func (r *ReactorStateTester) ApplyPatches() (tryAgain bool, err error) {
	view := newPatchView(func() map[util.EtcdKey][]byte { return r.values }, func(key util.EtcdKey) ([]byte, bool) {
		v, ok := r.kvEntries[key]
		return v, ok
	})
	groups := r.state.GetPatches()
	writes := make([]groupWrites, 0, len(groups))
	for _, group := range groups {
		gw, err := view.applyGroup(group)
		if err != nil {
			view.reset()
			if errors.Is(err, ErrEtcdTryAgain) {
				return true, nil
			}
			return false, err
		}
		writes = append(writes, gw)
	}
	view.reset()
	for _, gw := range writes {
		for _, w := range gw {
			if err := r.state.Update(w.key, w.value, false); err != nil {
				return false, err
			}
			r.set(w.key, w.value)
		}
	}
	return false, nil
}

// MustApplyPatches is ApplyPatches that fails the test on error or when a
// patch asks to try again.
func (r *ReactorStateTester) MustApplyPatches() {
	r.t.Helper()
	tryAgain, err := r.ApplyPatches()
	if err != nil {
		r.t.Fatalf("ReactorStateTester.ApplyPatches: %v", err)
	}
	if tryAgain {
		r.t.Fatalf("ReactorStateTester.ApplyPatches: a patch asked to try again")
	}
}

// KVEntries returns a copy of the key-value map the state should mirror.
func (r *ReactorStateTester) KVEntries() map[string]string {
	out := make(map[string]string, len(r.kvEntries))
	for k, v := range r.kvEntries {
		out[k.String()] = string(v)
	}
	return out
}
