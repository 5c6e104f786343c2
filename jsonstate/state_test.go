package jsonstate_test

import (
	"context"
	"encoding/json"
	"errors"
	"testing"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/jsonstate"
)

type node struct {
	Addr  string `json:"addr"`
	Load  int    `json:"load"`
	Drain bool   `json:"drain,omitempty"`
}

func mustJSON(t testing.TB, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	require.NoError(t, err)
	return string(b)
}

func names[T any](s *jsonstate.State[T]) []string {
	var out []string
	s.Range(func(name string, _ T) bool {
		out = append(out, name)
		return true
	})
	return out
}

func TestStateLoadIgnoresForeignKeys(t *testing.T) {
	t.Parallel()
	s := jsonstate.New[node]("app/nodes/") // normalized to /app/nodes
	require.Equal(t, "/app/nodes", s.Prefix())
	require.Equal(t, "/app/nodes/x", s.Key("x").String())
	orchestrator.NewReactorStateTester(t, s, map[string]string{
		"/app/nodes/b":       `{"addr":"b:1","load":2}`,
		"/app/nodes/a":       `{"addr":"a:1","load":1}`,
		"/app/nodes/c/d":     `{"addr":"cd:1"}`,
		"/app/nodes":         `not json`, // the prefix itself: ignored
		"/app/nodes/":        `not json`, // empty name: ignored
		"/app/nodesX/a":      `not json`, // sibling prefix: ignored
		"/app/config":        `not json`,
		"/other/app/nodes/a": `not json`,
	})
	require.Equal(t, 3, s.Len())
	require.Equal(t, []string{"a", "b", "c/d"}, s.Names())
	require.Equal(t, []string{"a", "b", "c/d"}, names(s))
	a, ok := s.Get("a")
	require.True(t, ok)
	require.Equal(t, node{Addr: "a:1", Load: 1}, a)
	_, ok = s.Get("missing")
	require.False(t, ok)
	require.Empty(t, s.Errors())

	// Early stop and the iterator form.
	var first []string
	for name := range s.All() {
		first = append(first, name)
		break
	}
	require.Equal(t, []string{"a"}, first)
}

func TestStateFollowsUpdates(t *testing.T) {
	t.Parallel()
	s := jsonstate.New[node]("/app/nodes")
	tester := orchestrator.NewReactorStateTester(t, s, nil)
	tester.MustUpdate("/app/nodes/a", []byte(`{"addr":"a","load":1}`))
	tester.MustUpdate("/app/nodes/b", []byte(`{"addr":"b","load":1}`))
	require.Equal(t, []string{"a", "b"}, s.Names())
	tester.MustUpdate("/app/nodes/a", []byte(`{"addr":"a","load":7}`))
	a, _ := s.Get("a")
	require.Equal(t, 7, a.Load)
	tester.MustUpdate("/app/nodes/a", nil)
	require.Equal(t, []string{"b"}, s.Names())
	require.Equal(t, 1, s.Len())
	// JSON null decodes to the zero value: the document exists.
	tester.MustUpdate("/app/nodes/z", []byte(`null`))
	z, ok := s.Get("z")
	require.True(t, ok)
	require.Equal(t, node{}, z)
}

// stateWrite is a case of the TestStateWrites tests: what to queue on a
// state holding /app/nodes/a = {"addr":"a","load":1}, and the entries etcd
// must then hold.
type stateWrite struct {
	name  string
	queue func(s *jsonstate.State[node])
	want  map[string]string
}

// addLoad is a patch that adds d to a node's load.
func addLoad(d int) jsonstate.PatchFunc[node] {
	return func(n *node, _ bool) (bool, error) {
		n.Load += d
		return true, nil
	}
}

// runStateWrites applies the patches each case queues and checks both etcd
// and the state.
func runStateWrites(t *testing.T, tests []stateWrite) {
	t.Helper()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := jsonstate.New[node]("/app/nodes")
			tester := orchestrator.NewReactorStateTester(t, s, map[string]string{"/app/nodes/a": `{"addr":"a","load":1}`})
			tt.queue(s)
			tester.MustApplyPatches()
			require.Equal(t, tt.want, tester.KVEntries())
			require.Empty(t, s.GetPatches(), "GetPatches clears the queue")
			// The state followed the writes.
			require.Equal(t, len(tt.want), s.Len())
			for k, v := range tt.want {
				var want node
				require.NoError(t, json.Unmarshal([]byte(v), &want))
				got, ok := s.Get(k[len("/app/nodes/"):])
				require.True(t, ok)
				require.Equal(t, want, got)
			}
		})
	}
}

func TestStateWritesPatch(t *testing.T) {
	t.Parallel()
	runStateWrites(t, []stateWrite{{
		name:  "patch existing",
		queue: func(s *jsonstate.State[node]) { s.Patch("a", addLoad(5)) },
		want:  map[string]string{"/app/nodes/a": `{"addr":"a","load":6}`},
	}, {
		name: "patch absent creates",
		queue: func(s *jsonstate.State[node]) {
			s.Patch("new", func(n *node, exists bool) (bool, error) {
				if exists {
					return false, errors.New("should not exist")
				}
				n.Addr = "new"
				return true, nil
			})
		},
		want: map[string]string{"/app/nodes/a": `{"addr":"a","load":1}`, "/app/nodes/new": `{"addr":"new","load":0}`},
	}, {
		name:  "unchanged writes nothing",
		queue: func(s *jsonstate.State[node]) { s.Patch("a", func(*node, bool) (bool, error) { return false, nil }) },
		want:  map[string]string{"/app/nodes/a": `{"addr":"a","load":1}`},
	}})
}

func TestStateWritesPutAndDelete(t *testing.T) {
	t.Parallel()
	runStateWrites(t, []stateWrite{{
		name:  "put replaces",
		queue: func(s *jsonstate.State[node]) { s.Put("a", node{Addr: "a2", Drain: true}) },
		want:  map[string]string{"/app/nodes/a": `{"addr":"a2","load":0,"drain":true}`},
	}, {
		name:  "delete",
		queue: func(s *jsonstate.State[node]) { s.Delete("a") },
		want:  map[string]string{},
	}, {
		name:  "delete absent is a no-op",
		queue: func(s *jsonstate.State[node]) { s.Delete("nope") },
		want:  map[string]string{"/app/nodes/a": `{"addr":"a","load":1}`},
	}, {
		name: "delete if true",
		queue: func(s *jsonstate.State[node]) {
			s.DeleteIf("a", func(n node) (bool, error) { return n.Load == 1, nil })
		},
		want: map[string]string{},
	}, {
		name: "delete if false",
		queue: func(s *jsonstate.State[node]) {
			s.DeleteIf("a", func(n node) (bool, error) { return n.Load > 1, nil })
		},
		want: map[string]string{"/app/nodes/a": `{"addr":"a","load":1}`},
	}})
}

func TestStateWritesGroup(t *testing.T) {
	t.Parallel()
	runStateWrites(t, []stateWrite{{
		name: "ignore skips one patch",
		queue: func(s *jsonstate.State[node]) {
			s.Group(func(g *jsonstate.Group[node]) {
				g.Patch("a", func(*node, bool) (bool, error) { return false, orchestrator.ErrEtcdIgnore })
				g.Put("b", node{Addr: "b"})
			})
		},
		want: map[string]string{"/app/nodes/a": `{"addr":"a","load":1}`, "/app/nodes/b": `{"addr":"b","load":0}`},
	}, {
		name: "later patches of a group see earlier ones",
		queue: func(s *jsonstate.State[node]) {
			s.Group(func(g *jsonstate.Group[node]) {
				g.Patch("a", addLoad(1))
				g.Patch("a", addLoad(1))
				g.Patch("b", func(n *node, _ bool) (bool, error) { n.Load = 100; return true, nil })
				g.DeleteIf("b", func(n node) (bool, error) { return n.Load == 100, nil })
			})
		},
		want: map[string]string{"/app/nodes/a": `{"addr":"a","load":3}`},
	}, {
		name:  "empty group is not queued",
		queue: func(s *jsonstate.State[node]) { s.Group(func(*jsonstate.Group[node]) {}) },
		want:  map[string]string{"/app/nodes/a": `{"addr":"a","load":1}`},
	}})
}

func TestStateGroupIsAtomic(t *testing.T) {
	t.Parallel()
	boom := errors.New("boom")
	s := jsonstate.New[node]("/app/nodes")
	initial := map[string]string{"/app/nodes/a": `{"addr":"a","load":1}`}
	tester := orchestrator.NewReactorStateTester(t, s, initial)
	s.Group(func(g *jsonstate.Group[node]) {
		g.Put("b", node{Addr: "b"})
		g.Delete("a")
		g.Patch("c", func(*node, bool) (bool, error) { return false, boom })
	})
	_, err := tester.ApplyPatches()
	require.ErrorIs(t, err, boom)
	require.Equal(t, initial, tester.KVEntries())
	require.Equal(t, []string{"a"}, s.Names())

	s.Group(func(g *jsonstate.Group[node]) {
		g.Put("b", node{Addr: "b"})
		g.Patch("a", func(*node, bool) (bool, error) { return false, orchestrator.ErrEtcdTryAgain })
	})
	tryAgain, err := tester.ApplyPatches()
	require.NoError(t, err)
	require.True(t, tryAgain)
	require.Equal(t, initial, tester.KVEntries())
}

func TestGroupAcrossStates(t *testing.T) {
	t.Parallel()
	type config struct {
		Version int `json:"version"`
	}
	nodes := jsonstate.New[node]("/app/nodes")
	cfg := jsonstate.NewDoc[config]("/app/config")
	state := jsonstate.Multi{nodes, cfg}
	tester := orchestrator.NewReactorStateTester(t, state, map[string]string{"/app/config": `{"version":1}`})
	v, ok := cfg.Get()
	require.True(t, ok)
	require.Equal(t, 1, v.Version)

	bump := cfg.PatchOp(func(c *config, _ bool) (bool, error) { c.Version++; return true, nil })
	nodes.Group(func(g *jsonstate.Group[node]) {
		g.Put("a", node{Addr: "a"})
		g.Add(bump)
	})
	nodes.QueueGroup(nodes.PutOp("b", node{Addr: "b"}), bump, cfg.DeleteOp(), cfg.PutOp(config{Version: 10}))
	cfg.Patch(func(c *config, _ bool) (bool, error) { c.Version *= 2; return true, nil })
	require.Len(t, state.GetPatches(), 3)

	nodes.Group(func(g *jsonstate.Group[node]) {
		g.Put("a", node{Addr: "a"})
		g.Add(bump)
	})
	nodes.QueueGroup(nodes.PutOp("b", node{Addr: "b"}), bump, cfg.DeleteOp(), cfg.PutOp(config{Version: 10}))
	cfg.Patch(func(c *config, _ bool) (bool, error) { c.Version *= 2; return true, nil })
	tester.MustApplyPatches()
	require.Equal(t, map[string]string{
		"/app/config":  `{"version":20}`,
		"/app/nodes/a": `{"addr":"a","load":0}`,
		"/app/nodes/b": `{"addr":"b","load":0}`,
	}, tester.KVEntries())
	v, _ = cfg.Get()
	require.Equal(t, 20, v.Version)
	require.Equal(t, 2, nodes.Len())
}

func TestNameFilter(t *testing.T) {
	t.Parallel()
	s := jsonstate.New[node]("/app/nodes", jsonstate.WithNameFilter(func(name string) bool {
		return name != "skip" && len(name) == 1
	}))
	orchestrator.NewReactorStateTester(t, s, map[string]string{
		"/app/nodes/a":        `{"addr":"a"}`,
		"/app/nodes/skip":     `not json`,
		"/app/nodes/a/status": `not json`,
	})
	require.Equal(t, []string{"a"}, s.Names())
	require.Empty(t, s.Errors())
}

func TestEncodeErrorIsReported(t *testing.T) {
	t.Parallel()
	s := jsonstate.New[any]("/app/x")
	tester := orchestrator.NewReactorStateTester(t, s, nil)
	s.Put("ch", make(chan int))
	_, err := tester.ApplyPatches()
	var uerr *json.UnsupportedTypeError
	require.ErrorAs(t, err, &uerr)
	require.ErrorContains(t, err, `"/app/x/ch"`)

	s.Patch("f", func(v *any, _ bool) (bool, error) { *v = func() {}; return true, nil })
	_, err = tester.ApplyPatches()
	require.ErrorAs(t, err, &uerr)
	require.Empty(t, tester.KVEntries())
}

func TestNilPatchFunc(t *testing.T) {
	t.Parallel()
	s := jsonstate.New[node]("/app/nodes")
	tester := orchestrator.NewReactorStateTester(t, s, nil)
	s.Patch("a", nil)
	_, err := tester.ApplyPatches()
	require.ErrorIs(t, err, orchestrator.ErrInvalidArgument)
}

// TestOutOfScopeStateIsAnError: a State or Doc whose keys lie outside the
// worker's prefix would load nothing; NewEtcdWorker says so instead. Also
// at the edges: root, empty and slash-terminated worker prefixes, siblings
// sharing a name prefix, and the reserved area.
func TestOutOfScopeStateIsAnError(t *testing.T) {
	t.Parallel()
	cli := &clientv3.Client{}
	reactor := orchestrator.ReactorFunc(func(_ context.Context, s orchestrator.ReactorState) (orchestrator.ReactorState, error) {
		return s, nil
	})
	tests := []struct {
		name   string
		prefix string
		state  orchestrator.ReactorState
		ok     bool
	}{
		{"state under the prefix", "/app", jsonstate.New[int]("/app/nodes"), true},
		{"state at the prefix", "/app", jsonstate.New[int]("/app"), true},
		{"state above the prefix", "/app", jsonstate.New[int]("/"), true},
		{"state beside the prefix", "/app", jsonstate.New[int]("/apple"), false},
		{"state elsewhere", "/app", jsonstate.New[int]("/other/nodes"), false},
		{"doc under the prefix", "/app", jsonstate.NewDoc[int]("/app/config"), true},
		{"doc at the prefix key", "/app", jsonstate.NewDoc[int]("/app"), false},
		{"doc elsewhere", "/app", jsonstate.NewDoc[int]("/other/config"), false},
		{"multi with one part elsewhere", "/app",
			jsonstate.Multi{jsonstate.New[int]("/app/a"), jsonstate.NewDoc[int]("/x/config")}, false},
		{"multi all inside", "/app", jsonstate.Multi{jsonstate.New[int]("/app/a"), jsonstate.NewDoc[int]("/app/config")}, true},
		{"root worker, any state", "/", jsonstate.New[int]("/app/nodes"), true},
		{"empty worker prefix, any doc", "", jsonstate.NewDoc[int]("/x"), true},
		{"root worker, root state", "/", jsonstate.New[int]("/"), true},
		{"trailing slashes on the worker prefix", "/app//", jsonstate.New[int]("/app/nodes"), true},
		{"trailing slash on the state prefix", "/app", jsonstate.New[int]("/app/nodes/"), true},
		{"state without leading slash", "/app", jsonstate.New[int]("app/nodes"), true},
		{"sibling state /apple of /app", "/app", jsonstate.New[int]("/apple/nodes"), false},
		{"sibling doc /apple of /app", "/app", jsonstate.NewDoc[int]("/apple"), false},
		{"sibling doc /app-x of /app/", "/app/", jsonstate.NewDoc[int]("/app-x/c"), false},
		{"worker /apple, state /app", "/apple", jsonstate.New[int]("/app"), false},
		{"doc at the worker dir itself (a key of the prefix)", "/app", jsonstate.NewDoc[int]("/app/"), true},
		{"state in the reserved area", "/app", jsonstate.New[int]("/app/__orchestrator/token"), false},
		{"doc in the reserved area", "/app", jsonstate.NewDoc[int]("/app/__orchestrator/deletes"), false},
		{"nested multi, one part outside", "/app",
			jsonstate.Multi{jsonstate.Multi{jsonstate.NewDoc[int]("/app/a")}, jsonstate.Multi{jsonstate.New[int]("/b")}}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := orchestrator.NewEtcdWorker(cli, tt.prefix, reactor, tt.state)
			if tt.ok {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, jsonstate.ErrOutOfScope)
			require.ErrorIs(t, err, orchestrator.ErrInvalidArgument)
		})
	}
}
