package orchestrator

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// requireRoleMetrics checks the metrics of one role of
// TestMetricsTwoWorkersShareRegistry against each other and returns its
// commits, applied groups and conflicts.
func requireRoleMetrics(t testing.TB, reg prometheus.Gatherer, role string) (commits, groups, conflicts float64) {
	t.Helper()
	c := metricValue(t, reg, "orchestrator_commits_total", role)
	commits = c
	groups = metricValue(t, reg, "orchestrator_patch_groups_applied_total", role)
	conflicts = metricValue(t, reg, "orchestrator_conflicts_total", role)
	require.GreaterOrEqual(t, metricValue(t, reg, "orchestrator_ticks_total", role), c+1, role)
	require.Equal(t, 1.0, metricValue(t, reg, "orchestrator_state_keys", role), role)
	for _, h := range []string{"orchestrator_txn_size_bytes", "orchestrator_txn_duration_seconds"} {
		s, ok := gatherSeries(t, reg, h, role)
		require.True(t, ok, "%s{role=%q}", h, role)
		// One Txn per commit plus one per conflict.
		require.Equal(t, c+metricValue(t, reg, "orchestrator_conflicts_total", role), s.count, "%s{role=%q}", h, role)
		require.Positive(t, s.sum, "%s{role=%q}", h, role)
	}
	s, ok := gatherSeries(t, reg, "orchestrator_tick_duration_seconds", role)
	require.True(t, ok)
	require.Equal(t, metricValue(t, reg, "orchestrator_ticks_total", role), s.count, role)
	return commits, groups, conflicts
}

// requireLabelledByRole checks that every family is labelled by role only,
// with one of roles.
func requireLabelledByRole(t testing.TB, reg prometheus.Gatherer, roles []string) {
	t.Helper()
	families, err := reg.Gather()
	require.NoError(t, err)
	require.NotEmpty(t, families)
	for _, f := range families {
		require.True(t, strings.HasPrefix(f.GetName(), metricsNamespace+"_"), f.GetName())
		if strings.HasPrefix(f.GetName(), metricsNamespace+"_source_") && f.GetName() != metricsNamespace+"_source_lag_revisions" {
			for _, m := range f.GetMetric() { // a Source's metrics are labelled by its prefix
				require.Len(t, m.GetLabel(), 1, f.GetName())
				require.Equal(t, "source", m.GetLabel()[0].GetName(), f.GetName())
			}
			continue
		}
		for _, m := range f.GetMetric() {
			require.Len(t, m.GetLabel(), 1, f.GetName())
			require.Contains(t, roles, metricRole(m), f.GetName())
		}
	}
}

// TestMetricsTwoWorkersShareRegistry runs two workers with different roles
// on one registry, both incrementing the same key so that they conflict, and
// checks that every metric exists per role and moved consistently with what
// landed in etcd.
func TestMetricsTwoWorkersShareRegistry(t *testing.T) {
	t.Parallel()
	const prefix = "/test/metrics"
	roles := []string{"alpha", "beta"}
	reg := prometheus.NewRegistry()
	ctx := testContext(t)

	var stop atomic.Bool
	var increments atomic.Int64
	g, gctx := errgroup.WithContext(ctx)
	for _, role := range roles {
		state := newMapState(prefix)
		reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
			st := s.(*mapState)
			if stop.Load() {
				return st, ErrReactorFinished
			}
			increments.Add(1)
			st.patches = append(st.patches, []DataPatch{incrPatch(st.key("/counter"), 1)})
			return st, nil
		})
		w, err := NewEtcdWorker(sharedClient(t), prefix, reactor, state, WithMetrics(reg))
		require.NoError(t, err, "a second worker on the same registry")
		g.Go(func() error { return w.Run(gctx, nil, time.Millisecond, role) })
	}

	waitUntil(ctx, t, "commits of both roles and a conflict", func() bool {
		conflicts := 0.0
		for _, role := range roles {
			if metricValue(t, reg, "orchestrator_commits_total", role) < 5 {
				return false
			}
			conflicts += metricValue(t, reg, "orchestrator_conflicts_total", role)
		}
		return conflicts > 0
	})
	stop.Store(true)
	require.NoError(t, g.Wait())

	resp, err := sharedClient(t).Get(ctx, prefix+"/counter")
	require.NoError(t, err)
	require.Len(t, resp.Kvs, 1)
	counter := mustInt(t, resp.Kvs[0].Value)
	require.Equal(t, increments.Load(), counter, "every queued increment landed once")

	var commits, groups, conflicts float64
	for _, role := range roles {
		c, g, cf := requireRoleMetrics(t, reg, role)
		commits, groups, conflicts = commits+c, groups+g, conflicts+cf
	}
	// Each Tick left one group, so each landed Txn carried exactly one
	// increment.
	require.Equal(t, float64(counter), commits)
	require.Equal(t, float64(counter), groups)
	require.Positive(t, conflicts)

	requireLabelledByRole(t, reg, roles)
	n, err := testutil.GatherAndCount(reg, "orchestrator_commits_total", "orchestrator_ticks_total")
	require.NoError(t, err)
	require.Equal(t, 4, n, "one series per role for each of the two families")
	problems, err := testutil.GatherAndLint(reg)
	require.NoError(t, err)
	require.Empty(t, problems)
}

// TestMetricsReloadAfterCompaction cuts a worker off etcd, writes and
// compacts meanwhile, and checks that the reload after the compacted watch
// is counted and the state size gauge follows.
func TestMetricsReloadAfterCompaction(t *testing.T) {
	t.Parallel()
	const (
		prefix = "/test/metrics-reload"
		role   = "reloader"
	)
	reg := prometheus.NewRegistry()
	env := newTestEnv(t, ownServer(), withProxy())
	direct := env.cli
	ctx := testContext(t)
	_, err := direct.Put(ctx, prefix+"/a", "1")
	require.NoError(t, err)

	w, err := NewEtcdWorker(env.client(t), prefix,
		idleReactor(),
		newMapState(prefix), WithMetrics(reg))
	require.NoError(t, err)
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := runAsync(runCtx, w, nil, 10*time.Millisecond, role)

	waitUntil(ctx, t, "the initial load", func() bool {
		return metricValue(t, reg, "orchestrator_ticks_total", role) >= 1
	})
	require.Equal(t, 1.0, metricValue(t, reg, "orchestrator_state_keys", role))
	require.Zero(t, metricValue(t, reg, "orchestrator_reloads_total", role))

	env.proxy.Pause()
	for _, k := range []string{"/b", "/c", "/d"} {
		_, err := direct.Put(ctx, prefix+k, "x")
		require.NoError(t, err)
	}
	_, err = direct.Delete(ctx, prefix+"/a")
	require.NoError(t, err)
	_, err = etcdtest.Compact(ctx, direct)
	require.NoError(t, err)
	env.proxy.Resume()

	waitUntil(ctx, t, "a reload with the new keys", func() bool {
		return metricValue(t, reg, "orchestrator_reloads_total", role) >= 1 &&
			metricValue(t, reg, "orchestrator_state_keys", role) == 3
	})
	cancel()
	require.ErrorIs(t, <-done, context.Canceled)
}

// TestMetricsNilRegisterer checks that without a registerer (no option, or
// WithMetrics(nil)) a worker registers nothing anywhere, not even in the
// default registry.
func TestMetricsNilRegisterer(t *testing.T) {
	t.Parallel()
	const prefix = "/test/metrics-nil"
	hasOrchestratorMetrics := func() bool {
		families, err := prometheus.DefaultGatherer.Gather()
		require.NoError(t, err)
		for _, f := range families {
			if strings.HasPrefix(f.GetName(), metricsNamespace+"_") {
				return true
			}
		}
		return false
	}
	require.False(t, hasOrchestratorMetrics())

	ctx := testContext(t)
	for _, opts := range [][]Option{nil, {WithMetrics(nil)}} {
		ticks := 0
		reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
			st := s.(*mapState)
			ticks++
			if ticks > 3 {
				return st, ErrReactorFinished
			}
			st.patches = append(st.patches, []DataPatch{incrPatch(st.key("/n"), 1)})
			return st, nil
		})
		w := mustNewEtcdWorker(t, sharedClient(t), prefix, reactor, newMapState(prefix), opts...)
		require.NoError(t, w.Run(ctx, nil, time.Millisecond, "nil-registerer"))
	}
	resp, err := sharedClient(t).Get(ctx, prefix+"/n", clientv3.WithCountOnly())
	require.NoError(t, err)
	require.EqualValues(t, 1, resp.Count)
	require.False(t, hasOrchestratorMetrics())
}

// TestMetricsRegistrationConflict: a registry that already holds an
// incompatible collector under one of the worker's names makes
// NewEtcdWorker fail with an error instead of panicking.
func TestMetricsRegistrationConflict(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	reg.MustRegister(prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: metricsNamespace, Name: "commits_total", Help: "not the worker's",
	}, []string{"role"}))
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{"127.0.0.1:1"}, DialTimeout: time.Second})
	require.NoError(t, err)
	defer func() { require.NoError(t, cli.Close()) }()
	reactor := idleReactor()

	_, err = NewEtcdWorker(cli, "/p", reactor, newMapState("/p"), WithMetrics(reg))
	require.Error(t, err)
	require.ErrorContains(t, err, "commits_total")

	// The same collectors twice are fine: the second worker reuses them.
	ok := prometheus.NewRegistry()
	for range 2 {
		mustNewEtcdWorker(t, cli, "/p", reactor, newMapState("/p"), WithMetrics(ok))
	}
}

// TestLabelValue: a metric label value is UTF-8 (prometheus panics on
// anything else); invalid bytes are spelled \xNN, so that values that differ
// only there stay apart.
func TestLabelValue(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ in, want string }{
		{"", ""},
		{"/app/näme", "/app/näme"},
		{"/a/\xff", `/a/\xff`},
		{"/a/\xfe", `/a/\xfe`},
		{"\xe2\x82", `\xe2\x82`}, // a rune cut short
		{"x\xffé\xc0", `x\xffé\xc0`},
	} {
		got := labelValue(tc.in)
		require.Equal(t, tc.want, got, "%q", tc.in)
		require.True(t, utf8.ValidString(got), "%q", tc.in)
	}
}

// TestAPrefixThatIsNotUTF8 runs workers on prefixes that are not valid UTF-8
// (etcd keys are bytes): the Source's metrics are labelled by the prefix,
// and prometheus panics on such a label value, which crashed the process
// from the Source's follower goroutine. Two prefixes that differ only in
// their invalid bytes keep series of their own.
func TestAPrefixThatIsNotUTF8(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(testContext(t), 20*time.Second)
	defer cancel()
	cli := sharedClient(t)
	reg := prometheus.NewRegistry()
	for _, prefix := range []string{"/test/utf8/\xff", "/test/utf8/\xfe"} {
		src := mustNewSource(t, cli, prefix, WithSourceMetrics(reg))
		for i, opts := range [][]Option{{WithSource(src)}, {WithMetrics(reg)}} {
			key := fmt.Sprintf("/k%d", i)
			reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
				st := s.(*mapState)
				st.patches = [][]DataPatch{{setPatch(st.key(key), []byte("1"))}}
				return st, ErrReactorFinished
			})
			w := mustNewEtcdWorker(t, cli, prefix, reactor, newMapState(prefix), opts...)
			require.NoError(t, w.Run(ctx, nil, behaviourTick, "utf8\xff"))
			resp, err := cli.Get(ctx, prefix+key)
			require.NoError(t, err)
			require.Len(t, resp.Kvs, 1, "%q", prefix+key)
		}
	}
	n, err := testutil.GatherAndCount(reg, "orchestrator_source_keys")
	require.NoError(t, err)
	require.Equal(t, 2, n, "one series per Source")
	problems, err := testutil.GatherAndLint(reg)
	require.NoError(t, err)
	require.Empty(t, problems)
}
