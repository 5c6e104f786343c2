package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// TestStatusReportsReadinessAndProgress: from another goroutine, a user can
// wait for the initial load, read the applied revision, the lag and the last
// Tick, and ask whether the worker is ready; the live gauges follow and are
// removed when Run returns.
func TestStatusReportsReadinessAndProgress(t *testing.T) {
	t.Parallel()
	const prefix, role = "/test/status", "status"
	srv := etcdtest.NewServer(t) // Lag() is 0 only on an idle etcd
	cli := srv.Client(t)
	ctx := testContext(t)
	mustPutKV(ctx, t, cli, prefix+"/a", "1")
	reg := prometheus.NewRegistry()
	w, err := NewEtcdWorker(cli, prefix, ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		return s, nil
	}), newMapState(prefix), WithMetrics(reg))
	require.NoError(t, err)
	require.ErrorIs(t, w.Ready(), ErrNotReady, "a worker that is not running is not ready")
	require.False(t, w.Status().Running)

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- w.Run(runCtx, nil, 10*time.Millisecond, role) }()
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
	srv := etcdtest.Shared(t)
	proxy := etcdtest.NewProxy(t, srv.Endpoints()[0])
	ctx := testContext(t)
	w, err := NewEtcdWorker(etcdtest.NewClient(t, proxy.Endpoint()), prefix,
		ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) { return s, nil }),
		newMapState(prefix), WithMaxStaleness(400*time.Millisecond), WithRequestTimeout(300*time.Millisecond))
	require.NoError(t, err)
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- w.Run(runCtx, nil, 10*time.Millisecond, "outage") }()
	require.NoError(t, w.WaitSynced(ctx))
	waitUntil(ctx, t, "ready", func() bool { return w.Ready() == nil })

	proxy.Blackhole()
	waitUntil(ctx, t, "the outage noticed", func() bool { return errors.Is(w.Ready(), ErrNotReady) && w.Status().Unreachable })
	require.False(t, w.Status().OutageSince.IsZero())
	proxy.Resume()
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
	}
	for _, tt := range tests {
		require.Equal(t, tt.want, IsCleanStop(tt.err), "%v", tt.err)
	}
}
