package orchestrator

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/util"
)

// ptKey is the key "/p/<name>".
func ptKey(name string) util.EtcdKey { return util.NewEtcdKey("/p/" + name) }

// ptFixture is a patchView over a live map, with the committed map it must
// go back to. lookups records the keys the view asked committed for while
// recording is on.
type ptFixture struct {
	committed map[util.EtcdKey][]byte
	live      map[util.EtcdKey][]byte
	view      *patchView
	recording bool
	lookups   []util.EtcdKey
}

// newPTFixture builds committed and live maps from kv (both holding the same
// slices, as the worker's do).
func newPTFixture(kv map[string]string) *ptFixture {
	f := &ptFixture{committed: map[util.EtcdKey][]byte{}, live: map[util.EtcdKey][]byte{}}
	for k, v := range kv {
		b := []byte(v)
		f.committed[ptKey(k)] = b
		f.live[ptKey(k)] = b
	}
	f.view = newPatchView(f)
	return f
}

// value implements committedValues, recording the lookup.
func (f *ptFixture) value(key util.EtcdKey) ([]byte, bool) {
	if f.recording {
		f.lookups = append(f.lookups, key)
	}
	v, ok := f.committed[key]
	return v, ok
}

// valueMap implements committedValues.
func (f *ptFixture) valueMap() map[util.EtcdKey][]byte { return f.live }

// requireLiveEqualsCommitted checks the live map holds exactly the committed
// keys and values (telling nil from empty).
func (f *ptFixture) requireLiveEqualsCommitted(t testing.TB) {
	t.Helper()
	require.Equal(t, f.committed, f.live)
}

// viewValues is what the view shows: the committed values with every change
// accepted in the flush applied. (A SingleDataPatch does not touch the live
// map, so this is where its writes show until reset.)
func (f *ptFixture) viewValues() map[util.EtcdKey][]byte {
	out := map[util.EtcdKey][]byte{}
	for k, v := range f.committed {
		out[k] = v
	}
	for k, o := range f.view.accepted {
		if o.present {
			out[k] = o.value
		} else {
			delete(out, k)
		}
	}
	return out
}

// requireLive checks the view shows exactly kv, and that the live map, once
// a general DataPatch made the view use it, agrees.
func (f *ptFixture) requireLive(t testing.TB, kv map[string]string) {
	t.Helper()
	want := map[util.EtcdKey][]byte{}
	for k, v := range kv {
		want[ptKey(k)] = []byte(v)
	}
	require.Equal(t, want, f.viewValues())
	if f.view.values != nil {
		require.Equal(t, want, f.live)
	}
}

// ptPut and ptDel are the expected writes.
func ptPut(key, value string) keyWrite { return keyWrite{key: ptKey(key), value: []byte(value)} }
func ptDel(key string) keyWrite        { return keyWrite{key: ptKey(key)} }

// singleDataPatchCase is one case of TestSingleDataPatchSemantics.
type singleDataPatchCase struct {
	name      string
	present   bool   // whether "k" exists before the patch
	old       string // its value when present
	fn        func(old []byte) ([]byte, bool, error)
	wantErr   error
	wantWrite *keyWrite // nil: no write
}

// singleDataPatchCases returns the cases of TestSingleDataPatchSemantics.
func singleDataPatchCases() []singleDataPatchCase {
	errBoom := errors.New("boom")
	return []singleDataPatchCase{
		{name: "nil Func", present: true, old: "v", fn: nil, wantErr: ErrInvalidArgument},
		{
			name: "changed=false writes nothing", present: true, old: "v",
			fn: func([]byte) ([]byte, bool, error) { return []byte("other"), false, nil },
		},
		{
			name: "changed=false on an absent key writes nothing",
			fn:   func([]byte) ([]byte, bool, error) { return []byte("other"), false, nil },
		},
		{
			name: "nil with changed deletes", present: true, old: "v",
			fn:        func([]byte) ([]byte, bool, error) { return nil, true, nil },
			wantWrite: &keyWrite{key: ptKey("k")},
		},
		{
			name: "deleting an absent key writes nothing",
			fn:   func([]byte) ([]byte, bool, error) { return nil, true, nil },
		},
		{
			name: "empty slice writes an empty value", present: true, old: "v",
			fn:        func([]byte) ([]byte, bool, error) { return []byte{}, true, nil },
			wantWrite: &keyWrite{key: ptKey("k"), value: []byte{}},
		},
		{
			name:      "empty slice creates an absent key",
			fn:        func([]byte) ([]byte, bool, error) { return []byte{}, true, nil },
			wantWrite: &keyWrite{key: ptKey("k"), value: []byte{}},
		},
		{
			name: "empty slice on an empty value writes nothing", present: true, old: "",
			fn: func([]byte) ([]byte, bool, error) { return []byte{}, true, nil },
		},
		{
			name: "delete of an empty value", present: true, old: "",
			fn:        func([]byte) ([]byte, bool, error) { return nil, true, nil },
			wantWrite: &keyWrite{key: ptKey("k")},
		},
		{
			name: "value equal to the current one writes nothing", present: true, old: "v",
			fn: func([]byte) ([]byte, bool, error) { return []byte("v"), true, nil },
		},
		{
			name: "new value is written", present: true, old: "v",
			fn:        func([]byte) ([]byte, bool, error) { return []byte("w"), true, nil },
			wantWrite: &keyWrite{key: ptKey("k"), value: []byte("w")},
		},
		{
			name:      "absent key is created",
			fn:        func([]byte) ([]byte, bool, error) { return []byte("w"), true, nil },
			wantWrite: &keyWrite{key: ptKey("k"), value: []byte("w")},
		},
		{
			name: "error is returned and nothing changes", present: true, old: "v",
			fn:      func([]byte) ([]byte, bool, error) { return []byte("w"), true, fmt.Errorf("wrapped: %w", errBoom) },
			wantErr: errBoom,
		},
		{
			name: "ErrEtcdIgnore skips the patch", present: true, old: "v",
			fn: func([]byte) ([]byte, bool, error) { return []byte("w"), true, ErrEtcdIgnore },
		},
		{
			name: "ErrEtcdTryAgain is returned", present: true, old: "v",
			fn:      func([]byte) ([]byte, bool, error) { return nil, true, fmt.Errorf("later: %w", ErrEtcdTryAgain) },
			wantErr: ErrEtcdTryAgain,
		},
	}
}

func TestSingleDataPatchSemantics(t *testing.T) {
	t.Parallel()
	tests := singleDataPatchCases()
	for _, tt := range tests {
		for _, pointer := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/pointer=%v", tt.name, pointer), func(t *testing.T) {
				kv := map[string]string{"other": "o"}
				if tt.present {
					kv["k"] = tt.old
				}
				f := newPTFixture(kv)
				var seen []byte
				calls := 0
				var fn func([]byte) ([]byte, bool, error)
				if tt.fn != nil {
					fn = func(old []byte) ([]byte, bool, error) {
						calls++
						seen = old
						return tt.fn(old)
					}
				}
				var p DataPatch = SingleDataPatch{Key: ptKey("k"), Func: fn}
				if pointer {
					p = &SingleDataPatch{Key: ptKey("k"), Func: fn}
				}
				writes, err := f.view.applyGroup([]DataPatch{p})
				if tt.fn != nil {
					require.Equal(t, 1, calls)
					// Func sees nil for an absent key, a non-nil slice for a
					// present one (even an empty one).
					require.Equal(t, tt.present, seen != nil)
					require.Equal(t, tt.old, string(seen))
				}
				if tt.wantErr != nil {
					require.ErrorIs(t, err, tt.wantErr)
					f.view.reset()
					f.requireLiveEqualsCommitted(t)
					return
				}
				require.NoError(t, err)
				if tt.wantWrite == nil {
					require.Empty(t, writes)
				} else {
					requireSameWrites(t, []keyWrite{*tt.wantWrite}, writes)
					// The view shows the write until reset.
					v, ok := f.viewValues()[ptKey("k")]
					require.Equal(t, tt.wantWrite.value != nil, ok)
					require.True(t, bytes.Equal(tt.wantWrite.value, v))
					if ok {
						require.NotNil(t, v)
					}
				}
				f.view.reset()
				f.requireLiveEqualsCommitted(t)
			})
		}
	}
}

func TestSingleDataPatchChangedSet(t *testing.T) {
	t.Parallel()
	values := map[util.EtcdKey][]byte{ptKey("k"): []byte("v")}
	changed := map[util.EtcdKey]struct{}{}
	p := SingleDataPatch{Key: ptKey("k"), Func: func(old []byte) ([]byte, bool, error) { return old, false, nil }}
	require.NoError(t, p.Patch(values, changed))
	require.Empty(t, changed, "changed=false must not record the key")

	p.Func = func([]byte) ([]byte, bool, error) { return nil, true, nil }
	require.NoError(t, p.Patch(values, changed))
	require.Equal(t, map[util.EtcdKey]struct{}{ptKey("k"): {}}, changed)
	require.NotContains(t, values, ptKey("k"))

	err := SingleDataPatch{Key: ptKey("k")}.Patch(values, changed)
	require.ErrorIs(t, err, ErrInvalidArgument)
	require.Contains(t, err.Error(), "/p/k")
}

func TestPatchViewSameKeyTwice(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		group []DataPatch
		want  []keyWrite
		live  map[string]string // live map after the group (before reset)
	}{
		{"two sets: one write with the final value", []DataPatch{setPatch(ptKey("a"), []byte("1")), setPatch(ptKey("a"), []byte("2"))},
			[]keyWrite{ptPut("a", "2")}, map[string]string{"a": "2", "b": "7"}},
		{"second patch sees the first one's value", []DataPatch{incrPatch(ptKey("b"), 1), incrPatch(ptKey("b"), 1)},
			[]keyWrite{ptPut("b", "9")}, map[string]string{"a": "0", "b": "9"}},
		{"back to the original value: no write", []DataPatch{setPatch(ptKey("a"), []byte("x")), setPatch(ptKey("a"), []byte("0"))},
			nil, map[string]string{"a": "0", "b": "7"}},
		{"delete then recreate", []DataPatch{setPatch(ptKey("a"), nil), setPatch(ptKey("a"), []byte("new"))},
			[]keyWrite{ptPut("a", "new")}, map[string]string{"a": "new", "b": "7"}},
		{"create then delete: no write", []DataPatch{setPatch(ptKey("n"), []byte("1")), setPatch(ptKey("n"), nil)},
			nil, map[string]string{"a": "0", "b": "7"}},
		{"first-touch order is kept", []DataPatch{setPatch(ptKey("c"), []byte("c")), setPatch(ptKey("a"), []byte("a")), setPatch(ptKey("c"), []byte("cc")), setPatch(ptKey("b"), []byte("b"))},
			[]keyWrite{ptPut("c", "cc"), ptPut("a", "a"), ptPut("b", "b")}, map[string]string{"a": "a", "b": "b", "c": "cc"}},
	}
	// Many keys, each touched twice, some back to their original value.
	var many []DataPatch
	var manyWant []keyWrite
	manyLive := map[string]string{"a": "0", "b": "7"}
	for i := 0; i < 20; i++ {
		many = append(many, setPatch(ptKey(fmt.Sprint("m", i)), []byte("first")))
	}
	many = append(many, setPatch(ptKey("a"), []byte("x")))
	for i := 19; i >= 0; i-- {
		if i%3 == 0 {
			many = append(many, setPatch(ptKey(fmt.Sprint("m", i)), nil)) // back to absent
		} else {
			many = append(many, setPatch(ptKey(fmt.Sprint("m", i)), []byte(fmt.Sprint("final", i))))
		}
	}
	many = append(many, setPatch(ptKey("a"), []byte("0")))
	for i := 0; i < 20; i++ {
		if i%3 != 0 {
			manyWant = append(manyWant, ptPut(fmt.Sprint("m", i), fmt.Sprint("final", i)))
			manyLive[fmt.Sprint("m", i)] = fmt.Sprint("final", i)
		}
	}
	tests = append(tests, struct {
		name  string
		group []DataPatch
		want  []keyWrite
		live  map[string]string
	}{"many keys touched twice", many, manyWant, manyLive})

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newPTFixture(map[string]string{"a": "0", "b": "7"})
			writes, err := f.view.applyGroup(tt.group)
			require.NoError(t, err)
			requireSameWrites(t, tt.want, writes)
			f.requireLive(t, tt.live)
			f.view.reset()
			f.requireLiveEqualsCommitted(t)
		})
	}
}

func TestPatchViewIgnoreUndoesOnlyThatPatch(t *testing.T) {
	t.Parallel()
	f := newPTFixture(map[string]string{"a": "0", "b": "0", "d": "0"})
	// Group 1 is accepted and must survive an ignored patch in group 2.
	writes, err := f.view.applyGroup([]DataPatch{setPatch(ptKey("e"), []byte("1"))})
	require.NoError(t, err)
	requireSameWrites(t, []keyWrite{ptPut("e", "1")}, writes)

	p3Ran := false
	group := []DataPatch{
		setPatch(ptKey("a"), []byte("1")),
		// Changes four keys (one of them already changed by this group, one
		// by group 1), then asks to be ignored.
		patchFunc(func(m map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
			for _, k := range []string{"a", "b", "c", "e"} {
				m[ptKey(k)] = []byte("2")
				changed[ptKey(k)] = struct{}{}
			}
			delete(m, ptKey("d"))
			changed[ptKey("d")] = struct{}{}
			return fmt.Errorf("skip me: %w", ErrEtcdIgnore)
		}),
		SingleDataPatch{Key: ptKey("c"), Func: func(old []byte) ([]byte, bool, error) {
			p3Ran = true
			require.Nil(t, old, "the ignored patch's write to c must be undone")
			return []byte("3"), true, nil
		}},
		SingleDataPatch{Key: ptKey("b"), Func: func([]byte) ([]byte, bool, error) {
			return []byte("ignored"), true, ErrEtcdIgnore
		}},
		SingleDataPatch{Key: ptKey("e"), Func: func(old []byte) ([]byte, bool, error) {
			require.Equal(t, "1", string(old), "group 1's write to e must survive")
			return old, false, nil
		}},
	}
	writes, err = f.view.applyGroup(group)
	require.NoError(t, err)
	require.True(t, p3Ran)
	requireSameWrites(t, []keyWrite{ptPut("a", "1"), ptPut("c", "3")}, writes)
	f.requireLive(t, map[string]string{"a": "1", "b": "0", "c": "3", "d": "0", "e": "1"})

	f.view.reset()
	f.requireLiveEqualsCommitted(t)
}

func TestPatchViewGeneralDataPatch(t *testing.T) {
	t.Parallel()
	f := newPTFixture(map[string]string{"a": "old", "b": "old", "f": "old", "g": "same", "h": ""})
	multi := patchFunc(func(m map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
		touch := func(k string) { changed[ptKey(k)] = struct{}{} }
		m[ptKey("x")] = []byte("1") // create
		touch("x")
		m[ptKey("a")] = append([]byte{}, "new"...) // update
		touch("a")
		delete(m, ptKey("b")) // delete
		touch("b")
		m[ptKey("e")] = []byte{} // create with an empty value
		touch("e")
		m[ptKey("f")] = nil // nil value = delete
		touch("f")
		touch("g") // recorded but unchanged
		m[ptKey("h")] = []byte{}
		touch("h") // rewritten with the same (empty) value
		return nil
	})
	writes, err := f.view.applyGroup([]DataPatch{multi})
	require.NoError(t, err)
	// Keys first touched by one patch may come in any order.
	require.ElementsMatch(t, []keyWrite{ptPut("x", "1"), ptPut("a", "new"), ptDel("b"), {key: ptKey("e"), value: []byte{}}, ptDel("f")}, writes)
	for _, w := range writes {
		if w.key == ptKey("e") {
			require.NotNil(t, w.value, "an empty value must not turn into a delete")
		}
	}

	// The next group sees the first group's result.
	writes, err = f.view.applyGroup([]DataPatch{
		SingleDataPatch{Key: ptKey("b"), Func: func(old []byte) ([]byte, bool, error) {
			require.Nil(t, old)
			return []byte("back"), true, nil
		}},
		patchFunc(func(m map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
			require.Equal(t, "1", string(m[ptKey("x")]))
			require.Equal(t, "new", string(m[ptKey("a")]))
			m[ptKey("a")] = []byte("old") // equal to committed, but differs from group 1's
			changed[ptKey("a")] = struct{}{}
			return nil
		}),
	})
	require.NoError(t, err)
	requireSameWrites(t, []keyWrite{ptPut("b", "back"), ptPut("a", "old")}, writes)

	f.view.reset()
	f.requireLiveEqualsCommitted(t)
}

func TestPatchViewReset(t *testing.T) {
	t.Parallel()
	f := newPTFixture(map[string]string{"a": "0", "b": "0", "c": "0", "d": "0", "e": ""})
	_, err := f.view.applyGroup([]DataPatch{setPatch(ptKey("a"), []byte("1")), setPatch(ptKey("b"), nil), setPatch(ptKey("x"), []byte("1"))})
	require.NoError(t, err)
	_, err = f.view.applyGroup([]DataPatch{setPatch(ptKey("e"), []byte("e")), setPatch(ptKey("a"), []byte("2"))})
	require.NoError(t, err)
	// A failing group: its accepted patch on y stays in the view until reset,
	// the failing patch's change to c is undone at once.
	errBoom := errors.New("boom")
	_, err = f.view.applyGroup([]DataPatch{
		setPatch(ptKey("y"), []byte("1")),
		patchFunc(func(m map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
			m[ptKey("c")] = []byte("9")
			changed[ptKey("c")] = struct{}{}
			return errBoom
		}),
		setPatch(ptKey("z"), []byte("never")),
	})
	require.ErrorIs(t, err, errBoom)
	f.requireLive(t, map[string]string{"a": "2", "c": "0", "d": "0", "e": "e", "x": "1", "y": "1"})

	f.recording = true
	f.view.reset()
	f.recording = false
	require.ElementsMatch(t, []util.EtcdKey{ptKey("a"), ptKey("b"), ptKey("x"), ptKey("e"), ptKey("y")}, f.lookups,
		"reset must restore exactly the touched keys")
	f.requireLiveEqualsCommitted(t)
	require.NotNil(t, f.live[ptKey("e")], "an empty committed value must come back non-nil")

	// The view is clean: a patch setting a key to its committed value is a
	// no-op again, and a second reset touches nothing.
	writes, err := f.view.applyGroup([]DataPatch{setPatch(ptKey("a"), []byte("0"))})
	require.NoError(t, err)
	require.Empty(t, writes)
	f.lookups = nil
	f.recording = true
	f.view.reset()
	require.ElementsMatch(t, []util.EtcdKey{ptKey("a")}, f.lookups)
	f.lookups = nil
	f.view.reset()
	require.Empty(t, f.lookups)
	f.requireLiveEqualsCommitted(t)
}

func TestPatchViewErrors(t *testing.T) {
	t.Parallel()
	errBoom := errors.New("boom")
	tests := []struct {
		name    string
		patch   DataPatch
		wantErr error
		wantMsg string
	}{
		{"error stops the group", patchFunc(func(m map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
			m[ptKey("b")] = []byte("x")
			changed[ptKey("b")] = struct{}{}
			return errBoom
		}), errBoom, "boom"},
		{"try again stops the group", patchFunc(func(m map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
			delete(m, ptKey("b"))
			changed[ptKey("b")] = struct{}{}
			return ErrEtcdTryAgain
		}), ErrEtcdTryAgain, ""},
		{"panic in a DataPatch", patchFunc(func(m map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
			m[ptKey("b")] = []byte("x")
			changed[ptKey("b")] = struct{}{}
			panic("kaboom")
		}), ErrPanic, "kaboom"},
		{"panic in a SingleDataPatch Func", SingleDataPatch{Key: ptKey("b"), Func: func(old []byte) ([]byte, bool, error) {
			return []byte{old[10]}, true, nil // index out of range
		}}, ErrPanic, "index out of range"},
		{"panic with an error value", patchFunc(func(map[util.EtcdKey][]byte, map[util.EtcdKey]struct{}) error {
			panic(errBoom)
		}), ErrPanic, "boom"},
		{"nil patch", nil, ErrInvalidArgument, "nil"},
		{"nil *SingleDataPatch", (*SingleDataPatch)(nil), ErrInvalidArgument, "nil"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newPTFixture(map[string]string{"a": "0", "b": "0"})
			lastRan := false
			last := patchFunc(func(map[util.EtcdKey][]byte, map[util.EtcdKey]struct{}) error {
				lastRan = true
				return nil
			})
			writes, err := f.view.applyGroup([]DataPatch{setPatch(ptKey("a"), []byte("1")), tt.patch, last})
			require.ErrorIs(t, err, tt.wantErr)
			require.Contains(t, err.Error(), tt.wantMsg)
			require.Nil(t, writes)
			require.False(t, lastRan, "patches after a failing one must not run")
			// The failing patch's own change is undone at once.
			require.Equal(t, "0", string(f.live[ptKey("b")]))
			f.view.reset()
			f.requireLiveEqualsCommitted(t)
		})
	}
}

// BenchmarkApplyGroupSingle measures one single-key group on a 10k-key state,
// then the reset, as one flush of one group does.
func BenchmarkApplyGroupSingle(b *testing.B) {
	kv := make(map[string]string, 10000)
	for i := 0; i < 10000; i++ {
		kv[strconv.Itoa(i)] = strconv.Itoa(i)
	}
	f := newPTFixture(kv)
	group := []DataPatch{incrPatch(ptKey("42"), 1)}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		writes, err := f.view.applyGroup(group)
		if err != nil || len(writes) != 1 {
			b.Fatalf("applyGroup: %v, %d writes", err, len(writes))
		}
		f.view.reset()
	}
}

// BenchmarkPackTxns packs 1000 single-key groups with the default limits.
func BenchmarkPackTxns(b *testing.B) {
	groups := make([]groupWrites, 1000)
	for i := range groups {
		groups[i] = groupWrites{batchPut(i, 16)}
	}
	l := txnLimits{maxOps: DefaultTxnMaxOps, maxBytes: DefaultTxnMaxBytes, overheadOps: 2, overheadBytes: 200, deleteBytes: 40}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if out := packTxns(groups, nil, l); len(out) != 8 {
			b.Fatalf("%d txns", len(out))
		}
	}
}

// TestPatchViewMixedSingleAndGeneral: single-key patches run without the live
// map; a general DataPatch later in the same flush still sees their accepted
// writes, and reset leaves the live map equal to the committed one.
func TestPatchViewMixedSingleAndGeneral(t *testing.T) {
	t.Parallel()
	f := newPTFixture(map[string]string{"a": "0", "b": "7"})
	w1, err := f.view.applyGroup([]DataPatch{setPatch(ptKey("a"), []byte("5"))})
	require.NoError(t, err)
	requireSameWrites(t, []keyWrite{ptPut("a", "5")}, w1)
	require.Nil(t, f.view.values, "a SingleDataPatch must not need the live map")

	copyA := patchFunc(func(m map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
		m[ptKey("b")] = append([]byte("a="), m[ptKey("a")]...)
		changed[ptKey("b")] = struct{}{}
		return nil
	})
	w2, err := f.view.applyGroup([]DataPatch{copyA, setPatch(ptKey("c"), []byte("1"))})
	require.NoError(t, err)
	requireSameWrites(t, []keyWrite{ptPut("b", "a=5"), ptPut("c", "1")}, w2)
	f.requireLive(t, map[string]string{"a": "5", "b": "a=5", "c": "1"})

	f.view.reset()
	f.requireLiveEqualsCommitted(t)
	require.Equal(t, f.committed, f.viewValues())
}

// patchInputs records, per key, the value each run of a patch was given.
type patchInputs struct {
	mu   sync.Mutex
	seen map[string][]string
}

func (in *patchInputs) add(key util.EtcdKey, v []byte) {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.seen == nil {
		in.seen = map[string][]string{}
	}
	in.seen[key.String()] = append(in.seen[key.String()], string(v))
}

func (in *patchInputs) get(key util.EtcdKey) []string {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.seen[key.String()]
}

// editPatch returns a patch of the given kind ("single" or "general")
// that edits the bytes of key in place with edit and reports the change.
// unchanged makes it report no change instead (single: changed == false;
// general: ErrEtcdIgnore after recording the key).
func editPatch(kind string, key util.EtcdKey, in *patchInputs, edit func([]byte), unchanged bool) DataPatch {
	if kind == "single" {
		return SingleDataPatch{Key: key, Func: func(old []byte) ([]byte, bool, error) {
			in.add(key, old)
			edit(old)
			return old, !unchanged, nil
		}}
	}
	return generalPatch(func(values map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
		v := values[key]
		in.add(key, v)
		edit(v)
		changed[key] = struct{}{}
		if unchanged {
			return ErrEtcdIgnore
		}
		return nil
	})
}

// generalPatch adapts a function to a general DataPatch.
type generalPatch func(map[util.EtcdKey][]byte, map[util.EtcdKey]struct{}) error

func (f generalPatch) Patch(values map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
	return f(values, changed)
}

// copyPatch copies the value of from to to (a general DataPatch that
// reads another patch's result).
func copyPatch(from, to util.EtcdKey) DataPatch {
	return generalPatch(func(values map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
		values[to] = bytes.Clone(values[from])
		changed[to] = struct{}{}
		return nil
	})
}

// patchCase is one scenario of TestPatchesMayEditTheirInput.
type patchCase struct {
	name string
	// groups returns the groups of the first Tick.
	groups func(st *mapState, kind string, in *patchInputs, ext *clientv3.Client) [][]DataPatch
	want   map[string]string // etcd after the commit; "" = absent
	inputs []string          // what the runs of the /a patch were given
}

var patchCases = []patchCase{{
	name: "edit in place",
	groups: func(st *mapState, kind string, in *patchInputs, _ *clientv3.Client) [][]DataPatch {
		return [][]DataPatch{
			{editPatch(kind, st.key("/a"), in, func(v []byte) { v[0] = 'X' }, false)},
			{copyPatch(st.key("/a"), st.key("/c"))},
		}
	},
	want: map[string]string{"/a": "Xbc", "/b": "k2", "/c": "Xbc"}, inputs: []string{"abc"},
}, {
	name: "edit in place but report no change",
	groups: func(st *mapState, kind string, in *patchInputs, _ *clientv3.Client) [][]DataPatch {
		return [][]DataPatch{
			{editPatch(kind, st.key("/a"), in, func(v []byte) { v[0] = 'X' }, true)},
			{copyPatch(st.key("/a"), st.key("/c"))},
		}
	},
	want: map[string]string{"/a": "abc", "/b": "k2", "/c": "abc"}, inputs: []string{"abc"},
}, {
	name: "retry after a later group asks to try again",
	groups: func(st *mapState, kind string, in *patchInputs, _ *clientv3.Client) [][]DataPatch {
		asked := false
		return [][]DataPatch{
			{editPatch(kind, st.key("/a"), in, func(v []byte) { v[0]++ }, false)},
			{SingleDataPatch{Key: st.key("/c"), Func: func([]byte) ([]byte, bool, error) {
				if !asked {
					asked = true
					return nil, false, ErrEtcdTryAgain
				}
				return []byte("done"), true, nil
			}}},
		}
	},
	want: map[string]string{"/a": "bbc", "/b": "k2", "/c": "done"}, inputs: []string{"abc", "abc"},
}, {
	name: "retry after a conflict",
	groups: func(st *mapState, kind string, in *patchInputs, ext *clientv3.Client) [][]DataPatch {
		wrote := false
		return [][]DataPatch{{
			editPatch(kind, st.key("/a"), in, func(v []byte) { v[0]++ }, false),
			SingleDataPatch{Key: st.key("/b"), Func: func(old []byte) ([]byte, bool, error) {
				if !wrote { // another client writes /b: the commit conflicts
					wrote = true
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					defer cancel()
					if _, err := ext.Put(ctx, st.key("/b").String(), "ext"); err != nil {
						return nil, false, err
					}
				}
				return append(bytes.Clone(old), '!'), true, nil
			}},
		}}
	},
	want: map[string]string{"/a": "bbc", "/b": "ext!", "/c": ""}, inputs: []string{"abc", "abc"},
}}

// TestPatchesMayEditTheirInput: a patch may edit the bytes it is given (as
// code written for the original, which cloned the state per commit, does).
// The edit is written; the mirror, the state's own slices and other patches'
// inputs never change because of it; and a retried group (after
// ErrEtcdTryAgain of a later group, after a conflict) starts from the
// committed values, not from its own aborted edit.
func TestPatchesMayEditTheirInput(t *testing.T) {
	t.Parallel()
	direct := sharedClient(t)
	for ci, tc := range patchCases {
		for _, kind := range []string{"single", "general"} {
			t.Run(tc.name+"/"+kind, func(t *testing.T) {
				prefix := fmt.Sprintf("/test/edit-%d-%s", ci, kind)
				runEditCase(t, direct, prefix, kind, tc)
			})
		}
	}
}

// runEditCase runs one case on prefix: /a = "abc", /b = "k2", the first
// Tick leaves tc's groups, the second checks the mirror and the state
// against etcd and finishes.
func runEditCase(t *testing.T, direct *clientv3.Client, prefix, kind string, tc patchCase) {
	ctx := contextWithin(t, 20*time.Second)
	_, err := direct.Put(ctx, prefix+"/a", "abc")
	require.NoError(t, err)
	_, err = direct.Put(ctx, prefix+"/b", "k2")
	require.NoError(t, err)
	var (
		w        *EtcdWorker
		in       patchInputs
		original []byte // the slice the state got for /a
		checkErr error
		ticks    int
	)
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		ticks++
		if ticks == 1 {
			original = st.values["/a"]
			st.patches = tc.groups(st, kind, &in, direct)
			return st, nil
		}
		checkErr = checkMirror(ctx, direct, st, w.src.copy, w.view.values, prefix)
		return st, ErrReactorFinished
	})
	state := newMapState(prefix)
	w, err = NewEtcdWorker(direct, prefix, reactor, state)
	require.NoError(t, err)
	require.NoError(t, w.Run(ctx, nil, 20*time.Millisecond, "edit"))
	require.NoError(t, checkErr)
	require.Equal(t, "abc", string(original), "the state's own slice was changed by a patch")
	require.Equal(t, tc.inputs, in.get(state.key("/a")), "inputs of the runs of the /a patch")
	for rel, want := range tc.want {
		resp, err := direct.Get(ctx, prefix+rel)
		require.NoError(t, err)
		if want == "" {
			require.Empty(t, resp.Kvs, rel)
			continue
		}
		require.Len(t, resp.Kvs, 1, rel)
		require.Equal(t, want, string(resp.Kvs[0].Value), rel)
	}
}

// checkMirror compares the state and the worker's mirror (entries and
// the value map of general patches, if built) with etcd. It runs inside
// Tick, on Run's goroutine.
func checkMirror(ctx context.Context, cli *clientv3.Client, st *mapState, m *mirror, values map[util.EtcdKey][]byte, prefix string) error {
	resp, err := cli.Get(ctx, prefix+"/", clientv3.WithPrefix())
	if err != nil {
		return err
	}
	etcd := map[string]string{}
	for _, kv := range resp.Kvs {
		if !bytes.Contains(kv.Key, []byte(reservedDir)) {
			etcd[string(kv.Key)] = string(kv.Value)
		}
	}
	got := map[string]string{}
	for rel, v := range st.values {
		got[prefix+rel] = string(v)
	}
	if fmt.Sprint(got) != fmt.Sprint(etcd) {
		return fmt.Errorf("state %v, etcd %v", got, etcd)
	}
	mirrored := map[string]string{}
	m.each(func(k util.EtcdKey, e kvEntry) { mirrored[k.String()] = string(e.value) })
	if fmt.Sprint(mirrored) != fmt.Sprint(etcd) {
		return fmt.Errorf("mirror %v, etcd %v", mirrored, etcd)
	}
	if values != nil {
		live := map[string]string{}
		for k, v := range values {
			live[k.String()] = string(v)
		}
		if fmt.Sprint(live) != fmt.Sprint(etcd) {
			return fmt.Errorf("value map %v, etcd %v", live, etcd)
		}
	}
	return nil
}
