package orchestrator

// How Run ends when a stop and a loss meet (docs/DESIGN.md "How Run ends"):
// the caller's shutdown (cancel, then close the client or the session), a
// session made with Run's own ctx, and a finish racing a cancel. Each test
// is bounded by a context deadline and runs against real embedded etcd.

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/client/v3/concurrency"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// isTokenPut reports whether req is the worker's put of its commit token
// (ensureToken): a Txn of one compare whose Then puts the token.
func isTokenPut(req any) bool {
	tr, ok := req.(*etcdserverpb.TxnRequest)
	if !ok || len(tr.Compare) != 1 {
		return false
	}
	return tokenKeyOf(tr) != ""
}

// TestStopCancelThenCloseDuringFirstTokenPut: the caller's documented
// shutdown (cancel Run's ctx, then close the client at once) while the
// worker's first commit puts its commit token. Nothing is unresolved (the
// token put is no commit), and the stop was requested: IsCleanStop must
// hold, as in TestACancelThenAClosedClientIsACleanStop.
func TestStopCancelThenCloseDuringFirstTokenPut(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := contextWithin(t, 20*time.Second)
	const prefix = "/test/stop/cancel-close-token-put"
	clearPrefix(ctx, t, env.cli, prefix)

	entered, closed := make(chan struct{}), make(chan struct{})
	var fired atomic.Bool
	hook := grpc.WithChainUnaryInterceptor(func(c context.Context, method string, req, reply any,
		cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption,
	) error {
		if isTokenPut(req) && fired.CompareAndSwap(false, true) {
			close(entered)
			select { // etcd is slow to answer: the cancel comes first
			case <-c.Done():
			case <-time.After(5 * time.Second):
			}
			select { // ... and the caller closes the client right after it
			case <-closed:
			case <-time.After(5 * time.Second):
			}
			return status.FromContextError(c.Err()).Err()
		}
		return invoker(c, method, req, reply, cc, opts...)
	})
	cli := env.client(t, hook)
	var emitted atomic.Int64
	w := mustNewEtcdWorker(t, cli, prefix, counterReactor(&emitted), newMapState(prefix), WithLogger(faultLogger(t)))
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := runAsync(runCtx, w, nil, behaviourTick, "stop")
	awaitSignal(ctx, t, entered, "the token put")
	cancel()
	require.NoError(t, cli.Close())
	close(closed)
	runErr := recvErr(ctx, t, done)
	t.Logf("Run: %v", runErr)
	require.ErrorIs(t, runErr, context.Canceled)
	require.NotErrorIs(t, runErr, ErrCommitUnresolved)
	require.True(t, IsCleanStop(runErr), "a requested stop (cancel, then close the client) reported as a failure: %v", runErr)
}

// TestStopSessionClosedRightAfterCancelDuringACommit: the caller's
// shutdown with a session: cancel Run's ctx, then Close the session (which
// revokes its lease). A commit in flight reaches etcd after the revoke and is
// rejected whole (lease not found): nothing landed, nothing is unknown, the
// session ended after the cancel (DESIGN: only a loss seen while ctx was
// alive wins over a later cancel). A requested stop.
func TestStopSessionClosedRightAfterCancelDuringACommit(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := contextWithin(t, 20*time.Second)
	const prefix = "/test/stop/session-closed-after-cancel"
	clearPrefix(ctx, t, env.cli, prefix)
	sessionClosed := make(chan struct{})
	entered := make(chan struct{})
	hook := &answerHook{fn: func(_ context.Context, _ *etcdserverpb.TxnRequest, invoke func() error) error {
		close(entered)
		select { // the commit reaches etcd late, after the caller's shutdown
		case <-sessionClosed:
		case <-time.After(5 * time.Second):
		}
		return invoke()
	}}
	session, err := concurrency.NewSession(env.client(t), concurrency.WithTTL(30))
	require.NoError(t, err)
	var emitted atomic.Int64
	w := mustNewEtcdWorker(t, env.client(t, hook.dialOption()), prefix, counterReactor(&emitted), newMapState(prefix),
		WithLogger(faultLogger(t)))
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := runAsync(runCtx, w, session, behaviourTick, "stop")
	waitWithin(t, 10*time.Second, "commits", nil, func() bool { return emitted.Load() >= 3 })
	hook.armed.Store(true)
	awaitSignal(ctx, t, entered, "the commit")
	cancel()
	require.NoError(t, session.Close())
	close(sessionClosed)
	runErr := recvErr(ctx, t, done)
	t.Logf("Run: %v", runErr)
	require.ErrorIs(t, runErr, context.Canceled)
	require.NotErrorIs(t, runErr, ErrCommitUnresolved, "a commit rejected whole is no unknown outcome")
	require.True(t, IsCleanStop(runErr), "a requested stop (cancel, then close the session) reported as a failure: %v", runErr)
}

// TestStopSessionOfRunsCtxDuringAResolution: the session is made with
// concurrency.WithContext(runCtx). A commit lands, its answer is lost, Run's
// ctx is cancelled, and the first fence fails transiently. The session's
// lease is alive (a cancel only stops its keep-alive) and etcd answers, so
// the worker can resolve within WithShutdownTimeout: a clean stop. Whatever
// the verdict, a Run that ends with the session "done" while an outage
// outcome is unknown must say ErrCommitUnresolved (README, the session row).
func TestStopSessionOfRunsCtxDuringAResolution(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := contextWithin(t, 20*time.Second)
	const prefix = "/test/stop/session-of-run-ctx-resolution"
	clearPrefix(ctx, t, env.cli, prefix)
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()

	var session *concurrency.Session
	var fenceFailed atomic.Bool
	hook := &answerHook{}
	hook.fn = func(_ context.Context, _ *etcdserverpb.TxnRequest, invoke func() error) error {
		if err := invoke(); err != nil { // it lands
			return err
		}
		cancel()
		select {
		case <-session.Done(): // the keep-alive stopped with runCtx
		case <-time.After(5 * time.Second):
		}
		return status.Error(codes.Unavailable, "test: the answer was lost")
	}
	fenceHook := grpc.WithChainUnaryInterceptor(func(c context.Context, method string, req, reply any,
		cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption,
	) error {
		if hook.fired.Load() && isTokenPut(req) && fenceFailed.CompareAndSwap(false, true) {
			return status.Error(codes.Unavailable, "test: the first fence failed")
		}
		return invoker(c, method, req, reply, cc, opts...)
	})
	cli := env.client(t, hook.dialOption(), fenceHook)
	var err error
	session, err = concurrency.NewSession(cli, concurrency.WithTTL(30), concurrency.WithContext(runCtx))
	require.NoError(t, err)
	defer session.Close()
	var emitted atomic.Int64
	w := mustNewEtcdWorker(t, cli, prefix, counterReactor(&emitted), newMapState(prefix),
		WithLogger(faultLogger(t)), WithShutdownTimeout(3*time.Second))
	done := runAsync(runCtx, w, session, behaviourTick, "stop")
	waitWithin(t, 10*time.Second, "commits", nil, func() bool { return emitted.Load() >= 3 })
	hook.armed.Store(true)
	runErr := recvErr(ctx, t, done)
	t.Logf("Run: %v", runErr)
	require.True(t, hook.fired.Load())
	require.True(t, fenceFailed.Load(), "the first fence was sent")
	require.ErrorIs(t, runErr, context.Canceled)
	if errors.Is(runErr, ErrEtcdSessionDone) {
		require.ErrorIs(t, runErr, ErrCommitUnresolved, "Run gave up a resolution on the session and did not say the commit is unresolved: %v", runErr)
	}
	require.True(t, IsCleanStop(runErr), "a requested stop (the lease alive, etcd answering) reported as a failure: %v", runErr)
}

// TestStopSessionWithRunsCtxCancelIsClean: the session is made with
// concurrency.WithContext(runCtx), the same ctx as Run's. Cancelling it is a
// requested stop, whichever of runCtx's children (the session's, the
// worker's own r.ctx) the cancel reaches first. "busy ctx": runCtx also has
// 100k other derived contexts (the caller's requests), so the cancel takes a
// while to reach each child. k of n.
func TestStopSessionWithRunsCtxCancelIsClean(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		children int
		n        int
	}{{"plain", 0, 40}, {"busy ctx", 100_000, 8}} {
		t.Run(tc.name, func(t *testing.T) {
			env := newTestEnv(t)
			ctx := contextWithin(t, 60*time.Second)
			var bad []string
			for i := range tc.n {
				prefix := fmt.Sprintf("/test/stop/session-with-run-ctx/%d/%d", tc.children, i)
				runCtx, cancel := context.WithCancel(ctx)
				var cancels []context.CancelFunc
				for range tc.children {
					_, c := context.WithCancel(runCtx)
					cancels = append(cancels, c)
				}
				session, err := concurrency.NewSession(env.cli, concurrency.WithTTL(30), concurrency.WithContext(runCtx))
				require.NoError(t, err)
				var ticks atomic.Int64
				w := mustNewEtcdWorker(t, env.cli, prefix, countingReactor(&ticks), newMapState(prefix))
				done := runAsync(runCtx, w, session, behaviourTick, "stop")
				waitWithin(t, 10*time.Second, "ticks", nil, func() bool { return ticks.Load() >= 3 })
				cancel()
				runErr := recvErr(ctx, t, done)
				for _, c := range cancels {
					c()
				}
				_ = session.Close()
				require.ErrorIs(t, runErr, context.Canceled)
				if !IsCleanStop(runErr) {
					bad = append(bad, runErr.Error())
				}
			}
			if len(bad) > 0 {
				t.Logf("first: %s", bad[0])
			}
			require.Empty(t, bad, "%d of %d requested stops (cancel of Run's ctx, whose session ends with it) reported as failures", len(bad), tc.n)
		})
	}
}

// TestStopSharedSourceClientClosedAfterCancel: a worker on its own client
// and a shared Source on another; the caller cancels the worker, then
// closes the Source's client; the worker was in a slow Tick. A requested
// stop. Also no goroutine of the package left once Run returned.
func TestStopSharedSourceClientClosedAfterCancel(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := contextWithin(t, 20*time.Second)
	const prefix = "/test/stop/shared-source-close"
	srcCli := env.client(t)
	src, err := NewSource(srcCli, prefix)
	require.NoError(t, err)
	inTick := make(chan struct{})
	var ticks atomic.Int64
	r := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		if ticks.Add(1) == 3 {
			close(inTick)
			time.Sleep(300 * time.Millisecond) // busy, not looking at ctx
		}
		st := s.(*mapState)
		st.patches = append(st.patches, []DataPatch{incrPatch(st.key("/n"), 1)})
		return st, nil
	})
	w := mustNewEtcdWorker(t, env.client(t), prefix, r, newMapState(prefix), WithSource(src), WithLogger(faultLogger(t)))
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := runAsync(runCtx, w, nil, behaviourTick, "stop")
	awaitSignal(ctx, t, inTick, "the slow Tick")
	cancel()
	require.NoError(t, srcCli.Close())
	runErr := recvErr(ctx, t, done)
	t.Logf("Run: %v", runErr)
	require.ErrorIs(t, runErr, context.Canceled)
	require.True(t, IsCleanStop(runErr), "%v", runErr)
}

// TestStopFinishedRacingACancel: Tick returns ErrReactorFinished with a
// final patch, and Run's ctx is cancelled as it returns: Run returns nil
// (the patch landed) or ctx's error, and either is a clean stop.
func TestStopFinishedRacingACancel(t *testing.T) {
	cli := sharedClient(t)
	ctx := contextWithin(t, 30*time.Second)
	for i := range 20 {
		prefix := fmt.Sprintf("/test/stop/finished-cancel/%d", i)
		runCtx, cancel := context.WithCancel(ctx)
		r := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
			st := s.(*mapState)
			st.patches = append(st.patches, []DataPatch{incrPatch(st.key("/n"), 1)})
			if i%2 == 0 {
				cancel()
			} else {
				go cancel()
			}
			return st, ErrReactorFinished
		})
		w := mustNewEtcdWorker(t, cli, prefix, r, newMapState(prefix))
		before := workerGoroutines()
		err := w.Run(runCtx, nil, behaviourTick, "stop")
		cancel()
		if err != nil {
			require.ErrorIs(t, err, context.Canceled)
		}
		require.True(t, IsCleanStop(err), "run %d: %v", i, err)
		left := goroutinesLeftBy(before)
		require.Empty(t, left, "run %d: %s", i, strings.Join(left, "\n\n"))
	}
}
