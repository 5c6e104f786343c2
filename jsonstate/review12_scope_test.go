package jsonstate_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/jsonstate"
)

// TestScopeEdgesOfPrefixes: root, empty and slash-terminated worker
// prefixes, siblings sharing a name prefix, and the reserved area.
func TestScopeEdgesOfPrefixes(t *testing.T) {
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
		{"doc at the worker dir itself", "/app", jsonstate.NewDoc[int]("/app/"), false},
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

// TestMultiWithNilPartDoesNotPanic: a Multi holding a typed nil
// State is bad input; NewEtcdWorker must return an error, not panic.
func TestMultiWithNilPartDoesNotPanic(t *testing.T) {
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
