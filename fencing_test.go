package orchestrator

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// fenceFixture is a leader elected with concurrency.Election whose worker
// increments /n under its prefix in every Tick.
type fenceFixture struct {
	prefix   string
	env      *testEnv // its proxy is between the leader (session and worker) and etcd
	session  *concurrency.Session
	election *concurrency.Election
	deleted  chan int64 // the revision at which the leader key was deleted
	groups   atomic.Int64
}

// newFenceFixture elects a leader on a client behind its own proxy and
// watches (directly) for the deletion of its key.
func newFenceFixture(ctx context.Context, t testing.TB, srv etcdtest.Target, name string, ttl int) *fenceFixture {
	t.Helper()
	env := newTestEnv(t, onServer(srv), withProxy()) //nolint:contextcheck // the proxy lives as long as the test
	f := &fenceFixture{prefix: "/fence/" + name, env: env, deleted: make(chan int64, 1)}
	cli := f.env.client(t)
	s, err := concurrency.NewSession(cli, concurrency.WithTTL(ttl))
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	f.session = s
	f.election = concurrency.NewElection(s, "/elections/"+name)
	require.NoError(t, f.election.Campaign(ctx, "old leader"))

	wctx, cancel := context.WithCancel(ctx)
	t.Cleanup(cancel)
	wch := f.env.cli.Watch(wctx, f.election.Key(), clientv3.WithRev(f.election.Rev()))
	go func() {
		for resp := range wch {
			for _, ev := range resp.Events {
				if ev.Type == clientv3.EventTypeDelete {
					f.deleted <- ev.Kv.ModRevision
					cancel()
					return
				}
			}
		}
	}()
	return f
}

// worker returns the leader's worker, fenced on its election key or not.
func (f *fenceFixture) worker(t testing.TB, reg prometheus.Registerer, fenced bool) *EtcdWorker {
	t.Helper()
	state := newMapState(f.prefix)
	reactor := counterReactor(&f.groups)
	opts := faultOptions(reg, faultLogger(t))
	if fenced {
		opts = append(opts, WithFencingKey(f.election.Key(), f.election.Rev()))
	}
	cli := f.env.client(t)
	w := mustNewEtcdWorker(t, cli, f.prefix, reactor, state, opts...)
	return w
}

// deletedRev waits for the deletion of the leader key.
func (f *fenceFixture) deletedRev(t testing.TB) int64 {
	t.Helper()
	select {
	case rev := <-f.deleted:
		return rev
	case <-time.After(20 * time.Second):
		t.Fatal("the leader key was not deleted")
		return 0
	}
}

// lastWrite returns the newest mod revision of the keys under the prefix.
func (f *fenceFixture) lastWrite(ctx context.Context, t testing.TB, direct *clientv3.Client) int64 {
	t.Helper()
	kvs, _ := userKVs(ctx, t, direct, f.prefix, 0)
	var last int64
	for _, kv := range kvs {
		last = max(last, kv.modRev)
	}
	return last
}

// TestFencedLeaderWritesNothingAfterItsKeyIsGone: a leader elected with
// concurrency.Election runs a worker fenced on its election key
// (WithFencingKey(Key(), Rev())) that writes in every Tick. It loses leadership: its key is deleted, it resigns, its
// session is closed, or its session expires while it is cut off from etcd
// (and a new leader is elected meanwhile). Fenced, no write of the old
// leader lands after its key was deleted and Run returns ErrNotOwner. The
// unfenced control shows the deposed leader can still write, so the check
// has teeth.
func TestFencedLeaderWritesNothingAfterItsKeyIsGone(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, ownServer())
	direct := env.cli
	deposers := []struct {
		name string
		ttl  int
		// depose ends f's leadership; it returns once the deposed worker
		// can reach etcd again.
		depose func(ctx context.Context, t testing.TB, f *fenceFixture)
	}{
		{name: "key deleted", ttl: 60, depose: func(ctx context.Context, t testing.TB, f *fenceFixture) {
			_, err := direct.Delete(ctx, f.election.Key())
			require.NoError(t, err)
		}},
		{name: "resigned", ttl: 60, depose: func(ctx context.Context, t testing.TB, f *fenceFixture) {
			require.NoError(t, f.election.Resign(ctx))
		}},
		{name: "session closed", ttl: 60, depose: func(_ context.Context, t testing.TB, f *fenceFixture) {
			require.NoError(t, f.session.Close())
		}},
		{name: "session expired while cut off", ttl: 2, depose: func(_ context.Context, t testing.TB, f *fenceFixture) {
			f.env.proxy.Pause()
			rev := f.deletedRev(t) // the lease expired
			f.deleted <- rev
			f.env.proxy.Resume()
		}},
	}
	for _, d := range deposers {
		for _, fenced := range []bool{true, false} {
			name := d.name + map[bool]string{true: "/fenced", false: "/unfenced control"}[fenced]
			t.Run(name, func(t *testing.T) {
				ctx := testContext(t)
				id := fmt.Sprintf("%s-%v", d.name, fenced)
				f := newFenceFixture(ctx, t, env.srv, id, d.ttl)
				reg := prometheus.NewRegistry()
				w := f.worker(t, reg, fenced)
				g := newWorkerGroup(t, time.Minute)
				g.runWorker("leader", w)
				waitWithin(t, faultProgressTimeout, "the leader writes", g.failed, func() bool { return f.groups.Load() >= 5 })

				d.depose(ctx, t, f)
				deletedAt := f.deletedRev(t)
				// A new leader takes over.
				s2, err := concurrency.NewSession(direct)
				require.NoError(t, err)
				defer func() { _ = s2.Close() }()
				require.NoError(t, concurrency.NewElection(s2, "/elections/"+id).Campaign(ctx, "new leader"))

				if fenced {
					results := g.wait(t, 20*time.Second)
					require.ErrorIs(t, results["leader"], ErrNotOwner)
					last := f.lastWrite(ctx, t, direct)
					require.Less(t, last, deletedAt, "a write of the deposed leader landed after its key was deleted")
					require.Positive(t, metricSum(t, reg, "orchestrator_commits_total"))
					return
				}
				waitWithin(t, faultProgressTimeout, "the unfenced deposed leader writes", g.failed, func() bool {
					return f.lastWrite(ctx, t, direct) > deletedAt
				})
				g.cancel()
				require.ErrorIs(t, g.wait(t, 20*time.Second)["leader"], context.Canceled)
			})
		}
	}
}

// TestSessionRevoked: the lease of the session given to Run is revoked. Run
// returns ErrEtcdSessionDone within a bound — a writing worker at its next
// commit (its commit token is written with the lease), an idle one when the
// session notices (its keep-alive) — and no write lands after the
// revocation.
func TestSessionRevoked(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	direct := env.cli
	const bound = 5 * time.Second
	for _, tc := range []struct {
		name    string
		writing bool
		ttl     int
	}{
		{name: "writing", writing: true, ttl: 60},
		{name: "idle", writing: false, ttl: 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testContext(t)
			prefix := "/session/" + tc.name
			cli := env.client(t)
			s, err := concurrency.NewSession(cli, concurrency.WithTTL(tc.ttl))
			require.NoError(t, err)
			t.Cleanup(func() { _ = s.Close() })
			var ticks atomic.Int64
			reactor := ReactorFunc(func(_ context.Context, st ReactorState) (ReactorState, error) {
				ms := st.(*mapState)
				ticks.Add(1)
				if tc.writing {
					ms.patches = append(ms.patches, []DataPatch{incrPatch(ms.key("/n"), 1)})
				}
				return ms, nil
			})
			w := mustNewEtcdWorker(t, cli, prefix, reactor, newMapState(prefix), faultOptions(prometheus.NewRegistry(), faultLogger(t))...)
			g := newWorkerGroup(t, time.Minute)
			g.run("worker", func(ctx context.Context) error { return w.Run(ctx, s, faultInterval, tc.name) })
			waitWithin(t, faultProgressTimeout, "ticks", g.failed, func() bool { return ticks.Load() >= 5 })

			resp, err := direct.Revoke(ctx, s.Lease())
			require.NoError(t, err)
			revokedAt := time.Now()
			results := g.wait(t, bound+5*time.Second)
			took := time.Since(revokedAt)
			require.ErrorIs(t, results["worker"], ErrEtcdSessionDone)
			require.Less(t, took, bound, "Run noticed the revoked session too late")
			kvs, _ := userKVs(ctx, t, direct, prefix, 0)
			for k, kv := range kvs {
				require.Less(t, kv.modRev, resp.Header.Revision, "%s was written after the revocation", k)
			}
			if tc.writing {
				require.NotEmpty(t, kvs)
			}
			t.Logf("Run returned %v after %v", results["worker"], took)
		})
	}
}
