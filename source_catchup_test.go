package orchestrator

// How a worker on the shared Source catches up, against a real embedded
// etcd: after failed first snapshots, while stuck, in a reload, as a late
// joiner and on a sub-prefix. Names say the behaviour DESIGN "Catching up"
// promises; the faults themselves are in source_catchup_faults_test.go.

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	"github.com/etcdworker/orchestrator/util"
)

// stuckOnSource starts a worker on src whose first Tick blocks until the
// test ends: its position keeps every change log record after it.
func stuckOnSource(t *testing.T, cli *clientv3.Client, prefix string, src *Source) *EtcdWorker {
	t.Helper()
	ctx := testContext(t)
	release := make(chan struct{})
	var in atomic.Bool
	stuck := mustNewEtcdWorker(t, cli, prefix, ReactorFunc(func(ctx context.Context, s ReactorState) (ReactorState, error) {
		in.Store(true)
		if err := blockUntil(ctx, release); err != nil {
			return nil, err
		}
		return s, nil
	}), newMapState(prefix), WithSource(src))
	g := startWorkerGroup(t, time.Minute, "stuck", []*EtcdWorker{stuck})
	t.Cleanup(func() { close(release); g.stop(t) })
	waitUntil(ctx, t, "the stuck Tick", in.Load)
	return stuck
}

// holdingReactor blocks in Tick while hold is set, until unhold is closed.
type holdingReactor struct {
	hold, in atomic.Bool
	unhold   chan struct{}
}

func (r *holdingReactor) Tick(ctx context.Context, s ReactorState) (ReactorState, error) {
	if r.hold.Load() {
		r.in.Store(true)
		if err := blockUntil(ctx, r.unhold); err != nil {
			return nil, err
		}
		r.hold.Store(false)
	}
	return s, nil
}

// TestSourceCatchUpNoDeleteOfAKeyFirstCreatedAfterAStuckWorkersPosition:
// /k is first created (and deleted) after a stuck worker's position, so its
// change record begins with that creation. Another worker sees both; then,
// while it is busy in Tick, /k is created and deleted again. Its next
// catch-up must not tell it to delete /k, which it never held: "a key
// created and deleted after everything a state was told is never told at
// all" (DESIGN "Catching up").
func TestSourceCatchUpNoDeleteOfAKeyFirstCreatedAfterAStuckWorkersPosition(t *testing.T) {
	t.Parallel()
	cli := newTestEnv(t).cli
	ctx := testContext(t)
	const prefix = "/test/cu-born"
	mustPutKV(ctx, t, cli, prefix+"/other", "1")
	src := mustNewSource(t, cli, prefix)
	stuckOnSource(t, cli, prefix, src)

	var v violationRecorder
	st := &strictState{mapState: newMapState(prefix), v: &v}
	r := &holdingReactor{unhold: make(chan struct{})}
	w := mustNewEtcdWorker(t, cli, prefix, r, st, WithSource(src))
	g := startSynced(ctx, t, "w", w)

	mustPutKV(ctx, t, cli, prefix+"/k", "1")
	del, err := cli.Delete(ctx, prefix+"/k")
	require.NoError(t, err)
	waitUntil(ctx, t, "the worker has the first delete", func() bool {
		return w.Status().AppliedRevision >= del.Header.Revision
	})
	r.hold.Store(true)
	waitUntil(ctx, t, "the worker is in Tick", r.in.Load)
	mustPutKV(ctx, t, cli, prefix+"/k", "2")
	del, err = cli.Delete(ctx, prefix+"/k")
	require.NoError(t, err)
	waitUntil(ctx, t, "the Source has the second delete", func() bool { return src.copyRev() >= del.Header.Revision })
	close(r.unhold)
	waitUntil(ctx, t, "the worker caught up", func() bool { return w.Status().AppliedRevision >= del.Header.Revision })
	g.stop(t)
	v.requireNone(t)
}

// failingStrictState is a mapState whose Update refuses one key while armed
// (without taking it) and which records a delete of a key it does not hold.
type failingStrictState struct {
	*mapState
	v    *violationRecorder
	fail atomic.Pointer[string]
}

func (s *failingStrictState) Update(key util.EtcdKey, value []byte, isInit bool) error {
	rel := strings.TrimPrefix(key.String(), s.prefix)
	if k := s.fail.Load(); k != nil && *k == rel {
		return errRefusedUpdate
	}
	if _, held := s.values[rel]; value == nil && !held {
		s.v.record(fmt.Errorf("delete of %s, which the state does not hold (isInit=%v)", rel, isInit))
	}
	return s.mapState.Update(key, value, isInit)
}

func (s *failingStrictState) arm(rel string) { s.fail.Store(&rel) }
func (s *failingStrictState) disarm()        { s.fail.Store(nil) }

// requireEndsEqualToEtcd disarms s, runs w (on s) to its end and requires
// s to hold exactly etcd's keys under prefix, with no violation.
func (s *failingStrictState) requireEndsEqualToEtcd(ctx context.Context, t *testing.T, w *EtcdWorker,
	cli *clientv3.Client, prefix, role string,
) {
	t.Helper()
	s.disarm()
	runCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	require.NoError(t, w.Run(runCtx, nil, behaviourTick, role))
	require.Equal(t, etcdSnapshot(ctx, t, cli, prefix), stringValues(s.values))
	s.v.requireNone(t)
}

// TestSourceCatchUpNoDeleteOfAKeyTwoFailedFirstSnapshotsNeverTold: the
// first snapshot fails at /k5 (keys after it never told); /k7 is deleted;
// the second Run's snapshot goes on from /k5 and fails at /k9; the third
// Run must not tell the state to delete /k7, which it never held, and ends
// equal to etcd.
func TestSourceCatchUpNoDeleteOfAKeyTwoFailedFirstSnapshotsNeverTold(t *testing.T) {
	t.Parallel()
	cli := newTestEnv(t).cli
	ctx := testContext(t)
	const prefix = "/test/cu-twofail"
	src, other := followedSource(ctx, t, cli, prefix, "/k1", "/k5", "/k7", "/k9")

	var v violationRecorder
	st := &failingStrictState{mapState: newMapState(prefix), v: &v}
	w := mustNewEtcdWorker(t, cli, prefix, finishReactor(), st, WithSource(src))
	st.arm("/k5")
	require.ErrorIs(t, runWithin(t, w, 10*time.Second, "first"), errRefusedUpdate)
	require.NotContains(t, st.values, "/k7", "precondition: the first snapshot stopped before /k7")
	del, err := cli.Delete(ctx, prefix+"/k7")
	require.NoError(t, err)
	waitUntil(ctx, t, "the Source has the delete", func() bool { return other.Status().AppliedRevision >= del.Header.Revision })
	st.arm("/k9")
	require.ErrorIs(t, runWithin(t, w, 10*time.Second, "second"), errRefusedUpdate)
	require.Contains(t, st.values, "/k5", "precondition: the second snapshot went on from /k5")
	st.requireEndsEqualToEtcd(ctx, t, w, cli, prefix, "third")
}

// TestSourceCatchUpFailedFirstSnapshotRestartEndsEqualToEtcd: the first
// snapshot fails at /k5; then keys before it are deleted and changed, /k5
// itself changes, keys after it are created and deleted. The next Run of
// the same worker ends equal to etcd, with no delete of a key it does not
// hold.
func TestSourceCatchUpFailedFirstSnapshotRestartEndsEqualToEtcd(t *testing.T) {
	t.Parallel()
	cli := newTestEnv(t).cli
	ctx := testContext(t)
	const prefix = "/test/cu-resume"
	src, other := followedSource(ctx, t, cli, prefix, "/k1", "/k2", "/k3", "/k5", "/k6", "/k8")

	var v violationRecorder
	st := &failingStrictState{mapState: newMapState(prefix), v: &v}
	w := mustNewEtcdWorker(t, cli, prefix, finishReactor(), st, WithSource(src))
	st.arm("/k5")
	require.ErrorIs(t, runWithin(t, w, 10*time.Second, "first"), errRefusedUpdate)
	require.Contains(t, st.values, "/k2", "precondition: keys before /k5 were told")
	_, err := cli.Delete(ctx, prefix+"/k1")
	require.NoError(t, err)
	mustPutKV(ctx, t, cli, prefix+"/k2", "changed")
	mustPutKV(ctx, t, cli, prefix+"/k4", "new")
	mustPutKV(ctx, t, cli, prefix+"/k5", "changed")
	_, err = cli.Delete(ctx, prefix+"/k6")
	require.NoError(t, err)
	mustPutKV(ctx, t, cli, prefix+"/k7", "new")
	mustPutKV(ctx, t, cli, prefix+"/k9", "new")
	del, err := cli.Delete(ctx, prefix+"/k9")
	require.NoError(t, err)
	waitUntil(ctx, t, "the Source has the writes", func() bool { return other.Status().AppliedRevision >= del.Header.Revision })
	st.requireEndsEqualToEtcd(ctx, t, w, cli, prefix, "second")
}

// TestSourceCatchUpParkedWorkerIsToldKeysThatVanishedInAReload: a worker
// stops (parked); while another keeps the Source running, keys it held are
// deleted and the history compacted, so the Source reloads. The parked
// worker's next Run deletes them (isInit), and ends equal to etcd.
func TestSourceCatchUpParkedWorkerIsToldKeysThatVanishedInAReload(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, ownServer(), withProxy())
	ctx := testContext(t)
	const prefix = "/cu-parkreload"
	for i := range 10 {
		mustPutKV(ctx, t, env.cli, fmt.Sprintf("%s/k%d", prefix, i), "0")
	}
	src := mustNewSource(t, env.client(t), prefix, WithSourceRequestTimeout(faultRequestTimeout), WithSourceMetrics(env.reg))
	otherOnSource(ctx, t, env.cli, prefix, src)

	var v violationRecorder
	st := &failingStrictState{mapState: newMapState(prefix), v: &v}
	w := mustNewEtcdWorker(t, env.cli, prefix, finishReactor(), st, WithSource(src))
	require.NoError(t, runWithin(t, w, 10*time.Second, "first"))
	require.Len(t, st.values, 10)
	reloadByCompaction(ctx, t, env, func() {
		for i := range 6 {
			_, err := env.cli.Delete(ctx, fmt.Sprintf("%s/k%d", prefix, i))
			require.NoError(t, err)
		}
		mustPutKV(ctx, t, env.cli, prefix+"/k9", "changed")
		mustPutKV(ctx, t, env.cli, prefix+"/new", "1")
	})
	waitWithin(t, 20*time.Second, "the Source reloads", nil, func() bool {
		return metricSum(t, env.reg, "orchestrator_source_reloads_total") >= 1 && src.copyRev() >= headRevision(ctx, t, env.cli)
	})
	require.NoError(t, runWithin(t, w, 10*time.Second, "second"))
	require.Equal(t, etcdSnapshot(ctx, t, env.cli, prefix), stringValues(st.values))
	v.requireNone(t)
}

// TestSourceCatchUpSizedStateHintOfALateJoinCountsItsKeys: ten keys are
// loaded by one worker, six deleted; a worker that joins then is told, by
// SizedState.ExpectKeys, "the number of keys under its prefix at the
// revision it loads": 4, as many as its first snapshot passes.
func TestSourceCatchUpSizedStateHintOfALateJoinCountsItsKeys(t *testing.T) {
	t.Parallel()
	cli := newTestEnv(t).cli
	ctx := testContext(t)
	const prefix = "/test/cu-hint"
	for i := range 10 {
		mustPutKV(ctx, t, cli, fmt.Sprintf("%s/k%d", prefix, i), "0")
	}
	src := mustNewSource(t, cli, prefix)
	other := otherOnSource(ctx, t, cli, prefix, src)
	var rev int64
	for i := range 6 {
		del, err := cli.Delete(ctx, fmt.Sprintf("%s/k%d", prefix, i))
		require.NoError(t, err)
		rev = del.Header.Revision
	}
	waitUntil(ctx, t, "the Source has the deletes", func() bool { return other.Status().AppliedRevision >= rev })

	state := &sizedRecordingState{recordingState: newRecordingState(prefix)}
	w := mustNewEtcdWorker(t, cli, prefix, finishReactor(), state, WithSource(src))
	require.NoError(t, runWithin(t, w, 10*time.Second, "late"))
	expected, _ := state.calls()
	require.Len(t, state.values, 4)
	require.Equal(t, []int{4}, expected, "one hint, the number of keys the first snapshot passes")
}

// TestSourceCatchUpSubPrefixPatchSeesNoValueOfASiblingPrefix: a worker on
// /p/a runs a SingleDataPatch on /p/b/x, a key of a sibling prefix (which
// holds "secret"). A lone worker on /p/a gives the Func no value (the key is
// not its); a worker on /p/a following a Source on /p must do the same: it
// "sees only its keys".
func TestSourceCatchUpSubPrefixPatchSeesNoValueOfASiblingPrefix(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	ctx := testContext(t)
	const prefix = "/test/cu-sibling"
	mustPutKV(ctx, t, cli, prefix+"/b/x", "secret")
	for _, shared := range []bool{false, true} {
		t.Run(fmt.Sprintf("shared=%v", shared), func(t *testing.T) {
			var opts []Option
			if shared {
				opts = append(opts, WithSource(mustNewSource(t, cli, prefix)))
			}
			var mu sync.Mutex
			var seen []string
			patched := false
			sibling := util.NewEtcdKey(prefix + "/b/x")
			reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
				st := s.(*recordingState)
				if !patched {
					patched = true
					st.group(SingleDataPatch{Key: sibling, Func: func(old []byte) ([]byte, bool, error) {
						mu.Lock()
						defer mu.Unlock()
						seen = append(seen, fmt.Sprintf("%q", old))
						return old, false, nil // reads only
					}})
					return st, nil
				}
				return st, ErrReactorFinished
			})
			w := mustNewEtcdWorker(t, cli, prefix+"/a", reactor, newRecordingState(prefix+"/a"), opts...)
			_ = runWithin(t, w, 10*time.Second, "sub")
			mu.Lock()
			defer mu.Unlock()
			require.NotEmpty(t, seen, "the patch ran")
			for _, s := range seen {
				require.Equal(t, `""`, s, "the patch of a worker on /a was given the value of a key of /b")
			}
		})
	}
}

// watchGate holds the watch responses a client receives while armed,
// releasing them one at a time, and counts the progress requests it sends.
type watchGate struct {
	armed    atomic.Bool
	held     chan int64    // a response is held: the newest mod revision of its events (0: none)
	release  chan struct{} // lets one held response through
	open     chan struct{} // closed: lets every response through
	openOnce sync.Once
	sent     watchRequests
}

func newWatchGate() *watchGate {
	return &watchGate{held: make(chan int64, 64), release: make(chan struct{}), open: make(chan struct{})}
}

func (g *watchGate) openAll() { g.openOnce.Do(func() { close(g.open) }) }

func (g *watchGate) dialOptions() []grpc.DialOption {
	return watchTap{sent: &g.sent, hold: g.hold}.dialOptions()
}

// hold lets resp through at once unless g is armed: then it tells held the
// newest mod revision of its events and waits until it is released (one
// response at a time) or g is opened.
func (g *watchGate) hold(ctx context.Context, resp *pb.WatchResponse, _ time.Time) {
	if !g.armed.Load() {
		return
	}
	var rev int64
	for _, ev := range resp.Events {
		rev = max(rev, ev.Kv.ModRevision)
	}
	select {
	case g.held <- rev:
	case <-ctx.Done():
		return
	}
	select {
	case <-g.release:
	case <-g.open:
	case <-ctx.Done():
	}
}

// TestSourceCatchUpLateJoinFirstSnapshotHoldsAWriteDoneBeforeRun: the
// Source's watch lags (its responses are held): /v and then /w are put,
// both complete, and only then does a worker join and run. One held
// response (older than /w) arrives after Run began. The worker's first
// snapshot "holds every write that completed before Run was called"
// (DESIGN "Catching up"), as a lone worker's load does: its first Tick must
// see /w.
func TestSourceCatchUpLateJoinFirstSnapshotHoldsAWriteDoneBeforeRun(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	cli := env.cli
	ctx := testContext(t)
	const prefix = "/test/cu-latelag"
	gate := newWatchGate()
	srcCli := env.client(t, gate.dialOptions()...)
	t.Cleanup(gate.openAll) // before the client closes (cleanups run last first)
	src := mustNewSource(t, srcCli, prefix)
	otherOnSource(ctx, t, cli, prefix, src)

	gate.armed.Store(true)
	put, err := cli.Put(ctx, prefix+"/v", "1")
	require.NoError(t, err)
	for held := false; !held; { // hold the response with /v, let the others through
		select {
		case rev := <-gate.held:
			if held = rev >= put.Header.Revision; !held {
				gate.release <- struct{}{}
			}
		case <-ctx.Done():
			t.Fatal("no watch response with /v")
		}
	}
	mustPutKV(ctx, t, cli, prefix+"/w", "1") // completes before the late worker runs

	var mu sync.Mutex
	var first map[string]string
	late := mustNewEtcdWorker(t, cli, prefix, ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		mu.Lock()
		defer mu.Unlock()
		if first == nil {
			first = stringValues(s.(*mapState).values)
		}
		return s, nil
	}), newMapState(prefix), WithSource(src))
	lateCtx, stop := context.WithCancel(ctx)
	defer stop()
	done := runAsync(lateCtx, late, nil, behaviourTick, "late")
	waitUntil(ctx, t, "the late worker joins", func() bool {
		src.lifeMu.Lock()
		defer src.lifeMu.Unlock()
		_, in := src.attached[late.cur]
		return in
	})
	sent := gate.sent.progress.Load()
	// The late worker asks for a progress notification once Run began.
	waitUntil(ctx, t, "the late worker's progress request", func() bool { return gate.sent.progress.Load() > sent })
	select {
	case gate.release <- struct{}{}: // one older response arrives after Run began
	case <-ctx.Done():
		t.Fatal("the held response was not taken")
	}
	firstTick := func() map[string]string {
		mu.Lock()
		defer mu.Unlock()
		return first
	}
	// A first Tick before the held responses flow is on the Source's word
	// that its copy was current after Run began.
	early := contextWithin(t, 3*time.Second)
	ticker := time.NewTicker(pollInterval)
	defer ticker.Stop()
	for firstTick() == nil && early.Err() == nil {
		select {
		case <-early.Done():
		case <-ticker.C:
		}
	}
	t.Logf("first Tick before the gate opened: %v (copy at %d, /v at %d, store at %d)", firstTick(), src.copyRev(), put.Header.Revision, env.srv.Revision())
	gate.openAll()
	waitUntil(ctx, t, "the first Tick", func() bool { return firstTick() != nil })
	require.Contains(t, firstTick(), "/w", "the first Tick lacks a write that completed before Run was called")
	gate.openAll()
	stop()
	require.True(t, IsCleanStop(recvErr(ctx, t, done)))
}

// keysPatch is a general DataPatch that records the keys of its value map.
type keysPatch struct {
	mu   *sync.Mutex
	keys *[]string
}

func (p keysPatch) Patch(values map[util.EtcdKey][]byte, _ map[util.EtcdKey]struct{}) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	for k := range values {
		*p.keys = append(*p.keys, k.String())
	}
	return nil
}

// TestSourceCatchUpSubPrefixGeneralPatchSeesOnlyItsKeys: a general
// DataPatch of a worker on /p/a, following a Source on /p whose copy holds
// keys of /p/b and /p/ab, gets a value map of /p/a's keys only.
func TestSourceCatchUpSubPrefixGeneralPatchSeesOnlyItsKeys(t *testing.T) {
	t.Parallel()
	cli := newTestEnv(t).cli
	ctx := testContext(t)
	const prefix = "/test/cu-subgeneral"
	for _, k := range []string{"/a/1", "/a/2", "/ab/1", "/b/1", "/z"} {
		mustPutKV(ctx, t, cli, prefix+k, "v")
	}
	src := mustNewSource(t, cli, prefix)
	otherOnSource(ctx, t, cli, prefix, src)
	var mu sync.Mutex
	var keys []string
	patched := false
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*recordingState)
		if !patched {
			patched = true
			st.group(keysPatch{mu: &mu, keys: &keys})
			return st, nil
		}
		return st, ErrReactorFinished
	})
	w := mustNewEtcdWorker(t, cli, prefix+"/a", reactor, newRecordingState(prefix+"/a"), WithSource(src))
	require.NoError(t, runWithin(t, w, 10*time.Second, "sub"))
	mu.Lock()
	defer mu.Unlock()
	require.ElementsMatch(t, []string{prefix + "/a/1", prefix + "/a/2"}, keys)
}
