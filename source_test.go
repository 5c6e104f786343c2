package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/util"
)

// mustNewSource returns a Source on prefix.
func mustNewSource(t testing.TB, cli *clientv3.Client, prefix string, opts ...SourceOption) *Source {
	t.Helper()
	src, err := NewSource(cli, prefix, opts...)
	require.NoError(t, err)
	return src
}

// startSynced runs ws in a worker group (for at most a minute; worker i
// named "<name>-<i>") and waits until every one of them is synced.
func startSynced(ctx context.Context, t testing.TB, name string, ws ...*EtcdWorker) *workerGroup {
	t.Helper()
	g := startWorkerGroup(t, time.Minute, name, ws)
	for _, w := range ws {
		require.NoError(t, w.WaitSynced(ctx))
	}
	return g
}

// otherOnSource runs an idle worker on src for the rest of the test, so that
// the Source keeps following etcd between the Runs of another worker; ctx
// bounds the wait until it is synced.
func otherOnSource(ctx context.Context, t testing.TB, cli *clientv3.Client, prefix string, src *Source) *EtcdWorker {
	t.Helper()
	other := mustNewEtcdWorker(t, cli, prefix, idleReactor(), newMapState(prefix), WithSource(src))
	g := startSynced(ctx, t, "other", other)
	t.Cleanup(func() { g.stop(t) })
	return other
}

// followedSource puts keys (relative to prefix) with value "0", and starts a
// Source on prefix that otherOnSource keeps following etcd; it returns the
// Source and that idle worker.
func followedSource(ctx context.Context, t testing.TB, cli *clientv3.Client, prefix string, keys ...string) (*Source, *EtcdWorker) {
	t.Helper()
	for _, k := range keys {
		mustPutKV(ctx, t, cli, prefix+k, "0")
	}
	src := mustNewSource(t, cli, prefix)
	return src, otherOnSource(ctx, t, cli, prefix, src)
}

// sourceFollowing reports whether src has a follower (a watch) running.
func sourceFollowing(src *Source) bool {
	src.lifeMu.Lock()
	defer src.lifeMu.Unlock()
	return src.fol != nil
}

func TestSourceRejectsPrefixesOutsideIt(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	src := mustNewSource(t, cli, "/sp")
	noop := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) { return s, nil })
	cases := []struct {
		prefix string
		ok     bool
	}{
		{"/sp", true}, {"sp/", true}, {"/sp/sub", true}, {"/sp/a/b", true},
		{"/other", false}, {"/spx", false}, {"/s", false}, {"/", false},
		{"/sp/__orchestrator", false}, {"/sp/x/__orchestrator/y", false},
	}
	for _, c := range cases {
		t.Run(c.prefix, func(t *testing.T) {
			_, err := NewEtcdWorker(cli, c.prefix, noop, newMapState(c.prefix), WithSource(src))
			if c.ok {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, ErrInvalidArgument)
			require.Contains(t, err.Error(), util.NormalizePrefix(c.prefix).String(), "the error names the worker's prefix")
			if !strings.Contains(util.NormalizePrefix(c.prefix).Dir(), reservedDir) {
				require.Contains(t, err.Error(), `"/sp"`, "the error names the Source's prefix")
			}
		})
	}
	_, err := NewSource(nil, "/sp")
	require.ErrorIs(t, err, ErrInvalidArgument)
	_, err = NewSource(cli, "/sp/__orchestrator")
	require.ErrorIs(t, err, ErrInvalidArgument, "a Source on a reserved area")
	_, err = NewSource(cli, "/sp", WithSourceRequestTimeout(0))
	require.ErrorIs(t, err, ErrInvalidArgument)
	require.False(t, sourceFollowing(src), "a Source starts nothing by itself")
}

// TestSourceBankAllWorkersOnOneSource: six bank workers share one Source
// behind a fault proxy (each commits through its own client), through cuts
// and a compaction during an outage. Every Tick checks the invariants, and
// etcd ends with the exact totals; the Source reloads once per compaction.
func TestSourceBankAllWorkersOnOneSource(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, ownServer(), withProxy())
	ctx := testContext(t)
	b := newBankWorld("/source/bank", 6, 8)
	src := mustNewSource(t, env.client(t), b.prefix, WithSourceMetrics(env.reg),
		WithSourceRequestTimeout(faultRequestTimeout))
	ws := make([]*EtcdWorker, b.workers)
	for i := range ws {
		ws[i] = b.newWorker(t, env.client(t), i, faultOptions(env.reg, faultLogger(t), WithSource(src))...)
	}
	g := startWorkerGroup(t, 3*time.Minute, "bank", ws)
	b.waitProgress(t, g, 20, "before the outage")

	env.proxy.Pause()
	externalBankWrites(ctx, t, env.cli, b, 0)
	_, err := etcdtest.Compact(ctx, env.cli)
	require.NoError(t, err)
	env.proxy.Resume()
	waitWithin(t, faultProgressTimeout, "the source reloads", g.failed, func() bool {
		return metricSum(t, env.reg, "orchestrator_source_reloads_total") >= 1
	})
	b.waitProgress(t, g, 20, "after the outage")
	b.finish(t, g, env.cli)
	require.Equal(t, 1.0, metricSum(t, env.reg, "orchestrator_source_reloads_total"), "one reload for all workers")
	require.False(t, sourceFollowing(src), "the last worker stopped the Source")
}

// TestSourceSubPrefixWorkerIsALoneWorkerOnItsPrefix: a worker on a prefix
// under its Source's sees only its keys, writes only there, and its commits
// reach the worker on the Source's whole prefix.
func TestSourceSubPrefixWorkerIsALoneWorkerOnItsPrefix(t *testing.T) {
	t.Parallel()
	cli := newTestEnv(t).cli
	ctx := testContext(t)
	mustPutKV(ctx, t, cli, "/sub/a", "1")
	mustPutKV(ctx, t, cli, "/sub/in/b", "2")
	mustPutKV(ctx, t, cli, "/sub/inx/c", "3")
	src := mustNewSource(t, cli, "/sub")

	var innerSaw atomic.Pointer[map[string]string]
	inner := newMapState("/sub/in")
	innerWorker := mustNewEtcdWorker(t, cli, "/sub/in", ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		snap := map[string]string{}
		for k, v := range st.values {
			snap[k] = string(v)
		}
		innerSaw.Store(&snap)
		if _, ok := st.values["/n"]; !ok {
			st.patches = [][]DataPatch{{setKey("/sub/in/n", []byte("x"))}}
		}
		return st, nil
	}), inner, WithSource(src))
	outer := newMapState("/sub")
	outerWorker := mustNewEtcdWorker(t, cli, "/sub", ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		return s, nil
	}), outer, WithSource(src))

	g := startWorkerGroup(t, time.Minute, "sub", []*EtcdWorker{innerWorker, outerWorker})
	waitUntil(ctx, t, "the inner worker's commit", func() bool {
		snap := innerSaw.Load()
		return snap != nil && (*snap)["/n"] == "x"
	})
	snap := *innerSaw.Load()
	require.Equal(t, map[string]string{"/b": "2", "/n": "x"}, snap, "the inner worker sees only its prefix")
	waitUntil(ctx, t, "the outer worker sees the inner commit", func() bool {
		return outerWorker.Status().AppliedRevision >= innerWorker.Status().AppliedRevision
	})

	// A write outside the inner prefix is an error of the inner worker only.
	bad := mustNewEtcdWorker(t, cli, "/sub/in", ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		st.patches = [][]DataPatch{{setKey("/sub/a", []byte("no"))}}
		return st, nil
	}), newMapState("/sub/in"), WithSource(src))
	require.ErrorIs(t, runWithin(t, bad, 10*time.Second, "bad"), ErrKeyOutsidePrefix)
	require.NoError(t, g.failed(), "the other workers go on")
	resp, err := cli.Get(ctx, "/sub/a")
	require.NoError(t, err)
	require.Equal(t, "1", string(resp.Kvs[0].Value))
	g.stop(t)
}

// TestSourceStuckWorkerDoesNotDelayTheOthers: one worker is stuck in Tick
// while 3,000 writes to 30 keys arrive. The other worker ticks on the newest
// write; the Source's change log stays bounded by the keys; released, the
// stuck worker catches up in one step, each key told once, and its next Tick
// sees the newest write.
func TestSourceStuckWorkerDoesNotDelayTheOthers(t *testing.T) {
	t.Parallel()
	stuckWorkerOnSource(t, newTestEnv(t))
}

// stuckWorkerOnSource is TestSourceStuckWorkerDoesNotDelayTheOthers against
// srv (also run by the server matrix).
func stuckWorkerOnSource(t *testing.T, env *testEnv) {
	cli := env.cli
	ctx := testContext(t)
	const prefix, keys, writes = "/stuck", 30, 3000
	src := mustNewSource(t, cli, prefix)

	release := make(chan struct{})
	var stuckIn atomic.Bool
	var stuckTicks atomic.Int32
	stuckState := newMapState(prefix)
	var lastStuck atomic.Value
	stuck := mustNewEtcdWorker(t, cli, prefix, ReactorFunc(func(ctx context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		lastStuck.Store(string(st.values["/k0"]))
		if stuckTicks.Add(1) == 1 {
			stuckIn.Store(true)
			if err := blockUntil(ctx, release); err != nil {
				return nil, err
			}
		}
		return st, nil
	}), stuckState, WithSource(src))
	var lastFast atomic.Value
	fast := mustNewEtcdWorker(t, cli, prefix, ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		lastFast.Store(string(s.(*mapState).values["/k0"]))
		return s, nil
	}), newMapState(prefix), WithSource(src))
	g := startWorkerGroup(t, time.Minute, "stuck", []*EtcdWorker{stuck, fast})
	waitUntil(ctx, t, "the stuck Tick", stuckIn.Load)

	updatesBefore := stuckState.updates + stuckState.inits // the stuck worker is in Tick: no race
	maxLog := 0
	for i := range writes {
		mustPutKV(ctx, t, cli, fmt.Sprintf("%s/k%d", prefix, i%keys), fmt.Sprint(i))
		if i%100 == 0 {
			src.mu.RLock()
			maxLog = max(maxLog, len(src.changes.log))
			src.mu.RUnlock()
		}
	}
	newest := fmt.Sprint(writes - keys)
	start := time.Now()
	waitUntil(ctx, t, "the fast worker sees the newest write", func() bool { return lastFast.Load() == newest })
	t.Logf("the free worker saw the newest write %v after it", time.Since(start))
	require.LessOrEqual(t, maxLog, 2*keys+compactMinOver+1, "the change log grows with keys, not events")

	close(release)
	waitUntil(ctx, t, "the stuck worker's newest Tick", func() bool { return lastStuck.Load() == newest })
	g.stop(t)
	told := stuckState.updates + stuckState.inits - updatesBefore
	require.LessOrEqual(t, told, 2*keys, "the stuck worker is told each key once or twice, not every event (%d)", told)
}

// TestSourceLateJoinTakesTheSharedCopy: a worker that starts while the
// Source runs gets a snapshot of one revision from the shared copy, all with
// isInit, without reading the prefix from etcd again.
func TestSourceLateJoinTakesTheSharedCopy(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := testContext(t)
	const prefix = "/src-late"
	admin := env.cli
	for i := range 50 {
		mustPutKV(ctx, t, admin, fmt.Sprintf("%s/k%02d", prefix, i), fmt.Sprint(i))
	}
	counter := &rpcCounter{}
	srcCli := env.client(t, counter.dialOptions()...)
	src := mustNewSource(t, srcCli, prefix)
	first := mustNewEtcdWorker(t, admin, prefix, ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		return s, nil
	}), newMapState(prefix), WithSource(src))
	g := startSynced(ctx, t, "late", first)
	mustPutKV(ctx, t, admin, prefix+"/k00", "changed")
	del, err := admin.Delete(ctx, prefix+"/k01")
	require.NoError(t, err)
	waitUntil(ctx, t, "the first worker's state", func() bool {
		return first.Status().AppliedRevision >= del.Header.Revision
	})
	reads := counter.reads()

	lateState := newMapState(prefix)
	var saw atomic.Pointer[map[string]string]
	late := mustNewEtcdWorker(t, admin, prefix, ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		snap := map[string]string{}
		for k, v := range st.values {
			snap[k] = string(v)
		}
		saw.Store(&snap)
		return st, ErrReactorFinished
	}), lateState, WithSource(src))
	require.NoError(t, runWithin(t, late, 10*time.Second, "late"))
	require.Equal(t, etcdSnapshot(ctx, t, admin, prefix), *saw.Load())
	require.Equal(t, 49, lateState.inits)
	require.Zero(t, lateState.updates, "a late join is a load: isInit = true")
	require.Equal(t, reads, counter.reads(), "no read of the prefix for a late join")
	g.stop(t)
}

// TestSourceErrorOfOneWorkerEndsOnlyItsRun: an error, a panic or a lost
// fencing key of one worker ends only its Run.
func TestSourceErrorOfOneWorkerEndsOnlyItsRun(t *testing.T) {
	t.Parallel()
	cli := newTestEnv(t).cli
	ctx := testContext(t)
	const prefix = "/srcerr"
	src := mustNewSource(t, cli, prefix)
	var ticks atomic.Int64
	survivor := mustNewEtcdWorker(t, cli, prefix, counterReactor(&ticks), newMapState(prefix), WithSource(src))
	g := startSynced(ctx, t, "survivor", survivor)

	boom := errors.New("boom")
	fencing, err := cli.Put(ctx, "/srcerr-fence", "x")
	require.NoError(t, err)
	cases := map[string]struct {
		tick func() error
		opts []Option
		want error
	}{
		"error": {tick: func() error { return boom }, want: boom},
		"panic": {tick: func() error { panic("boom") }, want: ErrPanic},
		"fencing key lost": {tick: func() error {
			_, err := cli.Delete(ctx, "/srcerr-fence")
			return err
		}, opts: []Option{WithFencingKey("/srcerr-fence", fencing.Header.Revision)}, want: ErrNotOwner},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			w := mustNewEtcdWorker(t, cli, prefix, ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
				return s, c.tick()
			}), newMapState(prefix), append(c.opts, WithSource(src))...)
			require.ErrorIs(t, runWithin(t, w, 20*time.Second, name), c.want) //nolint:contextcheck // runWithin bounds its own context
			before := ticks.Load()
			waitUntil(ctx, t, "the other worker goes on", func() bool { return ticks.Load() > before+2 })
			require.NoError(t, g.failed())
		})
	}
	g.stop(t)
}

// TestSourceLastWorkerLeavesAndTheSourceServesAgain: when the last worker
// returns, the Source holds no watch and no goroutine; a later worker starts
// it again and is told what changed in between.
func TestSourceLastWorkerLeavesAndTheSourceServesAgain(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	ctx := testContext(t)
	const prefix = "/srcagain"
	mustPutKV(ctx, t, cli, prefix+"/a", "1")
	mustPutKV(ctx, t, cli, prefix+"/b", "1")
	src := mustNewSource(t, cli, prefix)
	state := newMapState(prefix)
	w := mustNewEtcdWorker(t, cli, prefix, ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		return s, ErrReactorFinished
	}), state, WithSource(src))
	other := mustNewEtcdWorker(t, cli, prefix, ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		return s, ErrReactorFinished
	}), newMapState(prefix), WithSource(src))
	require.NoError(t, runWithin(t, w, 10*time.Second, "first"))
	require.NoError(t, runWithin(t, other, 10*time.Second, "other"))
	require.False(t, sourceFollowing(src))
	require.Equal(t, 2, state.inits)

	mustPutKV(ctx, t, cli, prefix+"/a", "2")
	_, err := cli.Delete(ctx, prefix+"/b")
	require.NoError(t, err)
	mustPutKV(ctx, t, cli, prefix+"/c", "3")
	require.NoError(t, runWithin(t, w, 10*time.Second, "second"))
	require.False(t, sourceFollowing(src))
	require.Equal(t, map[string][]byte{"/a": []byte("2"), "/c": []byte("3")}, state.values)
	require.Equal(t, 2+3, state.inits, "the second Run is told the three changes only, as a load")
}

// TestSourceOutageCountsForEveryWorker: a Source cut off from etcd is an
// outage of its workers: each one's WithMaxOutage applies.
func TestSourceOutageCountsForEveryWorker(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, withProxy())
	const prefix = "/srcout"
	src := mustNewSource(t, env.client(t), prefix, WithSourceRequestTimeout(time.Second))
	ws := []*EtcdWorker{
		mustNewEtcdWorker(t, env.cli, prefix, ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
			return s, nil
		}), newMapState(prefix), WithSource(src), WithMaxOutage(2*time.Second)),
		mustNewEtcdWorker(t, env.cli, prefix, ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
			return s, nil
		}), newMapState(prefix), WithSource(src), WithMaxOutage(3*time.Second)),
	}
	ctx := testContext(t)
	g := startSynced(ctx, t, "out", ws...)
	env.proxy.Blackhole()
	start := time.Now()
	errs := g.wait(t, 20*time.Second)
	elapsed := time.Since(start)
	for name, err := range errs {
		require.ErrorIs(t, err, ErrEtcdUnavailable, name)
	}
	require.Less(t, elapsed, 8*time.Second, "each worker's outage limit applies to the Source")
	env.proxy.Resume()
}

// watchRequests counts the watch requests a client sends: the watches it
// asks etcd to create, and its progress requests.
type watchRequests struct{ creates, progress atomic.Int64 }

func (w *watchRequests) dialOptions() []grpc.DialOption { return watchTap{sent: w}.dialOptions() }

// watchTap intercepts the Watch streams of a client. It counts the
// requests they send in sent (nil: no count). With a hold, each stream
// receives its responses in a goroutine of its own (pump, which ends with
// the stream) and hands one to the client only once hold returns: hold is
// given the stream's context, the response and when the pump received it,
// and returns when the response may go on, or once the context ended.
// Without a hold, responses go through as they come.
type watchTap struct {
	sent *watchRequests
	hold func(ctx context.Context, resp *pb.WatchResponse, arrived time.Time)
}

// dialOptions returns dial options that hand every Watch stream the client
// opens to the tap, and other streams through as they are.
func (tap watchTap) dialOptions() []grpc.DialOption {
	return []grpc.DialOption{grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc,
		cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption,
	) (grpc.ClientStream, error) {
		cs, err := streamer(ctx, desc, cc, method, opts...)
		if err != nil || method != pb.Watch_Watch_FullMethodName {
			return cs, err
		}
		s := &tappedWatchStream{ClientStream: cs, tap: tap}
		if tap.hold != nil {
			s.in, s.end = make(chan pumpedResponse, 4096), make(chan struct{})
			go s.pump()
		}
		return s, nil
	})}
}

// pumpedResponse is one response the pump received, and when.
type pumpedResponse struct {
	resp    *pb.WatchResponse
	arrived time.Time
}

// tappedWatchStream is a Watch stream of a watchTap.
type tappedWatchStream struct {
	grpc.ClientStream
	tap watchTap
	in  chan pumpedResponse // with a hold: what the pump received, in order
	end chan struct{}       // with a hold: closed once the pump ended, after its last send on in
	err error               // why the stream ended; set before end is closed
}

func (s *tappedWatchStream) SendMsg(m any) error {
	if req, ok := m.(*pb.WatchRequest); ok && s.tap.sent != nil {
		switch {
		case req.GetCreateRequest() != nil:
			s.tap.sent.creates.Add(1)
		case req.GetProgressRequest() != nil:
			s.tap.sent.progress.Add(1)
		}
	}
	return s.ClientStream.SendMsg(m)
}

// pump receives the stream's responses until the stream fails, which it
// does once its context ends. A response that arrives after the context
// ended while the client does not read is dropped.
func (s *tappedWatchStream) pump() {
	defer close(s.end)
	for {
		resp := &pb.WatchResponse{}
		if err := s.ClientStream.RecvMsg(resp); err != nil {
			s.err = err
			return
		}
		select {
		case s.in <- pumpedResponse{resp: resp, arrived: time.Now()}:
		case <-s.Context().Done():
		}
	}
}

func (s *tappedWatchStream) RecvMsg(m any) error {
	if s.tap.hold == nil {
		return s.ClientStream.RecvMsg(m)
	}
	var r pumpedResponse
	select {
	case r = <-s.in:
	case <-s.end:
		select {
		case r = <-s.in: // received before the stream ended: it goes first
		default:
			return s.err
		}
	}
	s.tap.hold(s.Context(), r.resp, r.arrived)
	dst, ok := m.(*pb.WatchResponse)
	if !ok {
		return fmt.Errorf("test: a Watch response into a %T", m)
	}
	proto.Reset(dst)
	proto.Merge(dst, r.resp)
	return nil
}

// TestSourceEightWorkersHoldOneWatch: eight workers on one Source ask etcd
// for one watch; eight lone workers for eight.
func TestSourceEightWorkersHoldOneWatch(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := testContext(t)
	for _, shared := range []bool{true, false} {
		t.Run(fmt.Sprintf("shared=%v", shared), func(t *testing.T) {
			prefix := fmt.Sprintf("/srcwatch-%v", shared)
			creates := &watchRequests{}
			cli := env.client(t, creates.dialOptions()...)
			src := mustNewSource(t, cli, prefix)
			ws := make([]*EtcdWorker, 8)
			for i := range ws {
				var opts []Option
				if shared {
					opts = append(opts, WithSource(src))
				}
				ws[i] = mustNewEtcdWorker(t, cli, prefix, ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
					return s, nil
				}), newMapState(prefix), opts...)
			}
			g := startSynced(ctx, t, "watch", ws...)
			want := int64(8)
			if shared {
				want = 1
			}
			waitUntil(ctx, t, "the watches", func() bool { return creates.creates.Load() >= want })
			put, err := cli.Put(ctx, prefix+"/k", "v")
			require.NoError(t, err)
			waitUntil(ctx, t, "every worker sees the put", func() bool {
				for _, w := range ws {
					if w.Status().AppliedRevision < put.Header.Revision {
						return false
					}
				}
				return true
			})
			require.Equal(t, want, creates.creates.Load(), "watches asked of etcd")
			g.stop(t)
		})
	}
}

// TestChangeLogFoldsChangesAndPrunes is a unit test of the change log.
func TestChangeLogFoldsChangesAndPrunes(t *testing.T) {
	l := newChangeLog()
	k := util.NewEtcdKey
	l.record(k("/a"), changePut, false)    // 1
	l.record(k("/b"), changeCreate, false) // 2
	l.record(k("/a"), changePut, false)    // 3
	since := func(from uint64) []string {
		var out []string
		l.since(from, func(key util.EtcdKey, rec changeRecord) {
			out = append(out, fmt.Sprintf("%s@%d/%v", key.String(), rec.seq, rec.flips))
		})
		return out
	}
	require.Equal(t, []string{"/b@2/[2]", "/a@3/[]"}, since(0), "each key once, newest change, in order")
	require.Equal(t, []string{"/a@3/[]"}, since(2))
	require.Empty(t, since(3))
	l.prune(2, []cursorPos{{2, 3}})
	require.NotContains(t, l.changes, k("/b"), "a record every cursor has passed is pruned")
	require.Equal(t, []logEntry{{key: k("/a"), seq: 3}}, l.log, "so is its log entry, and the stale one of /a")
	require.Equal(t, []string{"/a@3/[]"}, since(2))
	l.prune(3, []cursorPos{{3, 3}})
	require.Empty(t, l.log)
	require.Empty(t, l.changes)
	for i := range 10 * compactMinOver {
		l.record(k("/hot"), changePut, false)
		l.prune(uint64(i), []cursorPos{{uint64(i), uint64(i)}}) // a cursor one change behind
	}
	require.LessOrEqual(t, len(l.log), 2+compactMinOver, "stale entries are dropped")
	// Keys born and deleted after all a cursor was told leave no record.
	for i := range 10 * compactMinOver {
		key := k(fmt.Sprintf("/short/%d", i))
		l.record(key, changeCreate, false)
		l.record(key, changeDelete, false)
		l.prune(1, []cursorPos{{1, 1}, {l.seq, l.seq}}) // a stuck cursor and one that keeps up
	}
	require.LessOrEqual(t, len(l.changes), 2*compactMinOver+2, "records of keys no cursor held are dropped")
	require.True(t, changeRecord{aliveAtStart: true, flips: []uint64{5}}.mayHold(4, 4), "held at the position")
	require.False(t, changeRecord{aliveAtStart: true, flips: []uint64{5, 7, 8}}.mayHold(5, 6), "deleted, told, re-created later")
	require.True(t, changeRecord{flips: []uint64{7, 9}}.mayHold(3, 7), "created within a catch-up that was told in part")
	require.False(t, changeRecord{flips: []uint64{2, 3, 7, 9}}.mayHold(4, 6), "a second life after all the state was told")
	require.True(t, changeRecord{flips: []uint64{2, 3, 7, 9}, foldedBefore: 2}.mayHold(1, 1), "lives folded away: the safe answer")
}

// TestPositionsSeeACursorThatStartsAndStops: a positioned cursor moving
// between running and parked (a worker's Runs starting and returning, over
// and over) is in every floor the follower takes meanwhile. A floor that
// missed it would let the change log drop changes the worker has not seen,
// and the worker would keep a deleted key.
func TestPositionsSeeACursorThatStartsAndStops(t *testing.T) {
	ctx := testContext(t)
	src := mustNewSource(t, &clientv3.Client{}, "/moves")
	c := src.newCursor(src.ks)
	c.seq.Store(7)
	c.positioned.Store(true)
	src.lifeMu.Lock()
	src.moveCursor(c, false) // a Run of the worker returned
	src.lifeMu.Unlock()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 200_000 && ctx.Err() == nil; i++ {
			src.lifeMu.Lock()
			src.moveCursor(c, i%2 == 0)
			src.lifeMu.Unlock()
		}
	}()
	floors, missed := 0, 0
	for moving := true; moving; floors++ {
		select {
		case <-done:
			moving = false
		default:
		}
		if floor, cursors := src.positions(); floor != 7 || len(cursors) == 0 {
			missed++
		}
	}
	require.Zero(t, missed, "floors that missed the cursor, of %d", floors)
}

// TestSourcePermissionDeniedEndsEveryWorker: a Source whose reads etcd
// rejects for good (its user has no rights on the prefix) ends the Run of
// every worker on it with that error, though the workers' own clients may
// read and write.
func TestSourcePermissionDeniedEndsEveryWorker(t *testing.T) {
	t.Parallel()
	const prefix = "/srcauth"
	env := newTestEnv(t, ownServer(), withAuth(prefix))
	src := mustNewSource(t, env.userClient(t, "nobody", "pw"), prefix)
	cli := env.userClient(t, "reader-writer", "pw")
	ws := make([]*EtcdWorker, 3)
	for i := range ws {
		ws[i] = mustNewEtcdWorker(t, cli, prefix, &incrWriter{}, newMapState(prefix), WithSource(src))
	}
	g := startWorkerGroup(t, time.Minute, "auth", ws)
	for name, err := range g.wait(t, 20*time.Second) {
		require.ErrorIs(t, err, ErrEtcdRejected, name)
		require.ErrorIs(t, err, rpctypes.ErrPermissionDenied, name)
	}
	require.False(t, sourceFollowing(src))
}

// copyValueBytes returns the bytes of the values the Source's copy holds
// for its keys (live) and in base entries its overlay hides (dead: values
// etcd no longer has).
func copyValueBytes(src *Source) (live, dead int) {
	src.mu.RLock()
	defer src.mu.RUnlock()
	m := src.copy
	for _, e := range m.base {
		if _, hidden := m.over[e.key]; hidden {
			dead += len(e.value)
		} else {
			live += len(e.value)
		}
	}
	for _, e := range m.over {
		live += len(e.value)
	}
	return live, dead
}

// TestTheCopyLetsGoOfDeadValues: the copy's sorted base keeps the old value
// of a key its overlay changed or deleted until the two are merged, which
// waited for a thousand overlay entries: 40 deleted values of 256 KiB, on a
// prefix with no key left, stayed in memory for good. The merge now comes
// once the overlay holds half as many keys as the base (and more than a
// few), so dead values stay below half the live ones.
func TestTheCopyLetsGoOfDeadValues(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	ctx := contextWithin(t, 30*time.Second)
	const prefix, n, size = "/test/copy-dead-values", 40, 256 << 10
	put := func(tag string) int64 {
		var rev int64
		for i := range n {
			resp, err := cli.Put(ctx, fmt.Sprintf("%s/k%02d", prefix, i), tag+strings.Repeat("x", size-len(tag)))
			require.NoError(t, err)
			rev = resp.Header.Revision
		}
		return rev
	}
	put("old")
	src := mustNewSource(t, cli, prefix)
	w := mustNewEtcdWorker(t, cli, prefix, idleReactor(), newMapState(prefix), WithSource(src))
	g := startSynced(ctx, t, "dead-values", w)
	defer g.stop(t)
	seen := func(rev int64) {
		waitUntil(ctx, t, "the worker sees the writes", func() bool { return w.Status().AppliedRevision >= rev })
	}

	seen(put("new"))
	live, dead := copyValueBytes(src)
	require.Equal(t, n*size, live)
	require.LessOrEqual(t, dead, live/2, "overwritten values held beside the new ones")

	del, err := cli.Delete(ctx, prefix+"/", clientv3.WithPrefix())
	require.NoError(t, err)
	seen(del.Header.Revision)
	live, dead = copyValueBytes(src)
	require.Zero(t, live)
	require.LessOrEqual(t, dead, overMinCompact*size, "values of deleted keys held with no key left")
}
