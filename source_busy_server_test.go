package orchestrator

// Workers on a busy server (another client writes outside their prefix
// without a pause), with a watch that may be slow (its responses arrive a
// fixed delay after etcd sent them, longer than the progress interval):
// DESIGN "Progress probe" promises the first Tick of a late joiner and of a
// lone worker there, and "Catching up" that it holds every write that
// completed before Run was called.

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
)

// watchDelay makes the watch responses of a client arrive delay after they
// reached it (a slow watch: latency, not a lower rate). Zero: at once.
type watchDelay struct{ delay atomic.Int64 }

func (d *watchDelay) set(v time.Duration) { d.delay.Store(int64(v)) }

func (d *watchDelay) dialOptions() []grpc.DialOption { return watchTap{hold: d.hold}.dialOptions() }

// hold returns once the delay has passed since the response arrived (or ctx
// ended).
func (d *watchDelay) hold(ctx context.Context, _ *pb.WatchResponse, arrived time.Time) {
	wait := time.Until(arrived.Add(time.Duration(d.delay.Load())))
	if wait <= 0 {
		return
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case <-timer.C:
	case <-ctx.Done():
	}
}

// busyElsewhere writes through cli outside any test prefix without a pause
// until the test ends (a busy, shared etcd); the returned function stops it
// and returns its error.
func busyElsewhere(ctx context.Context, t *testing.T, cli *clientv3.Client, name string) func() error {
	t.Helper()
	wctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		var err error
		for i := 0; wctx.Err() == nil && err == nil; i++ {
			_, err = cli.Put(wctx, fmt.Sprintf("/%s-elsewhere/k%d", name, i%100), "v")
		}
		if wctx.Err() != nil {
			err = nil
		}
		done <- err
	}()
	var once sync.Once
	var werr error
	stopAndWait := func() error {
		once.Do(func() { stop(); werr = <-done })
		return werr
	}
	t.Cleanup(func() { _ = stopAndWait() })
	return stopAndWait
}

// TestSourceLateJoinOnABusyServer: while another client writes outside the
// Source's prefix without a pause (a busy, shared etcd), every probe of the
// head finds a revision the Source's watch has not reached yet: the progress
// notification that proves it comes after the probe's answer. A worker that
// joins the running Source must still get its first Tick, within about one
// probe interval, not only once the other client stops writing.
func TestSourceLateJoinOnABusyServer(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := testContext(t)
	const prefix = "/src-busy"
	admin := env.cli
	mustPutKV(ctx, t, admin, prefix+"/a", "1")
	src := mustNewSource(t, admin, prefix)
	first := mustNewEtcdWorker(t, admin, prefix, idleReactor(), newMapState(prefix), WithSource(src))
	g := startSynced(ctx, t, "busy", first)

	stopWriting := busyElsewhere(ctx, t, admin, "src-busy")
	mustPutKV(ctx, t, admin, prefix+"/b", "2") // written before the late Run: its first Tick must see it
	late := mustNewEtcdWorker(t, admin, prefix, finishReactor(), newMapState(prefix), WithSource(src))
	start := time.Now()
	err := runWithin(t, late, 8*time.Second, "late")
	took := time.Since(start)
	require.NoError(t, stopWriting(), "writer")
	require.NoError(t, err, "the late worker's first Tick never came while the server was busy (%v)", took)
	g.stop(t)
}

// TestSourceLateJoinOnABusyServerWithASlowWatch: the Source's watch
// responses arrive 1.5s after etcd sent them (a progress interval is
// 500ms), while another client writes outside the prefix without a pause.
// Every probe reads a head above the copy, and each one replaces the kept
// proof before the progress notification that covers the previous one
// arrives (it was asked for right after that probe, and is 1.5s on its
// way). A worker that joins must still get its first Tick, holding /b,
// written before its Run began: within a few watch delays, not never.
func TestSourceLateJoinOnABusyServerWithASlowWatch(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := testContext(t)
	const prefix = "/src-busy-slow"
	const delay = 1500 * time.Millisecond
	staleness := WithMaxStaleness(2 * time.Second) // progress interval 500ms
	admin := env.cli
	mustPutKV(ctx, t, admin, prefix+"/a", "1")
	slow := &watchDelay{}
	src := mustNewSource(t, env.client(t, slow.dialOptions()...), prefix)
	var firstTicks atomic.Int64
	first := mustNewEtcdWorker(t, admin, prefix, countingReactor(&firstTicks), newMapState(prefix), WithSource(src), staleness)
	g := startSynced(ctx, t, "busy-slow", first)

	slow.set(delay)
	stopWriting := busyElsewhere(ctx, t, env.client(t), "src-busy-slow")
	mustPutKV(ctx, t, admin, prefix+"/b", "2") // written before the late Run: its first Tick must see it
	// The first worker keeps ticking: its Source is slow, not stale.
	before := firstTicks.Load()
	waitUntil(ctx, t, "the first worker ticks on the slow watch", func() bool { return firstTicks.Load() > before+3 })

	var saw atomic.Pointer[map[string]string]
	late := mustNewEtcdWorker(t, admin, prefix, ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		snap := stringValues(s.(*mapState).values)
		saw.Store(&snap)
		return s, ErrReactorFinished
	}), newMapState(prefix), WithSource(src), staleness)
	start := time.Now()
	err := runWithin(t, late, 8*delay, "late")
	took := time.Since(start)
	require.NoError(t, stopWriting(), "writer")
	require.NoError(t, err, "the late worker's first Tick never came on a busy server with a slow watch (%v; copy at %d, probed head %d)",
		took, src.copyRev(), src.headSeen.Load())
	require.Contains(t, *saw.Load(), "/b", "the first Tick lacks a write that completed before Run was called")
	t.Logf("first Tick after %v", took)
	slow.set(0)
	require.NoError(t, g.failed())
	g.stop(t)
}

// TestLoneWorkerOnABusyServerWithASlowWatch: a worker without WithSource
// has a Source of its own, started by its Run's attach; the Source's load
// takes its start (the provenAt it sets) in the follower's goroutine. Run
// must take the start its first snapshot is proven after before attach:
// when it took it after (as it did), and the follower's goroutine ran first
// (measured: 12 of 300 Runs under -race on an idle 2-core machine; none
// here, where the writer keeps the cores busy), the load did not prove the
// first snapshot and Run waited for a probe's proof, which on a busy server
// with a slow watch is slow to come (see
// TestSourceLateJoinOnABusyServerWithASlowWatch). Every one of many Runs of
// a lone worker must get its first Tick.
func TestLoneWorkerOnABusyServerWithASlowWatch(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := testContext(t)
	const prefix = "/lone-busy-slow"
	const delay = 1500 * time.Millisecond
	mustPutKV(ctx, t, env.cli, prefix+"/a", "1")
	slow := &watchDelay{}
	slow.set(delay)
	cli := env.client(t, slow.dialOptions()...)
	stopWriting := busyElsewhere(ctx, t, env.client(t), "lone-busy-slow")
	const runs = 100
	for i := range runs {
		w := mustNewEtcdWorker(t, cli, prefix, finishReactor(), newMapState(prefix), WithMaxStaleness(2*time.Second))
		start := time.Now()
		err := runWithin(t, w, 4*delay, "lone")
		require.NoError(t, err, "Run %d of %d of a lone worker got no first Tick in %v on a busy server with a slow watch",
			i+1, runs, time.Since(start))
	}
	require.NoError(t, stopWriting(), "writer")
}

// TestSourceLateJoinersSeeEveryWriteDoneBeforeTheirRun: a writer bumps
// /seq under the Source's prefix without a pause (and another client writes
// outside it), while the Source's watch lags 300ms. Workers join the running
// Source one after another, several at once; each one's first Tick must
// hold a /seq at least as new as the last write that completed before its
// Run was called (DESIGN "Catching up": the first snapshot of a Run is
// proven current by a read sent after Run began).
func TestSourceLateJoinersSeeEveryWriteDoneBeforeTheirRun(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := testContext(t)
	const prefix = "/src-late-seq"
	staleness := WithMaxStaleness(2 * time.Second)
	slow := &watchDelay{}
	src := mustNewSource(t, env.client(t, slow.dialOptions()...), prefix)
	mustPutKV(ctx, t, env.cli, prefix+"/seq", "0")
	otherOnSource(ctx, t, env.cli, prefix, src)
	slow.set(300 * time.Millisecond)
	stopElsewhere := busyElsewhere(ctx, t, env.client(t), "src-late-seq")

	var done atomic.Int64 // the newest /seq whose Put returned
	wctx, stopSeq := context.WithCancel(ctx)
	seqErr := make(chan error, 1)
	go func() {
		var err error
		for i := int64(1); wctx.Err() == nil && err == nil; i++ {
			if _, err = env.cli.Put(wctx, prefix+"/seq", fmt.Sprint(i)); err == nil {
				done.Store(i)
			}
		}
		if wctx.Err() != nil {
			err = nil
		}
		seqErr <- err
	}()
	defer func() { stopSeq(); require.NoError(t, <-seqErr, "seq writer") }()

	const joiners = 12
	g := newWorkerGroup(t, time.Minute)
	results := make(chan string, joiners)
	for i := range joiners {
		name := fmt.Sprintf("late-%d", i)
		st := newMapState(prefix)
		w := mustNewEtcdWorker(t, env.cli, prefix, ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
			return s, ErrReactorFinished
		}), st, WithSource(src), staleness)
		g.run(name, func(ctx context.Context) error {
			before := done.Load()
			if err := w.Run(ctx, nil, behaviourTick, name); err != nil {
				return err
			}
			got, err := strconv.ParseInt(string(st.values["/seq"]), 10, 64)
			if err != nil {
				return err
			}
			if got < before {
				results <- fmt.Sprintf("%s: first Tick saw /seq=%d, but /seq=%d completed before its Run", name, got, before)
			} else {
				results <- ""
			}
			return nil
		})
		if i%3 == 2 { // joiners come in threes
			waitUntil(ctx, t, "a few more writes", func() bool { return done.Load() > int64(10*(i+1)) })
		}
	}
	for name, err := range g.wait(t, 30*time.Second) {
		require.NoError(t, err, name)
	}
	close(results)
	for r := range results {
		require.Empty(t, r)
	}
	require.NoError(t, stopElsewhere(), "writer elsewhere")
}
