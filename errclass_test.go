package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/client/v3/concurrency"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/util"
)

// TestClassifyTxnError: clientv3 turns etcd server errors into
// rpctypes.EtcdError, which has no gRPC status, so rejections must be
// recognised by value; otherwise a permission error is taken for an unknown
// outcome and resolve loops on it. Transient errors (an expired auth token
// that the client refreshes, no leader, too many requests) stay retryable.
func TestClassifyTxnError(t *testing.T) {
	t.Parallel()
	fatal := []error{rpctypes.ErrPermissionDenied, rpctypes.ErrUserEmpty, rpctypes.ErrAuthFailed,
		rpctypes.ErrTooManyOps, rpctypes.ErrRequestTooLarge, rpctypes.ErrLeaseNotFound}
	for _, e := range fatal {
		t.Run("fatal "+fmt.Sprint(e), func(t *testing.T) {
			require.Error(t, commitRejected(nil, e), "%v classified as unknown outcome", e)
		})
	}
	retryable := []error{rpctypes.ErrInvalidAuthToken, rpctypes.ErrNoLeader, rpctypes.ErrTooManyRequests,
		rpctypes.ErrTimeout, context.DeadlineExceeded, errors.New("connection reset")}
	for _, e := range retryable {
		t.Run("retryable "+fmt.Sprint(e), func(t *testing.T) {
			require.NoError(t, commitRejected(nil, e))
		})
	}
	require.ErrorIs(t, commitRejected(nil, rpctypes.ErrTooManyOps), ErrEtcdTxnOpsExceed)
	require.ErrorIs(t, commitRejected(nil, rpctypes.ErrRequestTooLarge), ErrEtcdTxnSizeExceed)
	require.ErrorIs(t, commitRejected(nil, rpctypes.ErrLeaseNotFound), ErrEtcdSessionDone)
}

// rejectPrompt bounds how long Run may take to return after a permanent
// rejection.
const rejectPrompt = 5 * time.Second

// returnsPromptly is recvErr bounded by rejectPrompt after since (and by
// ctx): it fails the test if Run takes longer than that to return.
func returnsPromptly(ctx context.Context, t *testing.T, errc <-chan error, since time.Time) error {
	t.Helper()
	ctx, cancel := context.WithDeadline(ctx, since.Add(rejectPrompt))
	defer cancel()
	err := recvErr(ctx, t, errc)
	t.Logf("Run returned after %v: %v", time.Since(since), err)
	return err
}

// TestPermanentErrorsEndRun: rejections that retrying cannot heal end Run
// promptly with an error matching ErrEtcdRejected and etcd's own error,
// whichever path meets them: the load (a user without rights), the watch
// or the head probe (read right revoked while running), a commit (write
// right revoked), or a closed client.
func TestPermanentErrorsEndRun(t *testing.T) {
	t.Parallel()
	const prefix = "/test/auth"
	env := newTestEnv(t, ownServer(), withAuth(prefix))
	ctx := contextWithin(t, 30*time.Second)
	permissionDenied(ctx, t, env, prefix)
	t.Run("closed client", func(t *testing.T) { closedClientCase(ctx, t, env, prefix) })
	t.Run("closed client during a commit", func(t *testing.T) { closedDuringCommitCase(ctx, t, env, prefix) })
}

// permissionDenied runs a worker without rights, and workers whose read or
// write right is revoked while they run: each Run ends promptly with an
// error matching ErrEtcdRejected and rpctypes.ErrPermissionDenied, on the
// path that met the rejection (also run by the server matrix).
func permissionDenied(ctx context.Context, t *testing.T, env *testEnv, prefix string) {
	opts := []Option{WithMaxStaleness(time.Second), WithRequestTimeout(2 * time.Second)}
	t.Run("no rights: the load", func(t *testing.T) {
		w := mustNewEtcdWorker(t, env.userClient(t, "nobody", "pw"), prefix, &incrWriter{}, newMapState(prefix), opts...)
		err := returnsPromptly(ctx, t, runAsync(ctx, w, nil, 20*time.Millisecond, "run"), time.Now())
		require.ErrorIs(t, err, ErrEtcdRejected)
		require.ErrorIs(t, err, rpctypes.ErrPermissionDenied)
		require.Contains(t, err.Error(), "load")
	})
	for _, tc := range []struct {
		name, role, path string
	}{
		{"read revoked: the watch or probe", "r", "probe|watch"},
		{"write revoked: the commit", "w", "commit"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			revokedCase(ctx, t, env, prefix, tc.role, tc.path, opts)
		})
	}
}

// revokedCase runs a worker as reader-writer, lets it commit once, then
// revokes role and checks that Run ends promptly on the path named by the
// regexp path.
func revokedCase(ctx context.Context, t *testing.T, env *testEnv, prefix, role, path string, opts []Option) {
	for _, granted := range []string{"r", "w"} { // back from an earlier case
		_, err := env.cli.UserGrantRole(ctx, "reader-writer", granted)
		require.NoError(t, err)
	}
	r := &incrWriter{}
	w := mustNewEtcdWorker(t, env.userClient(t, "reader-writer", "pw"), prefix, r, newMapState(prefix), opts...)
	errc := runAsync(ctx, w, nil, 20*time.Millisecond, "run")
	// One commit first, so the run has its token and lease.
	before := r.seen.Load()
	r.writes.Store(1)
	firstCtx, cancelFirst := context.WithTimeout(ctx, 5*time.Second)
	defer cancelFirst()
	waitUntil(firstCtx, t, "the first commit seen", func() bool { return r.seen.Load() > before })

	// Another client keeps the watch busy: the worker must find out
	// even though its watch is never silent.
	busyCtx, stopBusy := context.WithCancel(ctx)
	busyDone := make(chan struct{})
	defer func() { stopBusy(); <-busyDone }()
	go func() {
		defer close(busyDone)
		for busyCtx.Err() == nil {
			_, _ = env.cli.Put(busyCtx, prefix+"/busy", time.Now().String())
			time.Sleep(30 * time.Millisecond) // fault timing: a steady writer keeps the watch busy
		}
	}()
	start := time.Now()
	_, err := env.cli.UserRevokeRole(ctx, "reader-writer", role)
	require.NoError(t, err)
	if role == "w" {
		r.writes.Store(1)
	}
	err = returnsPromptly(ctx, t, errc, start)
	require.ErrorIs(t, err, ErrEtcdRejected)
	require.ErrorIs(t, err, rpctypes.ErrPermissionDenied)
	require.Regexp(t, path, err.Error())
	require.Less(t, time.Since(start), 2*time.Second, "the probe runs every 250ms")
}

// closedClientCase closes the worker's client before Run and while it
// runs (default request timeout: Run must not wait for it).
func closedClientCase(ctx context.Context, t *testing.T, env *testEnv, prefix string) {
	for _, whileRunning := range []bool{false, true} {
		cli := env.userClient(t, "root", "rootpw")
		w := mustNewEtcdWorker(t, cli, prefix, &incrWriter{}, newMapState(prefix))
		var errc <-chan error
		if whileRunning {
			errc = runAsync(ctx, w, nil, 20*time.Millisecond, "run")
			time.Sleep(100 * time.Millisecond) // fault timing: close while it loads and starts its watch
		}
		start := time.Now()
		require.NoError(t, cli.Close())
		if !whileRunning {
			errc = runAsync(ctx, w, nil, 20*time.Millisecond, "run")
		}
		err := returnsPromptly(ctx, t, errc, start)
		require.ErrorIs(t, err, ErrEtcdRejected, "while running: %v", whileRunning)
		require.Less(t, time.Since(start), time.Second, "while running: %v", whileRunning)
	}
}

// closedDuringCommitCase closes the worker's client while a commit Txn
// is in flight: the outcome is unknown.
func closedDuringCommitCase(ctx context.Context, t *testing.T, env *testEnv, prefix string) {
	hold := make(chan struct{})
	var holding atomic.Bool
	cfg := env.clientConfig(grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string,
		req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption,
	) error {
		if _, ok := asCommitTxn(req); ok && holding.CompareAndSwap(false, true) {
			hold <- struct{}{} // the commit is in flight ...
			<-hold             // ... until the client is closed
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}))
	cfg.Username, cfg.Password = "root", "rootpw"
	cli := etcdtest.NewClientFromConfig(t, cfg)
	r := &incrWriter{}
	r.writes.Store(1000)
	w := mustNewEtcdWorker(t, cli, prefix, r, newMapState(prefix))
	errc := runAsync(ctx, w, nil, 20*time.Millisecond, "run")
	started, cancelStarted := context.WithTimeout(ctx, 5*time.Second)
	awaitSignal(started, t, hold, "no commit started")
	cancelStarted()
	start := time.Now()
	require.NoError(t, cli.Close())
	hold <- struct{}{}
	err := returnsPromptly(ctx, t, errc, start)
	require.ErrorIs(t, err, ErrEtcdRejected)
	require.ErrorIs(t, err, ErrCommitUnresolved, "a commit cut by Close may or may not have landed")
	require.Less(t, time.Since(start), time.Second)
}

// TestClosingTheWorkersClientEndsRunOnASharedSource: a worker whose own
// client is closed ends Run with ErrEtcdRejected within a second (as in
// TestPermanentErrorsEndRun's closed client case) also when it follows a
// Source built on another client. Only the follower watched a client for
// Close, the Source's, and an idle worker sends no request of its own: it
// went on ticking on its closed client for as long as it ran.
func TestClosingTheWorkersClientEndsRunOnASharedSource(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	const prefix = "/test/closed-worker-client"
	src := mustNewSource(t, env.client(t), prefix)
	cli := env.client(t)
	var ticks atomic.Int64
	w := mustNewEtcdWorker(t, cli, prefix, countingReactor(&ticks), newMapState(prefix), WithSource(src))
	g := newWorkerGroup(t, time.Minute)
	g.runWorkerEvery("worker", w, 20*time.Millisecond)
	waitWithin(t, 10*time.Second, "ticks", g.failed, func() bool { return ticks.Load() >= 3 })

	start := time.Now()
	require.NoError(t, cli.Close())
	returned := make(chan struct{})
	go func() { g.wg.Wait(); close(returned) }()
	select {
	case <-returned:
	case <-time.After(5 * time.Second):
		t.Fatalf("Run still running %v after its client closed (%d ticks in all)", time.Since(start), ticks.Load())
	}
	require.ErrorIs(t, g.failed(), ErrEtcdRejected)
	require.NotErrorIs(t, g.failed(), context.Canceled, "a closed client is no requested stop")
	require.Less(t, time.Since(start), time.Second)
}

// TestClosingTheClientWhileResolvingACommitLeavesItUnresolved: a commit whose outcome
// is unknown (its Txn failed with a transient error) is being resolved
// through fences that keep failing (etcd unreachable); then the worker's
// client is closed. Run cannot know whether the commit landed, so its error
// must match ErrCommitUnresolved (Run's contract: "a commit cut by closing
// the client also matches ErrCommitUnresolved"), as it does when the client
// closes while the commit Txn itself is in flight (closedDuringCommitCase).
// The fences' rejection used to drop it.
func TestClosingTheClientWhileResolvingACommitLeavesItUnresolved(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	const prefix = "/test/closed-while-resolving"
	var failing atomic.Bool
	var fences atomic.Int64
	var closed atomic.Bool // after Close the fences reach clientv3's closed connection
	cli := env.client(t, grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string,
		req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption,
	) error {
		if _, ok := asCommitTxn(req); ok && failing.CompareAndSwap(false, true) {
			return status.Error(codes.Unavailable, "injected: commit outcome lost")
		}
		if _, ok := req.(*etcdserverpb.TxnRequest); ok && failing.Load() && !closed.Load() {
			fences.Add(1)
			return status.Error(codes.Unavailable, "injected: etcd unreachable")
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}))
	r := &incrWriter{}
	r.writes.Store(1000)
	w := mustNewEtcdWorker(t, cli, prefix, r, newMapState(prefix))
	ctx := testContext(t)
	errc := runAsync(ctx, w, nil, 20*time.Millisecond, "run")
	waitWithin(t, 10*time.Second, "fences", func() error { return nil }, func() bool { return fences.Load() >= 2 })
	start := time.Now()
	closed.Store(true)
	require.NoError(t, cli.Close())
	err := returnsPromptly(ctx, t, errc, start)
	require.ErrorIs(t, err, ErrEtcdRejected)
	require.ErrorIs(t, err, ErrCommitUnresolved, "the commit's outcome was never learnt")
}

// TestClosingTheClientOfASessionWorkerIsARejection: a worker run with a
// concurrency.Session on its own client, whose client is closed, must end
// as a worker without a session does (closedClientCase): with an error
// matching ErrEtcdRejected (Run's contract: "a closed client"). The lease is
// not gone, the client is: ErrEtcdSessionDone tells a caller to make a new
// session and run again, which can never work on a closed client. The
// session's keep-alive ends with the client, and about one run in five
// reported the session first.
func TestClosingTheClientOfASessionWorkerIsARejection(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	const prefix = "/test/closed-session-worker"
	ctx := testContext(t)
	for i := range 15 { // the outcome is a race: ~1 run in 5 ends with ErrEtcdSessionDone
		cli := env.client(t)
		session, err := concurrency.NewSession(cli, concurrency.WithTTL(5))
		require.NoError(t, err)
		var ticks atomic.Int64
		w := mustNewEtcdWorker(t, cli, prefix, countingReactor(&ticks), newMapState(prefix))
		errc := runAsync(ctx, w, session, 20*time.Millisecond, "run")
		waitWithin(t, 10*time.Second, "ticks", func() error { return nil }, func() bool { return ticks.Load() >= 3 })
		start := time.Now()
		require.NoError(t, cli.Close())
		err = returnsPromptly(ctx, t, errc, start)
		require.ErrorIs(t, err, ErrEtcdRejected, "run %d: the client was closed, not the session's lease lost", i)
	}
}

// TestClosingTheClientMidTickOrPatch: the worker's client is closed while a
// Tick (that then returns an increment) or a patch (that then increments)
// runs. Run returns within a second with ErrEtcdRejected, and the counter
// in etcd holds every increment that landed once: none is applied twice,
// and one whose commit may have been cut on its way makes the error match
// ErrCommitUnresolved as well.
func TestClosingTheClientMidTickOrPatch(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	tests := []struct {
		name string
		// reactor blocks once, signalling blocked, until release is
		// closed; want is the most increments it can have emitted, and
		// least the fewest that must have landed before it blocked.
		reactor     func(counter util.EtcdKey, blocked, release chan struct{}) Reactor
		least, want int64
	}{
		{name: "during a Tick", least: 3, want: 4, reactor: func(counter util.EtcdKey, blocked, release chan struct{}) Reactor {
			var emitted int64
			return ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
				st := s.(*mapState)
				if st.int("/n") != emitted || emitted > 3 {
					return st, nil // the earlier increment is not seen yet, or all are out
				}
				if emitted == 3 {
					close(blocked)
					<-release
				}
				emitted++
				st.patches = append(st.patches, []DataPatch{incrPatch(counter, 1)})
				return st, nil
			})
		}},
		{name: "during a patch", least: 0, want: 1, reactor: func(counter util.EtcdKey, blocked, release chan struct{}) Reactor {
			var emitted, calls int
			return ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
				st := s.(*mapState)
				if emitted == 0 {
					emitted++
					incr := incrPatch(counter, 1)
					st.patches = append(st.patches, []DataPatch{patchFunc(func(vm map[util.EtcdKey][]byte, cs map[util.EtcdKey]struct{}) error {
						calls++
						if calls == 1 {
							close(blocked)
							<-release
						}
						return incr.Patch(vm, cs)
					})})
				}
				return st, nil
			})
		}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := testContext(t)
			prefix := fmt.Sprintf("/test/closed-mid-%d", i)
			counter := util.NewEtcdKey(prefix + "/n")
			blocked, release := make(chan struct{}), make(chan struct{})
			cli := env.client(t)
			w := mustNewEtcdWorker(t, cli, prefix, tt.reactor(counter, blocked, release), newMapState(prefix))
			errc := runAsync(ctx, w, nil, 20*time.Millisecond, "run")
			awaitSignal(ctx, t, blocked, "the reactor blocked")
			start := time.Now()
			require.NoError(t, cli.Close())
			close(release)
			err := returnsPromptly(ctx, t, errc, start)
			require.ErrorIs(t, err, ErrEtcdRejected)
			require.Less(t, time.Since(start), time.Second)
			v, _ := getValue(ctx, t, env.cli, counter.String())
			got, _ := strconv.ParseInt(v, 10, 64) // "": 0
			require.GreaterOrEqual(t, got, tt.least)
			require.LessOrEqual(t, got, tt.want, "an increment was applied twice")
			if got == tt.want {
				require.ErrorIs(t, err, ErrCommitUnresolved, "the last increment landed: it was sent as the client closed")
			}
		})
	}
}
