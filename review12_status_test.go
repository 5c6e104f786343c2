package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/util"
)

func review12Idle() Reactor {
	return ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) { return s, nil })
}

// TestReview12StatusIsRaceFreeAcrossRuns: readers hammer Status, Ready and
// WaitSynced while the worker commits, across a stop and a second Run; a
// WaitSynced begun while no Run is active returns once the next Run loaded.
func TestReview12StatusIsRaceFreeAcrossRuns(t *testing.T) {
	t.Parallel()
	const prefix = "/test/status-across-runs"
	srv := etcdtest.Shared(t)
	cli := srv.Client(t)
	ctx := testContext(t)
	var queued atomic.Int64
	st := newMapState(prefix)
	w, err := NewEtcdWorker(cli, prefix, counterReactor(&queued), st)
	require.NoError(t, err)

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
	for round := range 2 {
		runCtx, cancel := context.WithCancel(ctx)
		done := runAsync(runCtx, w, nil, behaviourTick, "r12")
		if round == 0 {
			require.NoError(t, recvErr(ctx, t, synced))
		}
		require.NoError(t, w.WaitSynced(ctx))
		base := queued.Load()
		waitUntil(ctx, t, "commits", func() bool { return w.Status().AppliedRevision > 0 && queued.Load() > base+5 })
		cancel()
		err := recvErr(ctx, t, done)
		require.True(t, IsCleanStop(err), "round %d: %v", round, err)
		require.Equal(t, Status{}, w.Status(), "a stopped worker reports the zero Status")
	}
}

// TestReview12TickOwnDeadlineIsNotACleanStop: a Tick that fails with its own
// (internal) deadline while Run's ctx is alive is a failure, not a
// requested stop.
func TestReview12TickOwnDeadlineIsNotACleanStop(t *testing.T) {
	t.Parallel()
	const prefix = "/test/tick-deadline"
	srv := etcdtest.Shared(t)
	cli := srv.Client(t)
	ctx := testContext(t)
	reactor := ReactorFunc(func(context.Context, ReactorState) (ReactorState, error) {
		return nil, fmt.Errorf("call to a backend: %w", context.DeadlineExceeded)
	})
	w, err := NewEtcdWorker(cli, prefix, reactor, newMapState(prefix))
	require.NoError(t, err)
	err = w.Run(ctx, nil, behaviourTick, "r12")
	require.Error(t, err)
	require.NoError(t, ctx.Err(), "Run's ctx is alive")
	require.False(t, IsCleanStop(err), "Run failed on its own: %v", err)
}

// TestReview12CleanStopOnEveryCancelPoint: cancelling ctx before Run, during
// the initial load against an unreachable etcd, inside a blocked Tick and
// inside a blocked patch all end Run with a clean stop.
func TestReview12CleanStopOnEveryCancelPoint(t *testing.T) {
	t.Parallel()
	const prefix = "/test/cancel"
	srv := etcdtest.Shared(t)
	ctx := testContext(t)
	points := []string{"before Run", "during load", "in Tick", "in patch"}
	for _, point := range points {
		t.Run(point, func(t *testing.T) {
			proxy := etcdtest.NewProxy(t, srv.Endpoints()[0])
			cli := etcdtest.NewClient(t, proxy.Endpoint())
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
			w, err := NewEtcdWorker(cli, prefix, reactor, st, WithRequestTimeout(200*time.Millisecond))
			require.NoError(t, err)
			switch point {
			case "before Run":
				cancel()
			case "during load":
				proxy.Blackhole()
			}
			done := runAsync(runCtx, w, nil, behaviourTick, "r12")
			switch point {
			case "during load":
				waitUntil(ctx, t, "a load attempt timed out", func() bool { return w.Status().Unreachable })
				cancel()
			case "in Tick", "in patch":
				awaitSignal(ctx, t, entered, "blocked")
				cancel()
			}
			err = recvErr(ctx, t, done)
			require.True(t, IsCleanStop(err), "%s: %v", point, err)
			require.True(t, errors.Is(err, context.Canceled) || err == nil, "%s: %v", point, err)
			proxy.Resume()
		})
	}
}

// TestReview12SameRoleWorkersKeepTheirGauges: two workers with the same role
// on one registry; when one stops, the other (still running) keeps
// publishing orchestrator_applied_revision.
func TestReview12SameRoleWorkersKeepTheirGauges(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Shared(t)
	cli := srv.Client(t)
	ctx := testContext(t)
	reg := prometheus.NewRegistry()
	a, err := NewEtcdWorker(cli, "/test/same-role-a", review12Idle(), newMapState("/test/same-role-a"), WithMetrics(reg))
	require.NoError(t, err)
	b, err := NewEtcdWorker(cli, "/test/same-role-b", review12Idle(), newMapState("/test/same-role-b"), WithMetrics(reg))
	require.NoError(t, err)
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

// review12SlowReactor runs a worker whose Tick takes 150ms (30 timer
// intervals) while etcd moves on, and waits until the state caught up with
// the last put (the test fails if it does not within 10s). It returns the
// largest Lag() seen meanwhile.
func review12SlowReactor(t *testing.T, prefix string, opts ...Option) int64 {
	srv := etcdtest.Shared(t)
	cli := srv.Client(t)
	ctx := testContext(t)
	reactor := ReactorFunc(func(c context.Context, s ReactorState) (ReactorState, error) {
		select {
		case <-time.After(150 * time.Millisecond):
		case <-c.Done():
		}
		return s, nil
	})
	w, err := NewEtcdWorker(cli, prefix, reactor, newMapState(prefix), opts...)
	require.NoError(t, err)
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

// TestReview12SlowReactorStillSeesNewState: a Tick slower than the timer
// interval must not starve the watch: the state keeps moving on.
func TestReview12SlowReactorStillSeesNewState(t *testing.T) {
	t.Parallel()
	review12SlowReactor(t, "/test/lag-sees-new-state")
}

// TestReview12LagShowsASlowReactorsBacklog: while Tick is slow and etcd
// moves on, Status shows the worker behind (Lag() > 0) at some point: the
// head probe (every 100ms here) reports the store revision while the loop
// is busy.
func TestReview12LagShowsASlowReactorsBacklog(t *testing.T) {
	t.Parallel()
	require.Positive(t, review12SlowReactor(t, "/test/lag-backlog", WithMaxStaleness(400*time.Millisecond)))
}
