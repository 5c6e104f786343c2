package orchestrator

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/util"
)

// i10Inputs records, per key, the value each run of a patch was given.
type i10Inputs struct {
	mu   sync.Mutex
	seen map[string][]string
}

func (in *i10Inputs) add(key util.EtcdKey, v []byte) {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.seen == nil {
		in.seen = map[string][]string{}
	}
	in.seen[key.String()] = append(in.seen[key.String()], string(v))
}

func (in *i10Inputs) get(key util.EtcdKey) []string {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.seen[key.String()]
}

// i10EditPatch returns a patch of the given kind ("single" or "general")
// that edits the bytes of key in place with edit and reports the change.
// unchanged makes it report no change instead (single: changed == false;
// general: ErrEtcdIgnore after recording the key).
func i10EditPatch(kind string, key util.EtcdKey, in *i10Inputs, edit func([]byte), unchanged bool) DataPatch {
	if kind == "single" {
		return SingleDataPatch{Key: key, Func: func(old []byte) ([]byte, bool, error) {
			in.add(key, old)
			edit(old)
			return old, !unchanged, nil
		}}
	}
	return i10GeneralPatch(func(values map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
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

// i10GeneralPatch adapts a function to a general DataPatch.
type i10GeneralPatch func(map[util.EtcdKey][]byte, map[util.EtcdKey]struct{}) error

func (f i10GeneralPatch) Patch(values map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
	return f(values, changed)
}

// i10CopyPatch copies the value of from to to (a general DataPatch that
// reads another patch's result).
func i10CopyPatch(from, to util.EtcdKey) DataPatch {
	return i10GeneralPatch(func(values map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
		values[to] = bytes.Clone(values[from])
		changed[to] = struct{}{}
		return nil
	})
}

// i10PatchCase is one scenario of TestPatchesMayEditTheirInput.
type i10PatchCase struct {
	name string
	// groups returns the groups of the first Tick.
	groups func(st *mapState, kind string, in *i10Inputs, ext *clientv3.Client) [][]DataPatch
	want   map[string]string // etcd after the commit; "" = absent
	inputs []string          // what the runs of the /a patch were given
}

var i10PatchCases = []i10PatchCase{{
	name: "edit in place",
	groups: func(st *mapState, kind string, in *i10Inputs, _ *clientv3.Client) [][]DataPatch {
		return [][]DataPatch{
			{i10EditPatch(kind, st.key("/a"), in, func(v []byte) { v[0] = 'X' }, false)},
			{i10CopyPatch(st.key("/a"), st.key("/c"))},
		}
	},
	want: map[string]string{"/a": "Xbc", "/b": "k2", "/c": "Xbc"}, inputs: []string{"abc"},
}, {
	name: "edit in place but report no change",
	groups: func(st *mapState, kind string, in *i10Inputs, _ *clientv3.Client) [][]DataPatch {
		return [][]DataPatch{
			{i10EditPatch(kind, st.key("/a"), in, func(v []byte) { v[0] = 'X' }, true)},
			{i10CopyPatch(st.key("/a"), st.key("/c"))},
		}
	},
	want: map[string]string{"/a": "abc", "/b": "k2", "/c": "abc"}, inputs: []string{"abc"},
}, {
	name: "retry after a later group asks to try again",
	groups: func(st *mapState, kind string, in *i10Inputs, _ *clientv3.Client) [][]DataPatch {
		asked := false
		return [][]DataPatch{
			{i10EditPatch(kind, st.key("/a"), in, func(v []byte) { v[0]++ }, false)},
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
	groups: func(st *mapState, kind string, in *i10Inputs, ext *clientv3.Client) [][]DataPatch {
		wrote := false
		return [][]DataPatch{{
			i10EditPatch(kind, st.key("/a"), in, func(v []byte) { v[0]++ }, false),
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
	srv := etcdtest.Shared(t)
	direct := srv.Client(t)
	for ci, tc := range i10PatchCases {
		for _, kind := range []string{"single", "general"} {
			t.Run(tc.name+"/"+kind, func(t *testing.T) {
				prefix := fmt.Sprintf("/test/edit-%d-%s", ci, kind)
				i10RunEditCase(t, direct, prefix, kind, tc)
			})
		}
	}
}

// i10RunEditCase runs one case on prefix: /a = "abc", /b = "k2", the first
// Tick leaves tc's groups, the second checks the mirror and the state
// against etcd and finishes.
func i10RunEditCase(t *testing.T, direct *clientv3.Client, prefix, kind string, tc i10PatchCase) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := direct.Put(ctx, prefix+"/a", "abc")
	require.NoError(t, err)
	_, err = direct.Put(ctx, prefix+"/b", "k2")
	require.NoError(t, err)
	var (
		w        *EtcdWorker
		in       i10Inputs
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
		checkErr = i10CheckMirror(ctx, direct, st, w.mirror, prefix)
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

// i10CheckMirror compares the state and the worker's mirror (entries and
// the value map of general patches, if built) with etcd. It runs inside
// Tick, on Run's goroutine.
func i10CheckMirror(ctx context.Context, cli *clientv3.Client, st *mapState, m *mirror, prefix string) error {
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
	if m.values != nil {
		live := map[string]string{}
		for k, v := range m.values {
			live[k.String()] = string(v)
		}
		if fmt.Sprint(live) != fmt.Sprint(etcd) {
			return fmt.Errorf("value map %v, etcd %v", live, etcd)
		}
	}
	return nil
}
