package orchestrator

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// TestFencingLossEndsIdleRun: a worker fenced with WithFencingKey that never
// commits learns of the loss of its key from the periodic fencing check, not
// only from a failed commit: Run returns ErrNotOwner within about one
// progress interval (WithMaxStaleness/4) once the key is deleted, or
// recreated with another create revision. A fencing key the worker may not
// read ends Run as a rejection (ErrEtcdRejected, permission denied), not as
// a loss.
func TestFencingLossEndsIdleRun(t *testing.T) {
	t.Parallel()
	const (
		prefix    = "/fencing-loss/data"
		staleness = 2 * time.Second // progress interval: 500ms
		bound     = 3 * time.Second
	)
	env := newTestEnv(t, ownServer(), withAuth(prefix, "/fencing-loss/owner"))
	for _, tc := range []struct {
		name   string
		user   string // "" for root
		key    string
		depose func(ctx context.Context, t *testing.T, key string)
		want   []error
	}{
		{name: "key deleted", key: "/fencing-loss/owner/a", depose: func(ctx context.Context, t *testing.T, key string) {
			_, err := env.cli.Delete(ctx, key)
			require.NoError(t, err)
		}, want: []error{ErrNotOwner}},
		{name: "key recreated", key: "/fencing-loss/owner/b", depose: func(ctx context.Context, t *testing.T, key string) {
			_, err := env.cli.Delete(ctx, key)
			require.NoError(t, err)
			_, err = env.cli.Put(ctx, key, "another owner")
			require.NoError(t, err)
		}, want: []error{ErrNotOwner}},
		{name: "key not readable", user: "reader-writer", key: "/fencing-loss/secret",
			want: []error{ErrEtcdRejected, rpctypes.ErrPermissionDenied}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testContext(t)
			put, err := env.cli.Put(ctx, tc.key, "owner")
			require.NoError(t, err)
			cli := env.cli
			if tc.user != "" {
				cli = env.userClient(t, tc.user, "pw")
			}
			var ticks atomic.Int64
			idle := countingReactor(&ticks)
			w, err := NewEtcdWorker(cli, prefix, idle, newMapState(prefix),
				WithFencingKey(tc.key, put.Header.Revision), WithMaxStaleness(staleness))
			require.NoError(t, err)
			runCtx, cancel := context.WithCancel(ctx)
			defer cancel()
			done := runAsync(runCtx, w, nil, 10*time.Millisecond, "fencing-loss")

			start := time.Now()
			if tc.depose != nil {
				waitUntil(ctx, t, "ticks", func() bool { return ticks.Load() >= 5 })
				start = time.Now()
				tc.depose(ctx, t, tc.key)
			}
			err = recvErr(contextWithin(t, bound+5*time.Second), t, done)
			took := time.Since(start)
			for _, want := range tc.want {
				require.ErrorIs(t, err, want)
			}
			require.Less(t, took, bound)
			t.Logf("Run returned after %v (%d ticks): %v", took, ticks.Load(), err)
			resp, err := env.cli.Get(ctx, prefix+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
			require.NoError(t, err)
			require.Zero(t, resp.Count, "the idle worker wrote nothing")
		})
	}
}
