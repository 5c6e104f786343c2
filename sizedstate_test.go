package orchestrator

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// sizedRun is a worker on a sizedRecordingState, with a sizedSnapshotter,
// running in the background.
type sizedRun struct {
	w       *EtcdWorker
	state   *sizedRecordingState
	reactor *sizedSnapshotter
	cancel  context.CancelFunc
	done    <-chan error
}

// startSized creates a worker on prefix over cli and starts it.
func startSized(ctx context.Context, t testing.TB, cli *clientv3.Client, prefix string, opts ...Option) *sizedRun {
	t.Helper()
	r := &sizedRun{state: &sizedRecordingState{recordingState: newRecordingState(prefix)}, reactor: &sizedSnapshotter{}}
	r.w = mustNewEtcdWorker(t, cli, prefix, r.reactor, r.state, opts...)
	r.start(ctx, t)
	return r
}

// start runs the worker (again), until stop or the end of the test.
func (r *sizedRun) start(ctx context.Context, t testing.TB) {
	runCtx, cancel := context.WithCancel(ctx)
	t.Cleanup(cancel)
	r.cancel, r.done = cancel, runAsync(runCtx, r.w, nil, 10*time.Millisecond, "sized")
}

// stop ends the run and requires a clean stop.
func (r *sizedRun) stop(ctx context.Context, t testing.TB) {
	t.Helper()
	r.cancel()
	require.True(t, IsCleanStop(recvErr(ctx, t, r.done)))
}

// TestSizedStateExpectsKeysBeforeTheFirstLoad: a SizedState hears the
// number of keys once, before the first load's first Update, on the
// streaming path and on the fallback; neither the reload after a compaction
// of a state that holds keys nor a second Run of the worker calls it again.
func TestSizedStateExpectsKeysBeforeTheFirstLoad(t *testing.T) {
	t.Parallel()
	for _, noStream := range []bool{false, true} {
		t.Run(fmt.Sprintf("noStream=%v", noStream), func(t *testing.T) {
			const prefix, keys = "/test/sized", 40
			env := newTestEnv(t, ownServer(), withProxy())
			admin := env.cli
			ctx := testContext(t)
			for i := range keys {
				mustPutKV(ctx, t, admin, fmt.Sprintf("%s/k%02d", prefix, i), fmt.Sprint(i))
			}
			r := startSized(ctx, t, env.client(t, (&rpcCounter{noStream: noStream}).dialOptions()...), prefix,
				WithPageSize(7), WithMaxStaleness(500*time.Millisecond))
			waitUntil(ctx, t, "the loaded state", func() bool { return r.reactor.equals(etcdSnapshot(ctx, t, admin, prefix)) })
			expected, updates := r.state.calls()
			require.Len(t, expected, 1, "one hint for the first load")
			require.GreaterOrEqual(t, expected[0], keys, "the hint counts every key")
			require.LessOrEqual(t, expected[0], keys+4, "the hint counts the prefix, bookkeeping included")
			require.Equal(t, []int{0}, updates, "the hint comes before the first Update")

			reloadByCompaction(ctx, t, env, func() { mustPutKV(ctx, t, admin, prefix+"/new", "x") })
			waitUntil(ctx, t, "the reloaded state", func() bool { return r.reactor.equals(etcdSnapshot(ctx, t, admin, prefix)) })
			r.stop(ctx, t)

			r.start(ctx, t)
			require.NoError(t, r.w.WaitSynced(ctx))
			r.stop(ctx, t)
			expected, _ = r.state.calls()
			require.Len(t, expected, 1, "a state that holds keys gets no hint")
		})
	}
}

// TestSizedStatePanicEndsRun: a panic in ExpectKeys ends Run with ErrPanic
// before the state gets any Update.
func TestSizedStatePanicEndsRun(t *testing.T) {
	t.Parallel()
	const prefix = "/test/sizedpanic"
	cli := sharedClient(t)
	ctx := testContext(t)
	mustPutKV(ctx, t, cli, prefix+"/a", "1")
	state := &sizedRecordingState{recordingState: newRecordingState(prefix), panics: true}
	w := mustNewEtcdWorker(t, cli, prefix, &sizedSnapshotter{}, state)
	err := recvErr(ctx, t, runAsync(ctx, w, nil, 10*time.Millisecond, "sized"))
	require.ErrorIs(t, err, ErrPanic)
	require.ErrorContains(t, err, "SizedState.ExpectKeys")
	require.Empty(t, state.log, "no Update after the failed hint")
}

// TestSizedStateHintAfterEveryKeyVanished: SizedState's doc promises
// ExpectKeys "before a load fills an empty state (the first load of a
// worker, and a reload after every key the state held vanished)". Every key
// the state held is deleted (the state is empty, as the reactor sees), then a
// compaction forces a reload that fills the empty state with new keys: the
// hint comes before that reload's first Update, also when the deletions are
// few.
func TestSizedStateHintAfterEveryKeyVanished(t *testing.T) {
	t.Parallel()
	const prefix = "/test/sizedvanish"
	env := newTestEnv(t, ownServer(), withProxy())
	admin := env.cli
	ctx := testContext(t)
	for i := range 3 {
		mustPutKV(ctx, t, admin, fmt.Sprintf("%s/old%d", prefix, i), "x")
	}
	r := startSized(ctx, t, env.client(t), prefix, WithMaxStaleness(500*time.Millisecond))
	waitUntil(ctx, t, "the loaded state", func() bool { return r.reactor.equals(etcdSnapshot(ctx, t, admin, prefix)) })

	_, err := admin.Delete(ctx, prefix+"/", clientv3.WithPrefix())
	require.NoError(t, err)
	waitUntil(ctx, t, "the emptied state", func() bool { return r.reactor.equals(map[string]string{}) })
	expected, _ := r.state.calls()
	require.Len(t, expected, 1, "one hint for the first load")

	reloadByCompaction(ctx, t, env, func() {
		for i := range 5 {
			mustPutKV(ctx, t, admin, fmt.Sprintf("%s/new%d", prefix, i), "y")
		}
	})
	waitUntil(ctx, t, "the reloaded state", func() bool { return r.reactor.equals(etcdSnapshot(ctx, t, admin, prefix)) })
	r.stop(ctx, t)

	expected, updates := r.state.calls()
	require.Len(t, expected, 2, "the reload that fills the emptied state is hinted (got hints %v)", expected)
	require.Equal(t, 6, updates[1], "the hint comes before the reload's first Update")
}

// countRace runs do once, just before the first count-only Range the client
// sends (the stream path's size hint).
type countRace struct {
	once sync.Once
	do   func()
}

func (c *countRace) unary(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn,
	invoker grpc.UnaryInvoker, opts ...grpc.CallOption,
) error {
	if rr, ok := req.(*pb.RangeRequest); ok && method == pb.KV_Range_FullMethodName && rr.CountOnly {
		c.once.Do(c.do)
	}
	return invoker(ctx, method, req, reply, cc, opts...)
}

// TestSizedStateHintCountsTheLoadedRevision: SizedState's doc
// says ExpectKeys gets "the number of keys under its prefix at the revision
// it loads" (plus bookkeeping keys, of which a fresh prefix has none). On the
// streaming path the count comes from an unpinned count-only read made after
// the stream's first chunk, so a key put in between is counted although the
// load (pinned at the stream's revision) does not hold it: the hint is 6
// while the load passes 5 keys.
func TestSizedStateHintCountsTheLoadedRevision(t *testing.T) {
	t.Parallel()
	const prefix = "/test/sizedrev"
	env := newTestEnv(t)
	admin := env.cli
	ctx := testContext(t)
	for i := range 5 {
		mustPutKV(ctx, t, admin, fmt.Sprintf("%s/k%d", prefix, i), "x")
	}
	var lateErr error
	race := &countRace{do: func() { _, lateErr = admin.Put(ctx, prefix+"/late", "z") }}
	r := startSized(ctx, t, env.client(t, grpc.WithChainUnaryInterceptor(race.unary)), prefix)
	waitUntil(ctx, t, "the state with the late key", func() bool { return r.reactor.equals(etcdSnapshot(ctx, t, admin, prefix)) })
	r.stop(ctx, t)
	require.NoError(t, lateErr)

	loaded := 0
	for _, u := range r.state.log {
		if u.isInit {
			loaded++
		}
	}
	expected, _ := r.state.calls()
	require.Len(t, expected, 1)
	require.Contains(t, []int{5, 6}, loaded, "the late key is loaded or comes through the watch")
	require.Equal(t, loaded, expected[0], "the hint is the number of keys at the loaded revision")
}

// compactAfterFirstChunk compacts etcd (after a write elsewhere) once the
// first RangeStream message has arrived, so that the stream fails with
// ErrCompacted a few chunks later.
type compactAfterFirstChunk struct {
	once sync.Once
	do   func()
}

type hookedStream struct {
	grpc.ClientStream
	c *compactAfterFirstChunk
}

func (s *hookedStream) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	if err == nil {
		s.c.once.Do(s.c.do)
	}
	return err
}

func (c *compactAfterFirstChunk) stream(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn,
	method string, streamer grpc.Streamer, opts ...grpc.CallOption,
) (grpc.ClientStream, error) {
	cs, err := streamer(ctx, desc, cc, method, opts...)
	if err != nil || method != pb.KV_RangeStream_FullMethodName {
		return cs, err
	}
	return &hookedStream{ClientStream: cs, c: c}, nil
}

// TestSizedStateHintOncePerLoad: SizedState's doc says the
// worker calls ExpectKeys "once" before a load fills an empty state. A first
// load whose first chunks hold only bookkeeping keys (here of a nested
// prefix's worker) and whose revision is compacted before any user key
// arrived is retried with the mirror still empty: the state hears the hint
// twice for one load.
func TestSizedStateHintOncePerLoad(t *testing.T) {
	t.Parallel()
	const prefix = "/test/hintonce"
	env := newTestEnv(t, ownServer(etcdtest.WithMaxRequestBytes(64<<10)))
	admin := env.cli
	ctx := testContext(t)
	big := string(make([]byte, 1000))
	var ops []clientv3.Op
	for i := range 400 { // about six 64 KiB chunks of another worker's bookkeeping
		ops = append(ops, clientv3.OpPut(keysOf(prefix+"/A").tokenKey(fmt.Sprintf("%04d", i)), big))
		if len(ops) == 20 {
			_, err := admin.Txn(ctx).Then(ops...).Commit()
			require.NoError(t, err)
			ops = ops[:0]
		}
	}
	for i := range 5 {
		mustPutKV(ctx, t, admin, fmt.Sprintf("%s/k%d", prefix, i), "x")
	}
	var hookErr error
	hookDone := make(chan struct{})
	hook := &compactAfterFirstChunk{do: func() {
		// Off the receiving goroutine: the server holds the revision while
		// it streams, and the stream must keep flowing.
		go func() {
			defer close(hookDone)
			resp, err := admin.Put(ctx, "/elsewhere", "x")
			if hookErr = err; err == nil {
				_, hookErr = admin.Compact(ctx, resp.Header.Revision)
			}
		}()
	}}
	r := startSized(ctx, t, env.client(t, grpc.WithChainStreamInterceptor(hook.stream),
		grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10)), prefix)
	require.NoError(t, r.w.WaitSynced(ctx))
	r.stop(ctx, t)
	awaitSignal(ctx, t, hookDone, "the compaction")
	require.NoError(t, hookErr)

	expected, updates := r.state.calls()
	require.Equal(t, 5, len(r.state.log))
	require.Len(t, expected, 1, "one hint for one load (got %v, at Updates %v)", expected, updates)
}
