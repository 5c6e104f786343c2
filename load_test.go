package orchestrator

// The load and reload paths (load.go, rangeread.go and the sweep marks of
// mirror.go) against a real embedded etcd.

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// loadTestWorker starts a worker on prefix whose client goes through env's
// proxy and counter, and returns it, its reactor and its result channel.
func loadTestWorker(ctx context.Context, t *testing.T, env *testEnv, counter *rpcCounter, prefix string,
	opts ...Option,
) (*EtcdWorker, *tickSnapshotter, <-chan error) {
	t.Helper()
	cfg := env.clientConfig(counter.dialOptions()...)
	reactor := &tickSnapshotter{}
	opts = append([]Option{WithPageSize(7), WithMaxStaleness(500 * time.Millisecond)}, opts...)
	w, err := NewEtcdWorker(etcdtest.NewClientFromConfig(t, cfg), prefix, reactor, newRecordingState(prefix), opts...)
	require.NoError(t, err)
	return w, reactor, runAsync(ctx, w, nil, 10*time.Millisecond, "load")
}

// proxiedWorker runs a worker on prefix through env's proxy and counter,
// with a client receive limit of recvLimit (0: gRPC's default) and
// WithMaxStaleness(500ms) before opts, and returns its result channel.
func proxiedWorker(ctx context.Context, t *testing.T, env *testEnv, counter *rpcCounter, recvLimit int,
	prefix string, reactor Reactor, st ReactorState, opts ...Option,
) <-chan error {
	t.Helper()
	cfg := env.clientConfig(counter.dialOptions()...)
	cfg.MaxCallRecvMsgSize = recvLimit
	opts = append([]Option{WithMaxStaleness(500 * time.Millisecond)}, opts...)
	w := mustNewEtcdWorker(t, etcdtest.NewClientFromConfig(t, cfg), prefix, reactor, st, opts...)
	return runAsync(ctx, w, nil, 10*time.Millisecond, "load")
}

// fallbackLog is the start of the message a worker logs when it falls back
// from the streaming range.
const fallbackLog = "etcd has no streaming range (RangeStream)"

// TestLoadAndReloadOnBothReadPaths: the initial load and the reload after
// a compaction give the state exactly what etcd holds, through the
// streaming range and through the paged fallback of servers without one
// (RangeStream answered Unimplemented, as etcd before 3.7 does); the
// fallback is remembered, so the reload does not try the stream again.
// Status tells the path, and the fallback is logged once, with the
// server's version. TestServerMatrix runs the same against real servers
// before 3.7.
func TestLoadAndReloadOnBothReadPaths(t *testing.T) {
	t.Parallel()
	for _, noStream := range []bool{false, true} {
		t.Run(fmt.Sprintf("noStream=%v", noStream), func(t *testing.T) {
			want := ReadPathStream
			if noStream {
				want = ReadPathFallback
			}
			loadAndReload(t, newTestEnv(t, ownServer(), withProxy()), &rpcCounter{noStream: noStream}, want)
		})
	}
}

// loadAndReload loads a prefix of env's server through a worker whose client
// counts range RPCs with counter, changes the prefix while the worker is
// cut off, compacts and lets it reload. Both times the state is exactly
// etcd's. The worker reads with path want: the fallback is remembered (the
// reload does not try the stream again), reported by Status and logged
// once, with the server's version.
func loadAndReload(t *testing.T, env *testEnv, counter *rpcCounter, want ReadPath) {
	const prefix = "/test/readpaths"
	admin := env.cli
	ctx := testContext(t)
	for i := range 50 {
		mustPutKV(ctx, t, admin, fmt.Sprintf("%s/k%02d", prefix, i), fmt.Sprint(i))
	}
	lg, logs := observedLogger(t)
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	w, reactor, done := loadTestWorker(runCtx, t, env, counter, prefix, WithLogger(lg))
	waitUntil(ctx, t, "the loaded state", func() bool { return reactor.equals(etcdSnapshot(ctx, t, admin, prefix)) })
	streams, _, _ := counter.counts()
	require.Equal(t, 1, streams, "the load tries the stream once")
	require.Equal(t, want, w.Status().ReadPath)

	// Change the prefix while the worker is cut off, compact, and let it
	// reload.
	reloadByCompaction(ctx, t, env, func() {
		for i := range 10 {
			_, err := admin.Delete(ctx, fmt.Sprintf("%s/k%02d", prefix, i))
			require.NoError(t, err)
			mustPutKV(ctx, t, admin, fmt.Sprintf("%s/n%02d", prefix, i), "new")
		}
	})
	waitUntil(ctx, t, "the reloaded state", func() bool { return reactor.equals(etcdSnapshot(ctx, t, admin, prefix)) })
	streams, _, ranges := counter.counts()
	fallbacks := logs.FilterMessageSnippet(fallbackLog)
	if want == ReadPathFallback {
		require.Equal(t, 1, streams, "a server without the stream is remembered")
		require.Greater(t, ranges, 2, "the fallback reads pages")
		st, err := admin.Status(ctx, env.target.Endpoints()[0])
		require.NoError(t, err)
		require.Equal(t, 1, fallbacks.Len(), "the fallback is logged once")
		require.Equal(t, st.Version, fallbacks.All()[0].ContextMap()["serverVersion"])
	} else {
		require.Equal(t, 2, streams, "the reload streams again")
		require.Zero(t, fallbacks.Len())
	}
	require.Equal(t, want, w.Status().ReadPath)
	cancel()
	require.True(t, IsCleanStop(recvErr(ctx, t, done)))
	require.Equal(t, Status{}, w.Status(), "a stopped worker reports the zero Status")
}

// TestRetryAfterAFailedVanishedUpdateReportsEveryVanishedKey: when the state
// refuses the Update(nil) of one vanished key, the load fails; the next Run
// must still report every key that vanished, not only the refused one (the
// others must not keep a sweep mark that makes them look found).
func TestRetryAfterAFailedVanishedUpdateReportsEveryVanishedKey(t *testing.T) {
	t.Parallel()
	const prefix = "/test/vanish"
	cli := sharedClient(t)
	ctx := testContext(t)
	for i := range 10 {
		mustPutKV(ctx, t, cli, fmt.Sprintf("%s/k%d", prefix, i), "v")
	}
	st := newRecordingState(prefix)
	w := mustNewEtcdWorker(t, cli, prefix, finishAtOnce, st)
	require.NoError(t, runWithin(t, w, 5*time.Second, "first"))
	require.Len(t, st.values, 10)

	for i := 1; i <= 5; i++ {
		_, err := cli.Delete(ctx, fmt.Sprintf("%s/k%d", prefix, i))
		require.NoError(t, err)
	}
	refused := errors.New("refused")
	st.onUpdate = func(_ string, value []byte, _ bool) error {
		if value == nil {
			return refused
		}
		return nil
	}
	require.ErrorIs(t, runWithin(t, w, 5*time.Second, "refusing"), refused)

	st.onUpdate = nil
	st.log = nil
	require.NoError(t, runWithin(t, w, 5*time.Second, "retry"))
	require.Equal(t, etcdSnapshot(ctx, t, cli, prefix), stringValues(st.values))
}

// TestRunEndingMidLoadThenSecondRunTellsOnlyTheDifference: a Run that ends
// in the middle of its load (cancelled, or its state refusing an Update),
// then changes in etcd, then a second Run on the same worker: the state
// equals etcd, and the second load tells only the keys that differ from
// what the first one managed to tell (the refused key again).
func TestRunEndingMidLoadThenSecondRunTellsOnlyTheDifference(t *testing.T) {
	t.Parallel()
	for _, refuse := range []bool{false, true} {
		t.Run(fmt.Sprintf("refuse=%v", refuse), func(t *testing.T) {
			prefix := fmt.Sprintf("/test/midload-%v", refuse)
			env := newTestEnv(t, withMaxRequestBytes(8<<10))
			cli := env.cli
			ctx := testContext(t)
			big := string(make([]byte, 1000))
			for i := range 40 {
				mustPutKV(ctx, t, cli, fmt.Sprintf("%s/k%02d", prefix, i), big)
			}
			st := newRecordingState(prefix)
			w := mustNewEtcdWorker(t, cli, prefix, finishAtOnce, st)
			runCtx, cancel := context.WithCancel(ctx)
			defer cancel()
			refused := errors.New("refused")
			st.onUpdate = func(string, []byte, bool) error {
				if len(st.log) == 20 {
					if refuse {
						return refused
					}
					cancel()
				}
				return nil
			}
			err := w.Run(runCtx, nil, behaviourTick, "cut")
			if refuse {
				require.ErrorIs(t, err, refused)
			} else {
				require.True(t, IsCleanStop(err), "%v", err)
			}
			told := stringValues(st.values)
			// Cancelling stops the read at the next chunk: keys already
			// received may still be told (all of them on a fast machine).
			require.GreaterOrEqual(t, len(told), 20)

			_, err = cli.Delete(ctx, prefix+"/k05")
			require.NoError(t, err)
			_, err = cli.Delete(ctx, prefix+"/k35")
			require.NoError(t, err)
			mustPutKV(ctx, t, cli, prefix+"/k06", "w")
			mustPutKV(ctx, t, cli, prefix+"/k36", "w")
			mustPutKV(ctx, t, cli, prefix+"/k50", "")
			st.onUpdate, st.log = nil, nil
			require.NoError(t, runWithin(t, w, 5*time.Second, "second"))
			now := etcdSnapshot(ctx, t, cli, prefix)
			require.Equal(t, now, stringValues(st.values))
			want := []string{"/k05", "/k06", "/k50"}
			if refuse {
				want = append(want, "/k19")
			}
			for k := range told {
				if _, ok := now[k]; !ok && k != "/k05" {
					want = append(want, k)
				}
			}
			for k, v := range now {
				if _, ok := told[k]; !ok && k != "/k50" || ok && told[k] != v && k != "/k06" {
					want = append(want, k)
				}
			}
			sort.Strings(want)
			require.Equal(t, want, updatedKeys(t, st.log))
			require.True(t, st.has("/k50", ""), "an empty value reaches the state")
		})
	}
}

// TestRepeatedReloadsTellOnlyTheDifferenceAndCommitsStillSucceed: three
// compactions in a row while the worker is cut off, with a key deleted,
// re-created, and deleted and re-created again between two loads, a changed
// key, new empty keys, reserved keys of a nested prefix and a bump of the
// worker's delete counter: each reload tells exactly the changed keys, with
// isInit; afterwards a commit writing an unchanged key and deleting one
// succeeds (no sweep mark or stale counter revision in its compares).
func TestRepeatedReloadsTellOnlyTheDifferenceAndCommitsStillSucceed(t *testing.T) {
	t.Parallel()
	const prefix = "/test/reload"
	env := newTestEnv(t, ownServer(), withProxy())
	admin := env.cli
	ctx := testContext(t)
	for _, k := range []string{"/stable", "/c", "/x", "/k1"} {
		mustPutKV(ctx, t, admin, prefix+k, "s")
	}
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	st := newRecordingState(prefix)
	reactor := &logReactor{}
	done := proxiedWorker(runCtx, t, env, &rpcCounter{}, 0, prefix, reactor, st)
	waitUntil(ctx, t, "the loaded state", func() bool { return reactor.equals(etcdSnapshot(ctx, t, admin, prefix)) })
	_, log := reactor.snapshot()
	seen := len(log)
	for cycle := 1; cycle <= 3; cycle++ {
		env.proxy.Pause()
		switch cycle {
		case 1, 3:
			_, err := admin.Delete(ctx, prefix+"/x")
			require.NoError(t, err)
			if cycle == 3 {
				mustPutKV(ctx, t, admin, prefix+"/x", "s")
			}
		case 2:
			mustPutKV(ctx, t, admin, prefix+"/x", "s")
		}
		mustPutKV(ctx, t, admin, prefix+"/c", fmt.Sprint(cycle))
		mustPutKV(ctx, t, admin, fmt.Sprintf("%s/n%d", prefix, cycle), "")
		mustPutKV(ctx, t, admin, keysOf(prefix+"/sub").tokenKey(fmt.Sprint(cycle)), "t")
		mustPutKV(ctx, t, admin, keysOf(prefix).counterKey, "")
		_, err := etcdtest.Compact(ctx, admin)
		require.NoError(t, err)
		env.proxy.Resume()
		waitUntil(ctx, t, "the reloaded state", func() bool { return reactor.equals(etcdSnapshot(ctx, t, admin, prefix)) })
		_, log = reactor.snapshot()
		require.Equal(t, []string{"/c", fmt.Sprintf("/n%d", cycle), "/x"}, updatedKeys(t, log[seen:]), "cycle %d", cycle)
		seen = len(log)
	}

	var once sync.Once
	reactor.mu.Lock()
	reactor.act = func(st *recordingState) {
		once.Do(func() { st.group(st.appendTo("/stable", "x"), deletePatch(st.key("/k1"))) })
	}
	reactor.mu.Unlock()
	waitUntil(ctx, t, "the commit", func() bool {
		snap := etcdSnapshot(ctx, t, admin, prefix)
		_, has := snap["/k1"]
		return snap["/stable"] == "sx" && !has && reactor.equals(snap)
	})
	cancel()
	require.True(t, IsCleanStop(recvErr(ctx, t, done)))
}

// TestFallbackPagesUnderATinyReceiveLimitRestartAfterACompactionBetweenPages:
// on a server without RangeStream and a client whose receive limit is far
// below the prefix, the load pages; a compaction between two pages makes it
// start over, and the state ends equal to etcd with every key told with
// isInit, nothing torn.
func TestFallbackPagesUnderATinyReceiveLimitRestartAfterACompactionBetweenPages(t *testing.T) {
	t.Parallel()
	const prefix = "/test/fallback"
	env := newTestEnv(t, ownServer(), withProxy())
	admin := env.cli
	ctx := testContext(t)
	big := string(make([]byte, 1000))
	for i := range 100 {
		mustPutKV(ctx, t, admin, fmt.Sprintf("%s/k%03d", prefix, i), big)
	}
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	st := newRecordingState(prefix)
	counter := &rpcCounter{noStream: true}
	var compacted atomic.Bool
	counter.afterRange = func(n int) {
		if n != 2 || !compacted.CompareAndSwap(false, true) {
			return
		}
		_, err := admin.Delete(ctx, prefix+"/k099")
		if err == nil {
			_, err = admin.Put(ctx, prefix+"/k000", "changed")
		}
		if err == nil {
			_, err = etcdtest.Compact(ctx, admin)
		}
		if err != nil {
			t.Error(err)
		}
	}
	reactor := &logReactor{}
	done := proxiedWorker(runCtx, t, env, counter, 16<<10, prefix, reactor, st, WithPageSize(10))
	waitUntil(ctx, t, "the loaded state", func() bool { return reactor.equals(etcdSnapshot(ctx, t, admin, prefix)) })
	_, log := reactor.snapshot()
	for _, u := range log {
		require.True(t, u.isInit, "%s", u.rel)
	}
	// The cut load is never told: the Source loads again and the state
	// gets the 99 keys of the complete load, once each.
	require.True(t, compacted.Load())
	require.Len(t, log, 99, "the state is told the complete load only")
	_, _, ranges := counter.counts()
	require.Greater(t, ranges, 10, "the fallback paged")
	cancel()
	require.True(t, IsCleanStop(recvErr(ctx, t, done)))
}

// variedKey is a key of length that varies with i (1 to ~300 bytes past the
// prefix), so that the key slices fall in many allocation size classes.
func variedKey(prefix string, i int) string {
	return fmt.Sprintf("%s/k%04d-%s", prefix, i, strings.Repeat(string(rune('a'+i%26)), (i*37)%300))
}

// TestRetainedKeysNeverChange. Invariant (commit "Keys from
// etcd's responses are not copied"): a key string given to
// ReactorState.Update is immutable, it reads the same forever, whatever
// loads, reloads (streaming and paged fallback) and watch responses arrive
// afterwards; so are the value slices shared with the state.
func TestRetainedKeysNeverChange(t *testing.T) {
	t.Parallel()
	for _, noStream := range []bool{false, true} {
		t.Run(fmt.Sprintf("noStream=%v", noStream), func(t *testing.T) {
			t.Parallel() // each has its own etcd; mostly waits for reconnections
			prefix := "/test/retained-keys"
			env := newTestEnv(t, ownServer(), withProxy())
			admin := env.cli
			ctx := contextWithin(t, 3*time.Minute) // 4 cycles of rewrites and reloads: slow on a busy machine
			for i := range 200 {
				mustPutKV(ctx, t, admin, variedKey(prefix, i), strings.Repeat("v", i%50))
			}
			state := &retainingState{recordingState: newRecordingState(prefix)}
			reactor := &retainingSnapshotter{}
			runCtx, cancel := context.WithCancel(ctx)
			defer cancel()
			done := proxiedWorker(runCtx, t, env, &rpcCounter{noStream: noStream}, 0, prefix, reactor, state, WithPageSize(7))
			synced := func(what string) {
				waitUntil(ctx, t, what, func() bool { return reactor.equals(etcdSnapshot(ctx, t, admin, prefix)) })
			}
			synced("the loaded state")
			for cycle := range 4 {
				// watch: rewrite, delete and create keys of every length
				for i := cycle; i < 200; i += 3 {
					mustPutKV(ctx, t, admin, variedKey(prefix, i), fmt.Sprintf("r%d-%d", cycle, i))
				}
				for i := cycle + 1; i < 200; i += 5 {
					_, err := admin.Delete(ctx, variedKey(prefix, i))
					require.NoError(t, err)
				}
				synced(fmt.Sprintf("cycle %d watched", cycle))
				// reload with differences
				reloadByCompaction(ctx, t, env, func() {
					for i := cycle + 1; i < 200; i += 5 {
						mustPutKV(ctx, t, admin, variedKey(prefix, i), fmt.Sprintf("back%d", cycle))
					}
					for i := 200 + cycle*50; i < 250+cycle*50; i++ {
						mustPutKV(ctx, t, admin, variedKey(prefix, i), "new")
					}
				})
				synced(fmt.Sprintf("cycle %d reloaded", cycle))
				runtime.GC()
				require.Empty(t, state.corrupted(), "cycle %d", cycle)
			}
			cancel()
			require.True(t, IsCleanStop(recvErr(ctx, t, done)))
			runtime.GC()
			require.Empty(t, state.corrupted())
		})
	}
}

// TestALoadUnderASmallClientReceiveLimit: a worker whose client takes
// messages of at most 256 KiB (MaxCallRecvMsgSize) loads 16 keys of 40 KiB.
// The server streams them in chunks over that limit, and the load ended
// Run with the client's size error; it now reads the prefix in unary pages,
// which shrink to fit, and ticks on every key.
func TestALoadUnderASmallClientReceiveLimit(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := contextWithin(t, 20*time.Second)
	const prefix = "/test/load-small-recv-limit"
	for i := range 16 {
		mustPutKV(ctx, t, env.cli, fmt.Sprintf("%s/k%02d", prefix, i), strings.Repeat("b", 40<<10))
	}
	var keys atomic.Int64
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		keys.Store(int64(len(s.(*mapState).values)))
		return s, ErrReactorFinished
	})
	cfg := env.clientConfig()
	cfg.MaxCallRecvMsgSize = 256 << 10
	w := mustNewEtcdWorker(t, etcdtest.NewClientFromConfig(t, cfg), prefix, reactor, newMapState(prefix))
	require.NoError(t, w.Run(ctx, nil, behaviourTick, "small-recv-limit"))
	require.EqualValues(t, 16, keys.Load())
}

// chunkCounter counts the range streams of a client, their chunks, and
// the streams broken by a chunk over the receive limit after others.
type chunkCounter struct {
	chunks, brokenAfterData, streams atomic.Int64
}

type countedStream struct {
	grpc.ClientStream
	c    *chunkCounter
	seen int
}

func (s *countedStream) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	switch {
	case err == nil:
		s.seen++
		s.c.chunks.Add(1)
	case s.seen > 0 && status.Code(err) == codes.ResourceExhausted:
		s.c.brokenAfterData.Add(1)
	}
	return err
}

func (c *chunkCounter) dialOption() grpc.DialOption {
	return grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn,
		method string, streamer grpc.Streamer, opts ...grpc.CallOption,
	) (grpc.ClientStream, error) {
		cs, err := streamer(ctx, desc, cc, method, opts...)
		if err != nil || method != etcdserverpb.KV_RangeStream_FullMethodName {
			return cs, err
		}
		c.streams.Add(1)
		return &countedStream{ClientStream: cs, c: c}, nil
	})
}

// TestAStreamChunkOverTheReceiveLimitIsNoOutage: a load whose stream breaks
// on a chunk over the client's receive limit after its first chunk (10
// small keys, then 20 of 100 KiB), under a worker with WithMaxOutage.
// etcd answered every request (the client refused a chunk), yet the
// follower took the broken stream for a failed request and Run ended with
// ErrEtcdUnavailable; it now starts over in pages at once. The control's
// first chunk is already over the limit (the stream delivered nothing).
func TestAStreamChunkOverTheReceiveLimitIsNoOutage(t *testing.T) {
	t.Parallel()
	const maxOutage = 2 * time.Second // long enough for a loaded machine
	for _, smallFirst := range []bool{true, false} {
		t.Run(fmt.Sprintf("smallFirstChunk=%v", smallFirst), func(t *testing.T) {
			t.Parallel()
			env := newTestEnv(t)
			admin := env.cli
			ctx := contextWithin(t, 20*time.Second)
			prefix := fmt.Sprintf("/test/stream-chunk-outage-%v", smallFirst)
			clearPrefix(ctx, t, admin, prefix)
			big := strings.Repeat("b", 100<<10)
			for i := range 10 {
				v := big + strings.Repeat("c", 20<<10) // 10 of them are over the limit
				if smallFirst {
					v = "s"
				}
				mustPutKV(ctx, t, admin, fmt.Sprintf("%s/a%02d", prefix, i), v)
			}
			for i := range 20 {
				mustPutKV(ctx, t, admin, fmt.Sprintf("%s/b%02d", prefix, i), big)
			}
			counter := &chunkCounter{}
			cfg := env.clientConfig(counter.dialOption())
			cfg.MaxCallRecvMsgSize = 1 << 20
			cli := etcdtest.NewClientFromConfig(t, cfg)
			var keys atomic.Int64
			reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
				keys.Store(int64(len(s.(*mapState).values)))
				return s, ErrReactorFinished
			})
			reg := prometheus.NewRegistry()
			w := mustNewEtcdWorker(t, cli, prefix, reactor, newMapState(prefix),
				WithMaxOutage(maxOutage), WithLogger(faultLogger(t)), WithMetrics(reg))
			start := time.Now()
			err := w.Run(ctx, nil, behaviourTick, "chunk-outage")
			t.Logf("Run took %v; streams %d, chunks %d, broken after data %d", time.Since(start),
				counter.streams.Load(), counter.chunks.Load(), counter.brokenAfterData.Load())
			if smallFirst {
				require.GreaterOrEqual(t, counter.brokenAfterData.Load(), int64(1), "the scenario: a stream broken after keys")
			} else {
				require.Zero(t, counter.chunks.Load(), "the control: the first chunk is over the limit")
			}
			require.NoError(t, err, "etcd answered every request")
			// No failed request either: the broken stream was no outage (it
			// was counted as a retried load, which a short WithMaxOutage
			// turned into ErrEtcdUnavailable).
			require.Zero(t, metricSum(t, reg, "orchestrator_source_retries_total"))
			require.EqualValues(t, 30, keys.Load())
		})
	}
}
