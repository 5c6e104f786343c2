package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator/util"
)

// TestStatusReportsReadinessAndProgress: from another goroutine, a user can
// wait for the initial load, read the applied revision, the lag and the last
// Tick, and ask whether the worker is ready; the live gauges follow and are
// removed when Run returns.
func TestStatusReportsReadinessAndProgress(t *testing.T) {
	t.Parallel()
	const prefix, role = "/test/status", "status"
	env := newTestEnv(t, ownServer()) // Lag() is 0 only on an idle etcd
	cli := env.cli
	ctx := testContext(t)
	mustPutKV(ctx, t, cli, prefix+"/a", "1")
	reg := prometheus.NewRegistry()
	w, err := NewEtcdWorker(cli, prefix, idleReactor(), newMapState(prefix), WithMetrics(reg))
	require.NoError(t, err)
	require.ErrorIs(t, w.Ready(), ErrNotReady, "a worker that is not running is not ready")
	require.False(t, w.Status().Running)

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := runAsync(runCtx, w, nil, 10*time.Millisecond, role)
	require.NoError(t, w.WaitSynced(ctx))
	s := w.Status()
	require.True(t, s.Running)
	require.True(t, s.Synced)
	require.Positive(t, s.AppliedRevision)

	resp, err := cli.Put(ctx, prefix+"/b", "2")
	require.NoError(t, err)
	waitUntil(ctx, t, "the put applied and ticked", func() bool {
		s := w.Status()
		return s.AppliedRevision >= resp.Header.Revision && s.LastTick.After(time.Now().Add(-time.Second)) &&
			w.Ready() == nil
	})
	s = w.Status()
	require.Zero(t, s.Lag())
	require.True(t, s.Fresh)
	require.False(t, s.Unreachable)
	waitUntil(ctx, t, "the live gauges", func() bool {
		return metricValue(t, reg, "orchestrator_applied_revision", role) >= float64(resp.Header.Revision) &&
			metricValue(t, reg, "orchestrator_last_tick_timestamp_seconds", role) > 0
	})

	cancel()
	require.True(t, IsCleanStop(recvErr(ctx, t, done)))
	require.False(t, w.Status().Running)
	require.ErrorIs(t, w.Ready(), ErrNotReady)
	for _, name := range []string{"orchestrator_applied_revision", "orchestrator_last_tick_timestamp_seconds", "orchestrator_revision_lag"} {
		_, ok := gatherSeries(t, reg, name, role)
		require.False(t, ok, "%s must not stay at a stale value after Run returns", name)
	}
	waitCtx, waitCancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer waitCancel()
	require.ErrorIs(t, w.WaitSynced(waitCtx), context.DeadlineExceeded, "a stopped worker is not synced")
}

// TestReadyReportsAnOutage: while etcd does not answer, Ready says so and
// Status shows when the outage started; once etcd answers, Ready is nil.
func TestReadyReportsAnOutage(t *testing.T) {
	t.Parallel()
	const prefix = "/test/status-outage"
	env := newTestEnv(t, withProxy())
	ctx := testContext(t)
	w, err := NewEtcdWorker(env.client(t), prefix,
		idleReactor(),
		newMapState(prefix), WithMaxStaleness(400*time.Millisecond), WithRequestTimeout(300*time.Millisecond))
	require.NoError(t, err)
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := runAsync(runCtx, w, nil, 10*time.Millisecond, "outage")
	require.NoError(t, w.WaitSynced(ctx))
	waitUntil(ctx, t, "ready", func() bool { return w.Ready() == nil })

	env.proxy.Blackhole()
	waitUntil(ctx, t, "the outage noticed", func() bool { return errors.Is(w.Ready(), ErrNotReady) && w.Status().Unreachable })
	require.False(t, w.Status().OutageSince.IsZero())
	env.proxy.Resume()
	waitUntil(ctx, t, "ready again", func() bool { return w.Ready() == nil })
	cancel()
	require.True(t, IsCleanStop(recvErr(ctx, t, done)))
}

// TestIsCleanStop tells a requested stop from a failure.
func TestIsCleanStop(t *testing.T) {
	t.Parallel()
	tests := []struct {
		err  error
		want bool
	}{
		{nil, true},
		{fmt.Errorf("orchestrator: worker stopped: %w", context.Canceled), true},
		{fmt.Errorf("orchestrator: worker stopped: %w", context.DeadlineExceeded), true},
		{fmt.Errorf("%w: %w", context.Canceled, ErrCommitUnresolved), false},
		{ErrEtcdSessionDone, false},
		{ErrNotOwner, false},
		{errors.New("boom"), false},
		{fmt.Errorf("%w (Run's ctx ended: %w)", errors.New("tick: rpc canceled"), context.Canceled), true},
		{fmt.Errorf("%w (Run's ctx ended: %w)", fmt.Errorf("tick: %w", ErrPanic), context.Canceled), false},
	}
	for _, f := range stopFailures {
		tests = append(tests, struct {
			err  error
			want bool
		}{fmt.Errorf("%w (Run's ctx ended: %w)", f, context.Canceled), false})
	}
	for _, tt := range tests {
		require.Equal(t, tt.want, IsCleanStop(tt.err), "%v", tt.err)
	}
}

// TestStatusIsRaceFreeAcrossRuns: readers hammer Status, Ready and
// WaitSynced while the worker commits, across a stop and a second Run; a
// WaitSynced begun while no Run is active returns once the next Run loaded.
func TestStatusIsRaceFreeAcrossRuns(t *testing.T) {
	t.Parallel()
	const prefix = "/test/status-across-runs"
	cli := sharedClient(t)
	ctx := testContext(t)
	var queued atomic.Int64
	st := newMapState(prefix)
	w := mustNewEtcdWorker(t, cli, prefix, counterReactor(&queued), st)

	stop := make(chan struct{})
	var readers sync.WaitGroup
	for range 3 {
		readers.Add(1)
		go func() {
			defer readers.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				s := w.Status()
				_ = s.Lag()
				_ = w.Ready()
				wctx, cancel := context.WithTimeout(ctx, time.Millisecond)
				_ = w.WaitSynced(wctx)
				cancel()
			}
		}()
	}
	defer func() { close(stop); readers.Wait() }()

	synced := make(chan error, 1)
	go func() { synced <- w.WaitSynced(ctx) }() // before any Run
	for cycle := range 2 {
		runCtx, cancel := context.WithCancel(ctx)
		done := runAsync(runCtx, w, nil, behaviourTick, "status")
		if cycle == 0 {
			require.NoError(t, recvErr(ctx, t, synced))
		}
		require.NoError(t, w.WaitSynced(ctx))
		base := queued.Load()
		waitUntil(ctx, t, "commits", func() bool { return w.Status().AppliedRevision > 0 && queued.Load() > base+5 })
		cancel()
		err := recvErr(ctx, t, done)
		require.True(t, IsCleanStop(err), "cycle %d: %v", cycle, err)
		require.Equal(t, Status{}, w.Status(), "a stopped worker reports the zero Status")
	}
}

// TestTickOwnDeadlineIsNotACleanStop: a Tick that fails with its own
// (internal) deadline while Run's ctx is alive is a failure, not a
// requested stop.
func TestTickOwnDeadlineIsNotACleanStop(t *testing.T) {
	t.Parallel()
	const prefix = "/test/tick-deadline"
	cli := sharedClient(t)
	ctx := testContext(t)
	reactor := ReactorFunc(func(context.Context, ReactorState) (ReactorState, error) {
		return nil, fmt.Errorf("call to a backend: %w", context.DeadlineExceeded)
	})
	w := mustNewEtcdWorker(t, cli, prefix, reactor, newMapState(prefix))
	err := w.Run(ctx, nil, behaviourTick, "status")
	require.Error(t, err)
	require.NoError(t, ctx.Err(), "Run's ctx is alive")
	require.False(t, IsCleanStop(err), "Run failed on its own: %v", err)
}

// TestCleanStopOnEveryCancelPoint: cancelling ctx before Run, during
// the initial load against an unreachable etcd, inside a blocked Tick and
// inside a blocked patch all end Run with a clean stop.
func TestCleanStopOnEveryCancelPoint(t *testing.T) {
	t.Parallel()
	const prefix = "/test/cancel"
	ctx := testContext(t)
	points := []string{"before Run", "during load", "in Tick", "in patch"}
	for _, point := range points {
		t.Run(point, func(t *testing.T) {
			env := newTestEnv(t, withProxy()) //nolint:contextcheck // the proxy lives as long as the subtest
			cli := env.client(t)
			runCtx, cancel := context.WithCancel(ctx)
			defer cancel()
			entered := make(chan struct{})
			var once sync.Once
			block := func(c context.Context) error {
				once.Do(func() { close(entered) })
				<-c.Done()
				return nil // ignores ctx's error on purpose
			}
			st := newMapState(prefix)
			reactor := ReactorFunc(func(c context.Context, s ReactorState) (ReactorState, error) {
				switch point {
				case "in Tick":
					return s, block(c)
				case "in patch":
					st.patches = append(st.patches, []DataPatch{patchFunc(func(map[util.EtcdKey][]byte, map[util.EtcdKey]struct{}) error {
						return block(runCtx)
					})})
				}
				return s, nil
			})
			w := mustNewEtcdWorker(t, cli, prefix, reactor, st, WithRequestTimeout(200*time.Millisecond))
			switch point {
			case "before Run":
				cancel()
			case "during load":
				env.proxy.Blackhole()
			}
			done := runAsync(runCtx, w, nil, behaviourTick, "status")
			switch point {
			case "during load":
				waitUntil(ctx, t, "a load attempt timed out", func() bool { return w.Status().Unreachable })
				cancel()
			case "in Tick", "in patch":
				awaitSignal(ctx, t, entered, "blocked")
				cancel()
			}
			err := recvErr(ctx, t, done)
			require.True(t, IsCleanStop(err), "%s: %v", point, err)
			require.True(t, errors.Is(err, context.Canceled) || err == nil, "%s: %v", point, err)
			env.proxy.Resume()
		})
	}
}

// TestSameRoleWorkersKeepTheirGauges: two workers with the same role
// on one registry; when one stops, the other (still running) keeps
// publishing orchestrator_applied_revision.
func TestSameRoleWorkersKeepTheirGauges(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	ctx := testContext(t)
	reg := prometheus.NewRegistry()
	a := mustNewEtcdWorker(t, cli, "/test/same-role-a", idleReactor(), newMapState("/test/same-role-a"), WithMetrics(reg))
	b := mustNewEtcdWorker(t, cli, "/test/same-role-b", idleReactor(), newMapState("/test/same-role-b"), WithMetrics(reg))
	actx, acancel := context.WithCancel(ctx)
	defer acancel()
	bctx, bcancel := context.WithCancel(ctx)
	defer bcancel()
	adone := runAsync(actx, a, nil, behaviourTick, "same")
	bdone := runAsync(bctx, b, nil, behaviourTick, "same")
	require.NoError(t, a.WaitSynced(ctx))
	require.NoError(t, b.WaitSynced(ctx))
	acancel()
	require.True(t, IsCleanStop(recvErr(ctx, t, adone)))
	resp, err := cli.Put(ctx, "/test/same-role-b/k", "v")
	require.NoError(t, err)
	waitUntil(ctx, t, "b applied the put", func() bool { return b.Status().AppliedRevision >= resp.Header.Revision })
	waitWithin(t, 2*time.Second, "b's applied revision gauge", nil, func() bool {
		s, ok := gatherSeries(t, reg, "orchestrator_applied_revision", "same")
		return ok && s.value >= float64(resp.Header.Revision)
	})
	bcancel()
	require.True(t, IsCleanStop(recvErr(ctx, t, bdone)))
}

// runSlowReactor runs a worker whose Tick takes 150ms (30 timer
// intervals) while etcd moves on, and waits until the state caught up with
// the last put (the test fails if it does not within 10s). It returns the
// largest Lag() seen meanwhile.
func runSlowReactor(t *testing.T, prefix string, opts ...Option) int64 {
	cli := sharedClient(t)
	ctx := testContext(t)
	reactor := ReactorFunc(func(c context.Context, s ReactorState) (ReactorState, error) {
		select {
		case <-time.After(150 * time.Millisecond):
		case <-c.Done():
		}
		return s, nil
	})
	w := mustNewEtcdWorker(t, cli, prefix, reactor, newMapState(prefix), opts...)
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := runAsync(runCtx, w, nil, behaviourTick, "lag")
	require.NoError(t, w.WaitSynced(ctx))
	var last, maxLag int64
	for i := range 40 {
		resp, err := cli.Put(ctx, fmt.Sprintf("%s/k%d", prefix, i), "v")
		require.NoError(t, err)
		last = resp.Header.Revision
		time.Sleep(10 * time.Millisecond) // etcd moves on during the slow Ticks
		maxLag = max(maxLag, w.Status().Lag())
	}
	waitWithin(t, 10*time.Second, "the state caught up", nil, func() bool {
		s := w.Status()
		maxLag = max(maxLag, s.Lag())
		return s.AppliedRevision >= last
	})
	cancel()
	require.True(t, IsCleanStop(recvErr(ctx, t, done)))
	return maxLag
}

// TestSlowReactorStillSeesNewState: a Tick slower than the timer
// interval must not starve the watch: the state keeps moving on.
func TestSlowReactorStillSeesNewState(t *testing.T) {
	t.Parallel()
	runSlowReactor(t, "/test/lag-sees-new-state")
}

// TestLagShowsASlowReactorsBacklog: while Tick is slow and etcd
// moves on, Status shows the worker behind (Lag() > 0) at some point: the
// head probe (every 100ms here) reports the store revision while the loop
// is busy.
func TestLagShowsASlowReactorsBacklog(t *testing.T) {
	t.Parallel()
	require.Positive(t, runSlowReactor(t, "/test/lag-backlog", WithMaxStaleness(400*time.Millisecond)))
}

// TestReadyReportsAStaleState: while etcd's answers stop but no request
// has failed yet (a blackhole, request timeout far above the staleness
// bound), the worker is reachable as far as it knows, but its state is no
// longer proven current: Status.Fresh is false and Ready says so (without
// this test, a Fresh that is always true passed the suite).
func TestReadyReportsAStaleState(t *testing.T) {
	t.Parallel()
	const prefix = "/test/ready-stale"
	env := newTestEnv(t, withProxy())
	ctx := testContext(t)
	w := mustNewEtcdWorker(t, env.client(t), prefix, idleReactor(), newMapState(prefix),
		WithMaxStaleness(400*time.Millisecond), WithRequestTimeout(20*time.Second))
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := runAsync(runCtx, w, nil, 10*time.Millisecond, "stale")
	require.NoError(t, w.WaitSynced(ctx))
	waitUntil(ctx, t, "ready", func() bool { return w.Ready() == nil })

	env.proxy.Blackhole()
	stale := contextWithin(t, 10*time.Second)
	waitUntil(stale, t, "stale and reported so", func() bool {
		err := w.Ready()
		return errors.Is(err, ErrNotReady) && strings.Contains(err.Error(), "not proven current")
	})
	s := w.Status()
	require.False(t, s.Fresh)
	require.False(t, s.Unreachable, "no request has failed yet")
	env.proxy.Resume()
	waitUntil(ctx, t, "ready again", func() bool { return w.Ready() == nil })
	cancel()
	require.True(t, IsCleanStop(recvErr(ctx, t, done)))
}
