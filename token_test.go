package orchestrator

import (
	"context"
	"fmt"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// commitTokens returns the commit token keys under prefix, with their leases.
func commitTokens(ctx context.Context, t *testing.T, cli *clientv3.Client, prefix string) map[string]clientv3.LeaseID {
	t.Helper()
	resp, err := cli.Get(ctx, keysOf(prefix).tokenKey(""), clientv3.WithPrefix())
	require.NoError(t, err)
	out := map[string]clientv3.LeaseID{}
	for _, kv := range resp.Kvs {
		out[string(kv.Key)] = clientv3.LeaseID(kv.Lease)
	}
	return out
}

// ownCommit is a reactor that puts key once and reports when its state
// shows it.
func ownCommit(key string, done chan<- struct{}) Reactor {
	var emitted, reported bool
	return ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		if !emitted {
			emitted = true
			st.patches = append(st.patches, []DataPatch{setPatch(st.key(key), []byte("v"))})
		} else if _, ok := st.values[key]; ok && !reported {
			reported = true
			done <- struct{}{}
		}
		return st, nil
	})
}

// TestCommitTokensDoNotAccumulate: without a session, every Run's commit
// token lives on a lease the worker keeps alive. Runs killed without
// cleanup (their link to etcd is gone before they stop) leave their tokens
// for at most the lease TTL; a clean stop deletes the token at once.
func TestCommitTokensDoNotAccumulate(t *testing.T) {
	t.Parallel()
	const (
		prefix = "/test/tokens"
		runs   = 20
		ttl    = 5 * time.Second
	)
	direct := sharedClient(t)
	ctx := contextWithin(t, 30*time.Second)

	t.Run("clean stop", func(t *testing.T) {
		done := make(chan struct{}, 1)
		w := mustNewEtcdWorker(t, direct, prefix+"-clean", ownCommit("/k", done), newMapState(prefix+"-clean"))
		runCtx, stop := context.WithCancel(ctx)
		errc := runAsync(runCtx, w, nil, 20*time.Millisecond, "run")
		awaitSignal(ctx, t, done, "the worker sees its commit")
		require.Len(t, commitTokens(ctx, t, direct, prefix+"-clean"), 1)
		stop()
		require.ErrorIs(t, recvErr(ctx, t, errc), context.Canceled)
		require.Empty(t, commitTokens(ctx, t, direct, prefix+"-clean"), "a clean stop must delete the token")
	})

	t.Run("killed runs", func(t *testing.T) {
		killable := newTestEnv(t, withProxy()) //nolint:contextcheck // the proxy lives as long as the subtest
		done := make(chan struct{}, runs)
		workers := make([]*EtcdWorker, runs)
		for i := range workers {
			cli := killable.client(t)
			workers[i] = mustNewEtcdWorker(t, cli, prefix, ownCommit("/k-"+strconv.Itoa(i), done), newMapState(prefix),
				WithCommitTokenTTL(ttl))
		}
		g := newWorkerGroup(t, 30*time.Second) // after the clients: its cleanup joins the runs before they close
		for i, w := range workers {
			g.runWorkerEvery(fmt.Sprintf("killed-%d", i), w, 50*time.Millisecond)
		}
		committed, cancelCommitted := context.WithTimeout(ctx, 10*time.Second)
		for range runs {
			awaitSignal(committed, t, done, "not every run committed")
		}
		cancelCommitted()
		require.Len(t, commitTokens(ctx, t, direct, prefix), runs)
		// Kill: the link goes first, so no cleanup reaches etcd.
		killable.proxy.Blackhole()
		killable.proxy.Close()
		killed := time.Now()
		results := g.stop(t)
		require.Len(t, results, runs)
		for name, err := range results {
			require.ErrorIs(t, err, context.Canceled, "run %s", name)
		}
		// The runs stopped well within the lease TTL, so a token missing now
		// was deleted by a cleanup that should not have reached etcd.
		stopped := time.Since(killed)
		require.Less(t, stopped, ttl/2, "the killed runs took long to stop")
		require.Len(t, commitTokens(ctx, t, direct, prefix), runs, "the killed runs' tokens outlive them (stopped in %v)", stopped)
		expiry, cancelExpiry := context.WithTimeout(ctx, ttl+5*time.Second)
		defer cancelExpiry()
		waitUntil(expiry, t, "the tokens of killed runs expiring with their lease",
			func() bool { return len(commitTokens(ctx, t, direct, prefix)) == 0 })
		t.Logf("tokens gone %v after the kill (TTL %v)", time.Since(killed), ttl)
	})
}

// TestCommitTokenLeaseLoss: when the token's lease is gone while a commit's
// outcome is unknown, nothing can tell whether it landed: Run returns
// ErrCommitUnresolved and never re-runs the group. When it is gone with
// nothing in flight, the next commit is rejected whole and lands once on a
// new lease.
func TestCommitTokenLeaseLoss(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	for _, inFlight := range []bool{true, false} {
		t.Run(fmt.Sprintf("in flight=%v", inFlight), func(t *testing.T) {
			leaseLossCase(t, env, inFlight)
		})
	}
}

func leaseLossCase(t *testing.T, env *testEnv, inFlight bool) {
	direct := env.cli
	prefix := fmt.Sprintf("/test/lease-loss-%v", inFlight)
	ctx := contextWithin(t, 20*time.Second)
	revokeOwn := func() error { // revoke the worker's token lease
		for _, id := range commitTokens(ctx, t, direct, prefix) {
			if _, err := direct.Revoke(ctx, id); err != nil {
				return err
			}
		}
		return nil
	}
	var armed atomic.Bool
	cli := env.client(t, grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string,
		req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption,
	) error {
		_, ok := asCommitTxn(req)
		if !ok || !armed.CompareAndSwap(true, false) {
			return invoker(ctx, method, req, reply, cc, opts...)
		}
		if err := invoker(ctx, method, req, reply, cc, opts...); err != nil {
			return err
		}
		// The commit landed; its answer is lost, and the token's lease
		// expires during the outage.
		if err := revokeOwn(); err != nil {
			return err
		}
		return status.Error(codes.Unavailable, "injected: answer lost")
	}))

	var runs, ticks atomic.Int64
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		switch ticks.Add(1) {
		case 1: // a first commit, so the run has a token and a lease
			st.patches = append(st.patches, []DataPatch{incrPatch(st.key("/n"), 1)})
		case 2:
			if inFlight {
				armed.Store(true)
			} else if err := revokeOwn(); err != nil {
				return st, err
			}
			st.patches = append(st.patches, []DataPatch{SingleDataPatch{Key: st.key("/n"),
				Func: func(old []byte) ([]byte, bool, error) {
					runs.Add(1)
					return []byte(strconv.FormatInt(mustInt(t, old)+1, 10)), true, nil
				}}})
		default:
			return st, ErrReactorFinished
		}
		return st, nil
	})
	w := mustNewEtcdWorker(t, cli, prefix, reactor, newMapState(prefix), WithRequestTimeout(time.Second))
	start := time.Now()
	err := w.Run(ctx, nil, 20*time.Millisecond, "lease-loss")
	t.Logf("Run returned after %v: %v", time.Since(start), err)
	resp, gerr := direct.Get(ctx, prefix+"/n")
	require.NoError(t, gerr)
	require.Len(t, resp.Kvs, 1)
	require.Equal(t, "2", string(resp.Kvs[0].Value), "the group must land exactly once")
	if inFlight {
		require.ErrorIs(t, err, ErrCommitUnresolved)
		require.EqualValues(t, 1, runs.Load(), "an unresolved group must not be re-run")
		return
	}
	require.NoError(t, err)
	require.Empty(t, commitTokens(ctx, t, direct, prefix), "the new lease is revoked when Run returns")
}
