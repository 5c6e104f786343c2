package jsonstate_test

import (
	"context"
	"errors"
	"testing"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/jsonstate"
	"github.com/etcdworker/orchestrator/util"
)

// TestRequireConditionsWithoutEtcd runs Require and RequireAll through the
// ReactorStateTester: a nil condition only adds the dependency, a failing or
// undecodable condition stops the flush, and RequireAll sees only the
// documents of its own state that decode (or fails under FailOnInvalid).
func TestRequireConditionsWithoutEtcd(t *testing.T) {
	t.Parallel()
	errCond := errors.New("cond failed")
	type tc struct {
		name    string
		queue   func(a, b *jsonstate.State[int])
		wantErr error
		wantKV  string // value of /a/out afterwards ("" = absent)
	}
	tests := []tc{
		{"nil cond only depends", func(a, _ *jsonstate.State[int]) {
			a.Group(func(g *jsonstate.Group[int]) { g.Require("one", nil); g.Put("out", 1) })
		}, nil, "1"},
		{"nil RequireAll only depends", func(a, _ *jsonstate.State[int]) {
			a.QueueGroup(append(a.RequireAllOps(nil), a.PutOp("out", 2))...)
		}, nil, "2"},
		{"cond error stops", func(a, _ *jsonstate.State[int]) {
			a.Group(func(g *jsonstate.Group[int]) {
				g.Require("one", func(int, bool) (bool, error) { return false, errCond })
				g.Put("out", 3)
			})
		}, errCond, ""},
		{"undecodable required document", func(a, _ *jsonstate.State[int]) {
			a.Group(func(g *jsonstate.Group[int]) {
				g.Require("bad", func(int, bool) (bool, error) { return true, nil })
				g.Put("out", 4)
			})
		}, jsonstate.ErrDecode, ""},
		{"RequireAll of another state fails on its invalid document", func(a, b *jsonstate.State[int]) {
			a.QueueGroup(append(b.RequireAllOps(func(map[string]int) (bool, error) { return true, nil }), a.PutOp("out", 5))...)
		}, jsonstate.ErrDecode, ""},
		{"RequireAll skips invalid documents under SkipInvalid", func(a, _ *jsonstate.State[int]) {
			a.QueueGroup(append(a.RequireAllOps(func(docs map[string]int) (bool, error) {
				return len(docs) == 1 && docs["one"] == 1, nil // not "bad", not other states' keys
			}), a.PutOp("out", 6))...)
		}, nil, "6"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := jsonstate.New[int]("/a", jsonstate.WithDecodePolicy(jsonstate.SkipInvalid))
			b := jsonstate.New[int]("/b", jsonstate.WithNameFilter(func(name string) bool { return name != "skipped" }))
			tester := orchestrator.NewReactorStateTester(t, a, map[string]string{
				"/a/one": "1", "/a/bad": "{", "/b/x": "{", "/b/skipped": "{", "/c": "2",
			})
			tt.queue(a, b)
			_, err := tester.ApplyPatches()
			if tt.wantErr != nil {
				require.ErrorIs(t, err, tt.wantErr)
			} else {
				require.NoError(t, err)
			}
			require.Equal(t, tt.wantKV, tester.KVEntries()["/a/out"])
		})
	}
}

// TestMultiUpdateStopsAtTheFirstError: a part that rejects a change stops
// Multi.Update with that part's error.
func TestMultiUpdateStopsAtTheFirstError(t *testing.T) {
	t.Parallel()
	m := jsonstate.Multi{jsonstate.New[int]("/a"), jsonstate.NewDoc[int]("/a/doc")}
	require.NoError(t, m.Update(util.NewEtcdKey("/a/doc"), []byte("7"), true))
	require.ErrorIs(t, m.Update(util.NewEtcdKey("/a/doc"), []byte("{"), false), jsonstate.ErrDecode)
}

// TestMultiWithNilPartDoesNotPanic: a Multi holding a typed nil
// State is bad input; NewEtcdWorker must return an error, not panic.
func TestMultiWithNilPartDoesNotPanic(t *testing.T) {
	t.Parallel()
	cli := &clientv3.Client{}
	reactor := orchestrator.ReactorFunc(func(_ context.Context, s orchestrator.ReactorState) (orchestrator.ReactorState, error) {
		return s, nil
	})
	var nilState *jsonstate.State[int]
	var nilDoc *jsonstate.Doc[int]
	for _, m := range []jsonstate.Multi{{nilState}, {nilDoc}, {nil}} {
		require.NotPanics(t, func() {
			_, err := orchestrator.NewEtcdWorker(cli, "/app", reactor, m)
			require.Error(t, err)
		})
	}
}
