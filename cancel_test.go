package orchestrator

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/etcdworker/orchestrator/util"
)

// cancelPrompt bounds how long Run may take to return after its ctx was
// cancelled while nothing is in flight at etcd. The slow callbacks below
// would hold Run for 8 s if it ran them all.
const cancelPrompt = 2 * time.Second

// slowUpdateState is a mapState whose Updates take a while until fast is set.
type slowUpdateState struct {
	*mapState
	updates atomic.Int64
	fast    atomic.Bool
	first   chan struct{}
}

func (s *slowUpdateState) Update(key util.EtcdKey, value []byte, isInit bool) error {
	if s.updates.Add(1) == 1 {
		close(s.first)
	}
	if !s.fast.Load() {
		time.Sleep(20 * time.Millisecond)
	}
	return s.mapState.Update(key, value, isInit)
}

// putKeys puts n keys prefix + "/k<i>", 100 in a Txn.
func putKeys(ctx context.Context, t testing.TB, cli *clientv3.Client, prefix string, n int) {
	t.Helper()
	for i := 0; i < n; i += 100 {
		var ops []clientv3.Op
		for j := i; j < min(i+100, n); j++ {
			ops = append(ops, clientv3.OpPut(fmt.Sprintf("%s/k%04d", prefix, j), "v"))
		}
		_, err := cli.Txn(ctx).Then(ops...).Commit()
		require.NoError(t, err)
	}
}

// TestACancelStopsTheFirstSnapshotBetweenTwoUpdates: the first snapshot
// brings 400 keys whose Updates take 20 ms each. A cancel after the first
// Update ends Run at once with ctx's error, not after the other 399; the
// next Run of the same worker tells the state the rest, and the state ends
// equal to etcd.
func TestACancelStopsTheFirstSnapshotBetweenTwoUpdates(t *testing.T) {
	t.Parallel()
	const prefix, keys = "/test/cancel-catchup", 400
	cli := sharedClient(t)
	ctx := contextWithin(t, 30*time.Second)
	putKeys(ctx, t, cli, prefix, keys)

	st := &slowUpdateState{mapState: newMapState(prefix), first: make(chan struct{})}
	w := mustNewEtcdWorker(t, cli, prefix, idleReactor(), st)
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := runAsync(runCtx, w, nil, behaviourTick, "cancel-catchup")
	awaitSignal(ctx, t, st.first, "the first Update")
	start := time.Now()
	cancel()
	err := recvErr(ctx, t, done)
	took := time.Since(start)
	require.ErrorIs(t, err, context.Canceled)
	require.True(t, IsCleanStop(err), "%v", err)
	require.Less(t, took, cancelPrompt, "Run went on telling the state its snapshot (%d Updates)", st.updates.Load())
	require.Less(t, st.updates.Load(), int64(keys/2))

	st.fast.Store(true)
	runCtx, cancel = context.WithCancel(ctx)
	defer cancel()
	done = runAsync(runCtx, w, nil, behaviourTick, "cancel-catchup-again")
	require.NoError(t, w.WaitSynced(ctx))
	cancel()
	require.ErrorIs(t, recvErr(ctx, t, done), context.Canceled)
	require.Len(t, st.values, keys, "the second Run told the state the keys the first one left")
}

// TestACancelStopsAFlushBetweenTwoGroups: a Tick leaves 400 groups whose
// patches take 20 ms each. A cancel while the first runs ends Run at once
// with ctx's error, and nothing of the flush is written.
func TestACancelStopsAFlushBetweenTwoGroups(t *testing.T) {
	t.Parallel()
	const prefix = "/test/cancel-flush"
	cli := sharedClient(t)
	ctx := contextWithin(t, 30*time.Second)
	var calls atomic.Int64
	first := make(chan struct{})
	ticked := false
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		if ticked {
			return st, nil
		}
		ticked = true
		for i := range 400 {
			st.patches = append(st.patches, []DataPatch{SingleDataPatch{Key: st.key(fmt.Sprintf("/p%04d", i)),
				Func: func([]byte) ([]byte, bool, error) {
					if calls.Add(1) == 1 {
						close(first)
					}
					time.Sleep(20 * time.Millisecond)
					return []byte("x"), true, nil
				}}})
		}
		return st, nil
	})
	w := mustNewEtcdWorker(t, cli, prefix, reactor, newMapState(prefix))
	before := headRevision(ctx, t, cli)
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := runAsync(runCtx, w, nil, behaviourTick, "cancel-flush")
	awaitSignal(ctx, t, first, "the first patch")
	start := time.Now()
	cancel()
	err := recvErr(ctx, t, done)
	took := time.Since(start)
	require.ErrorIs(t, err, context.Canceled)
	require.Less(t, took, cancelPrompt, "Run went on running patches (%d)", calls.Load())
	require.Empty(t, writesSince(ctx, t, cli, before, prefix), "a commit went out after ctx was cancelled")
}

// TestATickErrorAfterACancelMatchesCtx: Tick waits on a call that honours
// its ctx; on the cancel the call fails as a gRPC call does (a status error
// of code Canceled, which does not match context.Canceled), and Tick returns
// that. Run's error matches both ctx's error and Tick's, and is a clean
// stop; a panic on the way out is not.
func TestATickErrorAfterACancelMatchesCtx(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		fail  func() error
		clean bool
	}{
		{"a gRPC status error", func() error { return fmt.Errorf("backend: %w", status.Error(codes.Canceled, "context canceled")) }, true},
		{"a panic", func() error { panic("on the way out") }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cli := sharedClient(t)
			ctx := contextWithin(t, 20*time.Second)
			entered := make(chan struct{})
			var once sync.Once
			reactor := ReactorFunc(func(c context.Context, s ReactorState) (ReactorState, error) {
				once.Do(func() { close(entered) })
				<-c.Done()
				return s, tc.fail()
			})
			prefix := "/test/tick-error-after-cancel/" + strings.ReplaceAll(tc.name, " ", "-")
			w := mustNewEtcdWorker(t, cli, prefix, reactor, newMapState(prefix))
			runCtx, cancel := context.WithCancel(ctx)
			defer cancel()
			done := runAsync(runCtx, w, nil, behaviourTick, "tick-error-after-cancel")
			awaitSignal(ctx, t, entered, "Tick")
			cancel()
			err := recvErr(ctx, t, done)
			require.ErrorIs(t, err, context.Canceled)
			require.Equal(t, tc.clean, IsCleanStop(err), "%v", err)
			if tc.clean {
				require.Equal(t, codes.Canceled, status.Code(err), "%v", err)
				require.ErrorContains(t, err, "backend")
			} else {
				require.ErrorIs(t, err, ErrPanic)
			}
		})
	}
}

// answerHook is a unary interceptor that calls fn for the first
// commit Txn sent once armed; fn does the invoking itself.
type answerHook struct {
	armed atomic.Bool
	fired atomic.Bool
	fn    func(ctx context.Context, req *etcdserverpb.TxnRequest, invoke func() error) error
	// ttlDelay delays LeaseTimeToLive requests once the hook fired (a slow
	// etcd: the request is then sent with the context it had).
	ttlDelay time.Duration
}

func (h *answerHook) dialOption() grpc.DialOption {
	return grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any,
		cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption,
	) error {
		invoke := func() error { return invoker(ctx, method, req, reply, cc, opts...) }
		if method == "/etcdserverpb.Lease/LeaseTimeToLive" && h.fired.Load() && h.ttlDelay > 0 {
			time.Sleep(h.ttlDelay) // fault timing: etcd answers slowly
			return invoke()
		}
		if tr, ok := asCommitTxn(req); ok && h.armed.Load() && h.fired.CompareAndSwap(false, true) {
			return h.fn(ctx, tr, invoke)
		}
		return invoke()
	})
}

// tokenKeyOf returns the commit token key a commit Txn puts.
func tokenKeyOf(tr *etcdserverpb.TxnRequest) string {
	for _, op := range tr.Success {
		if p := op.GetRequestPut(); p != nil && strings.Contains(string(p.Key), reservedDir+"token/") {
			return string(p.Key)
		}
	}
	return ""
}

// TestALostFencingKeyRacingACancelIsNoCleanStop: the fencing key is deleted
// and the commit Txn in flight fails on it; Run's ctx is cancelled while
// that Txn is in flight. Run returns ErrNotOwner (the worker lost its
// ownership: a failure) matching ctx's error too, and IsCleanStop took it
// for a clean stop; every failure the worker itself reports stays one.
func TestALostFencingKeyRacingACancelIsNoCleanStop(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := contextWithin(t, 25*time.Second)
	const prefix = "/test/notowner-cancel"
	clearPrefix(ctx, t, env.cli, prefix)
	fenceKey := "/test-fence/notowner-cancel"
	put, err := env.cli.Put(ctx, fenceKey, "leader")
	require.NoError(t, err)
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	hook := &answerHook{fn: func(c context.Context, _ *etcdserverpb.TxnRequest, invoke func() error) error {
		if _, err := env.cli.Delete(ctx, fenceKey); err != nil {
			return err
		}
		err := invoke()
		cancel() // the stop arrives while the Txn is in flight
		return err
	}}
	var emitted atomic.Int64
	cli := env.client(t, hook.dialOption())
	w := mustNewEtcdWorker(t, cli, prefix, counterReactor(&emitted), newMapState(prefix),
		WithFencingKey(fenceKey, put.Header.Revision), WithLogger(faultLogger(t)))
	done := runAsync(runCtx, w, nil, behaviourTick, "notowner-cancel")
	waitWithin(t, 10*time.Second, "commits", nil, func() bool { return emitted.Load() >= 3 })
	hook.armed.Store(true)
	runErr := recvErr(ctx, t, done)
	t.Logf("Run: %v", runErr)
	require.True(t, hook.fired.Load())
	require.ErrorIs(t, runErr, ErrNotOwner)
	require.False(t, IsCleanStop(runErr), "the fencing key was lost, yet IsCleanStop says the stop was clean: %v", runErr)
}

// TestAResolutionCutByTheShutdownTimeoutIsUnresolved: a commit lands
// but its answer is lost, and someone wipes the commit token meanwhile; Run's
// ctx was cancelled while the Txn was in flight (shutdown timeout 300 ms).
// The fence finds the token gone, so the outcome cannot be told: before

// today the worker asked etcd for the session lease's TTL and returned
// ErrCommitUnresolved. Now the TTL request is cut by the shutdown deadline
// (etcd answers after 500 ms), leaseGone takes the error for a gone lease,
// and Run claims ErrEtcdSessionDone while the session is alive, without
// ErrCommitUnresolved, and IsCleanStop says the stop was clean.
func TestAResolutionCutByTheShutdownTimeoutIsUnresolved(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		shutdown time.Duration
	}{
		{"shutdown timeout 300ms", 300 * time.Millisecond},
		{"control: shutdown timeout 3s", 3 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			resolutionCutByShutdown(t, tc.shutdown)
		})
	}
}

func resolutionCutByShutdown(t *testing.T, shutdown time.Duration) {
	env := newTestEnv(t)
	ctx := contextWithin(t, 25*time.Second)
	prefix := fmt.Sprintf("/test/resolution-session-%d", shutdown.Milliseconds())
	clearPrefix(ctx, t, env.cli, prefix)
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	hook := &answerHook{ttlDelay: 500 * time.Millisecond}
	hook.fn = func(c context.Context, tr *etcdserverpb.TxnRequest, invoke func() error) error {
		if err := invoke(); err != nil { // it lands
			return err
		}
		if _, err := env.cli.Delete(ctx, tokenKeyOf(tr)); err != nil { // a wipe
			return err
		}
		cancel()
		return status.Error(codes.Unavailable, "test: the answer was lost")
	}
	cli := env.client(t, hook.dialOption())
	session, err := concurrency.NewSession(cli, concurrency.WithTTL(30))
	require.NoError(t, err)
	defer session.Close()
	var emitted atomic.Int64
	w := mustNewEtcdWorker(t, cli, prefix, counterReactor(&emitted), newMapState(prefix),
		WithShutdownTimeout(shutdown), WithLogger(faultLogger(t)))
	done := runAsync(runCtx, w, session, behaviourTick, "resolution-session")
	waitWithin(t, 10*time.Second, "commits", nil, func() bool { return emitted.Load() >= 3 })
	hook.armed.Store(true)
	runErr := recvErr(ctx, t, done)
	t.Logf("Run: %v", runErr)
	require.True(t, hook.fired.Load())
	select {
	case <-session.Done():
		t.Fatal("the session really ended")
	default:
	}
	require.ErrorIs(t, runErr, context.Canceled)
	require.NotErrorIs(t, runErr, ErrEtcdSessionDone, "the session is alive")
	require.ErrorIs(t, runErr, ErrCommitUnresolved, "the commit landed and the worker cannot tell: %v", runErr)
	require.False(t, IsCleanStop(runErr))
}

// TestAConflictThatGrewTheValuesUnderAClientReceiveLimit: the keys a
// group rewrites are small in the worker's view, so readBackBytes lets the
// Txn read them back; another writer makes them large (200 KiB each, each
// well under the client's 2 MiB receive limit, so the watch takes them)

// TestACancelThenAClosedClientIsACleanStop: the caller's shutdown:
// cancel Run's ctx, then close the client at once. Whether the worker was
// idle or in a slow Tick (one that does not look at ctx) must not change
// the verdict: the stop was requested and nothing is unresolved. After the
// slow Tick, the catch-up returned the Source's rejection of the closed
// client before looking at ctx, and Run reported a failure.
func TestACancelThenAClosedClientIsACleanStop(t *testing.T) {
	t.Parallel()
	for _, slow := range []bool{false, true} {
		t.Run(fmt.Sprintf("slowTick=%v", slow), func(t *testing.T) {
			t.Parallel()
			env := newTestEnv(t)
			ctx := contextWithin(t, 20*time.Second)
			prefix := fmt.Sprintf("/test/cancel-close-%v", slow)
			clearPrefix(ctx, t, env.cli, prefix)
			cli := env.client(t)
			var ticks atomic.Int64
			inTick := make(chan struct{})
			reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
				if ticks.Add(1) == 3 && slow {
					close(inTick)
					time.Sleep(300 * time.Millisecond) // user code busy, not looking at ctx
				}
				return s, nil
			})
			w := mustNewEtcdWorker(t, cli, prefix, reactor, newMapState(prefix), WithLogger(faultLogger(t)))
			runCtx, cancel := context.WithCancel(ctx)
			defer cancel()
			done := runAsync(runCtx, w, nil, behaviourTick, "cancel-close")
			if slow {
				awaitSignal(ctx, t, inTick, "the slow Tick")
			} else {
				waitWithin(t, 10*time.Second, "ticks", nil, func() bool { return ticks.Load() >= 3 })
			}
			cancel()
			require.NoError(t, cli.Close())
			runErr := recvErr(ctx, t, done)
			t.Logf("Run: %v", runErr)
			require.ErrorIs(t, runErr, context.Canceled)
			require.True(t, IsCleanStop(runErr), "a requested stop (cancel, then close the client) reported as a failure: %v", runErr)
		})
	}
}

// TestASessionLostWithACommitAnswerIsAlsoUnresolved: a commit lands, its
// answer is lost, and the session's lease is revoked meanwhile, taking the
// commit token with it. Run ends with ErrEtcdSessionDone, and, since
// nothing can tell any more whether the commit landed, with
// ErrCommitUnresolved too (it said only the first).
func TestASessionLostWithACommitAnswerIsAlsoUnresolved(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := contextWithin(t, 25*time.Second)
	const prefix = "/test/session-lost-answer-lost"
	cli := env.client(t)
	session, err := concurrency.NewSession(cli, concurrency.WithTTL(30))
	require.NoError(t, err)
	defer session.Close()
	hook := &answerHook{}
	hook.fn = func(_ context.Context, _ *etcdserverpb.TxnRequest, invoke func() error) error {
		if err := invoke(); err != nil { // it lands
			return err
		}
		if _, err := env.cli.Revoke(ctx, session.Lease()); err != nil {
			return err
		}
		return status.Error(codes.Unavailable, "test: the answer was lost")
	}
	var emitted atomic.Int64
	w := mustNewEtcdWorker(t, env.client(t, hook.dialOption()), prefix, counterReactor(&emitted), newMapState(prefix))
	done := runAsync(ctx, w, session, behaviourTick, "session-lost-answer-lost")
	waitWithin(t, 10*time.Second, "commits", nil, func() bool { return emitted.Load() >= 3 })
	hook.armed.Store(true)
	runErr := recvErr(ctx, t, done)
	t.Logf("Run: %v", runErr)
	require.True(t, hook.fired.Load())
	require.ErrorIs(t, runErr, ErrEtcdSessionDone)
	require.ErrorIs(t, runErr, ErrCommitUnresolved)
	require.False(t, IsCleanStop(runErr))
}
