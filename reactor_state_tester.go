package orchestrator

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator/util"
)

// ReactorStateTester drives a ReactorState without etcd, for unit tests of
// reactors and states. It keeps the key-value map the state should mirror,
// feeds changes to the state and applies the state's patches with the same
// rules as the worker: each group atomically, ErrEtcdIgnore skips one patch,
// no-op writes are dropped.
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
	require.NotNil(t, state, "NewReactorStateTester: nil state")
	r := &ReactorStateTester{
		t:         t,
		state:     state,
		kvEntries: make(map[util.EtcdKey][]byte, len(initKVEntries)),
		values:    make(map[util.EtcdKey][]byte, len(initKVEntries)),
	}
	for k, v := range initKVEntries {
		key := util.NewEtcdKey(k)
		value := []byte(v)
		require.NoError(t, state.Update(key, value, true), "NewReactorStateTester: Update(%q)", k)
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
	require.NoError(r.t, r.Update(key, value), "ReactorStateTester.Update(%q)", key)
}

// ApplyPatches takes the state's pending patches and applies them group by
// group, feeding every changed key back to the state. It stops at the first
// group that returns ErrEtcdTryAgain (tryAgain = true; the rest of the
// patches are dropped, as GetPatches cleared them) or another error.
func (r *ReactorStateTester) ApplyPatches() (tryAgain bool, err error) {
	committed := func(key util.EtcdKey) ([]byte, bool) {
		v, ok := r.kvEntries[key]
		return v, ok
	}
	for _, group := range r.state.GetPatches() {
		view := newPatchView(func() map[util.EtcdKey][]byte { return r.values }, committed)
		writes, err := view.applyGroup(group)
		view.reset()
		if err != nil {
			if errors.Is(err, ErrEtcdTryAgain) {
				return true, nil
			}
			return false, err
		}
		for _, w := range writes {
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
	require.NoError(r.t, err, "ReactorStateTester.ApplyPatches")
	require.False(r.t, tryAgain, "ReactorStateTester.ApplyPatches: a patch asked to try again")
}

// KVEntries returns a copy of the key-value map the state should mirror.
func (r *ReactorStateTester) KVEntries() map[string]string {
	out := make(map[string]string, len(r.kvEntries))
	for k, v := range r.kvEntries {
		out[k.String()] = string(v)
	}
	return out
}
