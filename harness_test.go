package orchestrator

// The test harness shared by every test of the package: contexts and waits
// bounded by deadlines, running workers and collecting their results,
// reading metrics, building patches, and recording invariant violations.
// The etcd a test runs against and its clients come from newTestEnv
// (env_test.go); the ReactorStates and Reactors the tests drive are in
// states_test.go.

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/util"
)

// testTimeout bounds every test that talks to etcd.
const testTimeout = 60 * time.Second

// behaviourTick is the timer interval of the behaviour tests: small, so that
// the tests are fast, but not zero.
const behaviourTick = 5 * time.Millisecond

// pollInterval is how often the waits below check their condition.
const pollInterval = 5 * time.Millisecond

// stopTimeout bounds how long workers may take to return once cancelled.
const stopTimeout = 10 * time.Second

// testContext returns a context bounded by testTimeout, cancelled when the
// test ends.
func testContext(t testing.TB) context.Context {
	t.Helper()
	return contextWithin(t, testTimeout)
}

// contextWithin returns a context that ends after d, or when the test ends.
func contextWithin(t testing.TB, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// ---------------------------------------------------------------------------
// Waiting for a condition.

// waitUntil polls cond until it holds; the test fails when ctx ends first.
func waitUntil(ctx context.Context, t testing.TB, what string, cond func() bool) {
	t.Helper()
	waitUnlessFailed(ctx, t, what, nil, cond)
}

// waitWithin polls cond until it holds; the test fails after timeout, or as
// soon as failed (if not nil) reports an error.
func waitWithin(t testing.TB, timeout time.Duration, what string, failed func() error, cond func() bool) {
	t.Helper()
	ctx := contextWithin(t, timeout)
	waitUnlessFailed(ctx, t, what, failed, cond)
}

// waitUnlessFailed polls cond every pollInterval until it holds. The test
// fails when ctx ends first, or as soon as failed (if not nil) reports an
// error.
func waitUnlessFailed(ctx context.Context, t testing.TB, what string, failed func() error, cond func() bool) {
	t.Helper()
	ticker := time.NewTicker(pollInterval)
	defer ticker.Stop()
	for !cond() {
		if failed != nil {
			if err := failed(); err != nil {
				t.Fatalf("%s: a worker failed: %v", what, err)
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s: %v", what, ctx.Err())
		case <-ticker.C:
		}
	}
}

// awaitSignal waits until ch is closed (or delivers); the test fails with
// "<what>" when ctx ends first.
func awaitSignal(ctx context.Context, t testing.TB, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-ctx.Done():
		t.Fatalf("%s: %v", what, ctx.Err())
	}
}

// blockUntil blocks a patch or a Tick until release is closed; it returns
// ctx's error when ctx ends first.
func blockUntil(ctx context.Context, release <-chan struct{}) error {
	select {
	case <-release:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ---------------------------------------------------------------------------
// Running workers.

// runWorker creates a worker over prefix and runs it to its end.
func runWorker(ctx context.Context, t testing.TB, cli *clientv3.Client, prefix string,
	reactor Reactor, state ReactorState, opts ...Option,
) error {
	t.Helper()
	w := mustNewEtcdWorker(t, cli, prefix, reactor, state, opts...)
	return w.Run(ctx, nil, behaviourTick, t.Name())
}

// runWithin runs w until it returns, bounded by timeout (and testTimeout).
func runWithin(t testing.TB, w *EtcdWorker, timeout time.Duration, role string) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(testContext(t), timeout)
	defer cancel()
	return w.Run(ctx, nil, behaviourTick, role)
}

// runAsync starts w.Run in a goroutine; its result arrives on the returned
// channel (see recvErr).
func runAsync(ctx context.Context, w *EtcdWorker, session *concurrency.Session, interval time.Duration, role string) <-chan error {
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx, session, interval, role) }()
	return done
}

// errNoRangeStream is how an etcd server before 3.7 answers RangeStream.
var errNoRangeStream = status.Error(codes.Unimplemented, "unknown method RangeStream for service etcdserverpb.KV")

// noRangeStream is a gRPC stream interceptor that makes a client's server
// look like one before 3.7: RangeStream is answered errNoRangeStream.
func noRangeStream(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string,
	streamer grpc.Streamer, opts ...grpc.CallOption,
) (grpc.ClientStream, error) {
	if method == etcdserverpb.KV_RangeStream_FullMethodName {
		return nil, errNoRangeStream
	}
	return streamer(ctx, desc, cc, method, opts...)
}

// asCommitTxn returns req as a worker's commit Txn: a Txn with more than one
// compare (its own and the commit token's, or a chain link's), which the
// worker's other Txns (the token's put, fences, resolutions) never have.
func asCommitTxn(req any) (*etcdserverpb.TxnRequest, bool) {
	tr, ok := req.(*etcdserverpb.TxnRequest)
	return tr, ok && len(tr.Compare) > 1
}

// recvErr waits for the result of a Run started in a goroutine.
func recvErr(ctx context.Context, t testing.TB, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		t.Fatalf("Run did not return: %v", ctx.Err())
		return nil
	}
}

// workerGroup runs workers (or any function) in goroutines and records
// their results. Its cleanup, registered by newWorkerGroup, cancels the
// context and joins every goroutine, so that a failing test leaks nothing.
// Create it after the clients and servers the workers use, so that it is
// cleaned up before them.
type workerGroup struct {
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	results map[string]error
	first   error
	failedc chan struct{} // closed when first is set
}

func newWorkerGroup(t testing.TB, timeout time.Duration) *workerGroup {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	g := &workerGroup{ctx: ctx, cancel: cancel, results: map[string]error{}, failedc: make(chan struct{})}
	t.Cleanup(func() {
		g.cancel()
		g.wg.Wait()
	})
	return g
}

// startWorkerGroup runs ws for at most timeout, worker i under the name
// and role "<name>-<i>", with faultInterval.
func startWorkerGroup(t testing.TB, timeout time.Duration, name string, ws []*EtcdWorker) *workerGroup {
	t.Helper()
	g := newWorkerGroup(t, timeout)
	for i, w := range ws {
		g.runWorker(fmt.Sprintf("%s-%d", name, i), w)
	}
	return g
}

// run starts fn(ctx) under name.
func (g *workerGroup) run(name string, fn func(ctx context.Context) error) {
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		err := fn(g.ctx)
		g.mu.Lock()
		defer g.mu.Unlock()
		g.results[name] = err
		if err != nil && g.first == nil {
			g.first = fmt.Errorf("%s: %w", name, err)
			close(g.failedc)
		}
	}()
}

// runWorker starts w.Run with faultInterval and role name.
func (g *workerGroup) runWorker(name string, w *EtcdWorker) { g.runWorkerEvery(name, w, faultInterval) }

// runWorkerEvery starts w.Run with timerInterval interval and role name.
func (g *workerGroup) runWorkerEvery(name string, w *EtcdWorker, interval time.Duration) {
	g.run(name, func(ctx context.Context) error { return w.Run(ctx, nil, interval, name) })
}

// await waits for c, failing if a goroutine of g fails or ctx ends first.
func (g *workerGroup) await(ctx context.Context, t testing.TB, c <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-c:
	case <-g.failedc:
		t.Fatalf("waiting for %s: %v", what, g.failed())
	case <-ctx.Done():
		t.Fatalf("waiting for %s: %v", what, ctx.Err())
	}
}

// stopClean stops g and requires that every goroutine ended only because
// of it (nil, or the context's cancellation).
func (g *workerGroup) stopClean(t testing.TB) {
	t.Helper()
	for name, err := range g.stop(t) {
		if err != nil && !errors.Is(err, context.Canceled) {
			t.Fatalf("%s: %v", name, err)
		}
	}
}

// stop cancels g's context and waits (at most stopTimeout) for every
// goroutine; it returns the results.
func (g *workerGroup) stop(t testing.TB) map[string]error {
	t.Helper()
	g.cancel()
	return g.wait(t, stopTimeout)
}

// failed returns the first error any goroutine returned so far.
func (g *workerGroup) failed() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.first
}

// wait waits (at most timeout) for every goroutine and returns the results.
func (g *workerGroup) wait(t testing.TB, timeout time.Duration) map[string]error {
	t.Helper()
	done := make(chan struct{})
	go func() {
		g.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(timeout):
		t.Fatalf("workers still running after %v", timeout)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return maps.Clone(g.results)
}

// requireAllNil waits (at most timeout) for every goroutine and requires
// that each returned nil.
func (g *workerGroup) requireAllNil(t testing.TB, timeout time.Duration) {
	t.Helper()
	for name, err := range g.wait(t, timeout) {
		require.NoError(t, err, "worker %s", name)
	}
}

// waitGrown waits until counter grew by n from now, failing after
// faultProgressTimeout or as soon as a goroutine of g fails.
func waitGrown(t testing.TB, g *workerGroup, counter *atomic.Int64, n int64, what string) {
	t.Helper()
	target := counter.Load() + n
	waitWithin(t, faultProgressTimeout, what, g.failed, func() bool { return counter.Load() >= target })
}

// ---------------------------------------------------------------------------
// Invariants checked inside Ticks.

// emissions counts the patch groups the workers of a test world emitted: in
// all, and the latest count of each worker.
type emissions struct {
	emitted atomic.Int64
	counts  []atomic.Int64
}

func newEmissions(workers int) emissions {
	return emissions{counts: make([]atomic.Int64, workers)}
}

// emit records that worker id emitted its count-th group.
func (e *emissions) emit(id int, count int64) {
	e.counts[id].Store(count)
	e.emitted.Add(1)
}

// mustNewEtcdWorker is NewEtcdWorker for arguments that must be valid.
func mustNewEtcdWorker(t testing.TB, cli *clientv3.Client, prefix string, reactor Reactor, state ReactorState,
	opts ...Option,
) *EtcdWorker {
	t.Helper()
	w, err := NewEtcdWorker(cli, prefix, reactor, state, opts...)
	require.NoError(t, err)
	return w
}

// violationRecorder counts the invariant violations that workers report
// from their goroutines and keeps the first one.
type violationRecorder struct {
	n     atomic.Int64
	mu    sync.Mutex
	first error
}

// record counts err and keeps it if it is the first.
func (v *violationRecorder) record(err error) {
	v.n.Add(1)
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.first == nil {
		v.first = err
	}
}

// count returns how many violations were recorded.
func (v *violationRecorder) count() int64 { return v.n.Load() }

// firstErr returns the first violation recorded (nil if none).
func (v *violationRecorder) firstErr() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.first
}

// requireNone fails the test if any violation was recorded.
func (v *violationRecorder) requireNone(t testing.TB) {
	t.Helper()
	require.Zero(t, v.count(), "invariant violations, first: %v", v.firstErr())
}

// ---------------------------------------------------------------------------
// Metrics.

// metricSeries is one series of a gathered metric: a counter's or gauge's
// value, or a histogram's sample count and sum.
type metricSeries struct {
	value, count, sum float64
}

// eachSeries calls fn with the role label and the value of every series of
// the metric name in g.
func eachSeries(t testing.TB, g prometheus.Gatherer, name string, fn func(role string, s metricSeries)) {
	t.Helper()
	families, err := g.Gather()
	require.NoError(t, err)
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			switch {
			case m.GetCounter() != nil:
				fn(metricRole(m), metricSeries{value: m.GetCounter().GetValue()})
			case m.GetGauge() != nil:
				fn(metricRole(m), metricSeries{value: m.GetGauge().GetValue()})
			case m.GetHistogram() != nil:
				h := m.GetHistogram()
				fn(metricRole(m), metricSeries{count: float64(h.GetSampleCount()), sum: h.GetSampleSum()})
			}
		}
	}
}

// gatherSeries returns the series name{role=role} from g, and whether it
// exists.
func gatherSeries(t testing.TB, g prometheus.Gatherer, name, role string) (metricSeries, bool) {
	t.Helper()
	var out metricSeries
	found := false
	eachSeries(t, g, name, func(r string, s metricSeries) {
		if r == role && !found {
			out, found = s, true
		}
	})
	return out, found
}

func metricRole(m *dto.Metric) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == "role" {
			return l.GetValue()
		}
	}
	return ""
}

// metricValue is the value of a counter or gauge series (0 when absent).
func metricValue(t testing.TB, g prometheus.Gatherer, name, role string) float64 {
	t.Helper()
	s, _ := gatherSeries(t, g, name, role)
	return s.value
}

// metricSum returns the sum over all roles of the counter or gauge name
// (e.g. "orchestrator_reloads_total") in g; 0 if absent.
func metricSum(t testing.TB, g prometheus.Gatherer, name string) float64 {
	t.Helper()
	var sum float64
	eachSeries(t, g, name, func(_ string, s metricSeries) { sum += s.value })
	return sum
}

// ---------------------------------------------------------------------------
// Patches.

// patchFunc adapts a function to DataPatch, for general (multi-key) patches
// and patches that read keys other than the ones they write.
type patchFunc func(valueMap map[util.EtcdKey][]byte, changedSet map[util.EtcdKey]struct{}) error

func (f patchFunc) Patch(valueMap map[util.EtcdKey][]byte, changedSet map[util.EtcdKey]struct{}) error {
	return f(valueMap, changedSet)
}

// setPatch is a SingleDataPatch setting key to value (nil deletes).
func setPatch(key util.EtcdKey, value []byte) DataPatch {
	return SingleDataPatch{Key: key, Func: func([]byte) ([]byte, bool, error) { return value, true, nil }}
}

// setKey is setPatch on the full key given as a string.
func setKey(key string, value []byte) DataPatch { return setPatch(util.NewEtcdKey(key), value) }

// deletePatch is a SingleDataPatch deleting key.
func deletePatch(key util.EtcdKey) DataPatch { return setPatch(key, nil) }

// incrPatch is a SingleDataPatch adding delta to the integer at key (absent
// = 0): a non-idempotent increment.
func incrPatch(key util.EtcdKey, delta int64) DataPatch {
	return SingleDataPatch{Key: key, Func: func(old []byte) ([]byte, bool, error) {
		var n int64
		if old != nil {
			var err error
			if n, err = strconv.ParseInt(string(old), 10, 64); err != nil {
				return nil, false, err
			}
		}
		return []byte(strconv.FormatInt(n+delta, 10)), true, nil
	}}
}

// ---------------------------------------------------------------------------
// etcd.

func mustPutKV(ctx context.Context, t testing.TB, cli *clientv3.Client, key, value string) {
	t.Helper()
	_, err := cli.Put(ctx, key, value)
	require.NoError(t, err)
}

// etcdSnapshot returns every visible key under prefix + "/" (reserved keys
// left out) by relative key.
func etcdSnapshot(ctx context.Context, t testing.TB, cli *clientv3.Client, prefix string) map[string]string {
	t.Helper()
	p := util.NormalizePrefix(prefix).String()
	kvs, _ := userKVs(ctx, t, cli, p, 0)
	out := make(map[string]string, len(kvs))
	for k, kv := range kvs {
		out[k[len(p):]] = kv.value
	}
	return out
}

// userKVs reads every key under prefix + "/" that a worker on prefix sees
// (none of a reserved area, at any depth: keyspace.visible) at rev (0:
// current) and returns them with the read's revision.
func userKVs(ctx context.Context, t testing.TB, cli *clientv3.Client, prefix string, rev int64) (map[string]*mvccKV, int64) {
	t.Helper()
	opts := []clientv3.OpOption{clientv3.WithPrefix()}
	if rev > 0 {
		opts = append(opts, clientv3.WithRev(rev))
	}
	resp, err := cli.Get(ctx, prefix+"/", opts...)
	require.NoError(t, err)
	ks := keysOf(prefix)
	out := make(map[string]*mvccKV, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		k := string(kv.Key)
		if !ks.visible(k) {
			continue
		}
		out[k] = &mvccKV{value: string(kv.Value), modRev: kv.ModRevision}
	}
	return out, resp.Header.Revision
}

// mvccKV is a value and its mod revision.
type mvccKV struct {
	value  string
	modRev int64
}

func mustInt(t testing.TB, b []byte) int64 {
	t.Helper()
	n, err := strconv.ParseInt(string(b), 10, 64)
	require.NoError(t, err)
	return n
}

// reloadByCompaction cuts the worker off (env's proxy), writes with fn,
// compacts (through env.cli) and lets it back: its watch finds its revision
// compacted and reloads.
func reloadByCompaction(ctx context.Context, t testing.TB, env *testEnv, fn func()) {
	t.Helper()
	env.proxy.Pause()
	fn()
	_, err := etcdtest.Compact(ctx, env.cli)
	require.NoError(t, err)
	env.proxy.Resume()
}

// keysOf is the production keyspace of a worker on prefix, for the names
// of its bookkeeping keys: counterKey, tokenKey(id), and tokenKey("") (the
// commit tokens' directory). The tests use it, reservedDir and counterName
// rather than spelling the names again.
func keysOf(prefix string) keyspace { return newKeyspace(util.NormalizePrefix(prefix)) }

// headRevision returns the store's current revision, read through cli: the
// one way a test asks a server it reaches by a client. An embedded server's
// own view, read in process without a request (what no client fault or
// proxy can delay), is etcdtest.Server.Revision.
func headRevision(ctx context.Context, t testing.TB, cli *clientv3.Client) int64 {
	t.Helper()
	resp, err := cli.Get(ctx, "\x00", clientv3.WithCountOnly())
	require.NoError(t, err)
	return resp.Header.Revision
}

// writesSince returns the keys under prefix + "/", or equal to one of keys,
// that were put or deleted after revision rev (from headRevision). It reads
// etcd's history, so that it also holds on the shared server, whose revision
// moves with the writes of the other tests; the history must not be
// compacted past rev.
func writesSince(ctx context.Context, t testing.TB, cli *clientv3.Client, rev int64, prefix string, keys ...string) []string {
	t.Helper()
	now := headRevision(ctx, t, cli)
	if now <= rev {
		return nil
	}
	area := util.NormalizePrefix(prefix).String() + "/"
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var out []string
	for resp := range cli.Watch(wctx, "\x00", clientv3.WithFromKey(), clientv3.WithRev(rev+1)) {
		require.NoError(t, resp.Err())
		for _, ev := range resp.Events {
			k := string(ev.Kv.Key)
			if strings.HasPrefix(k, area) || slices.Contains(keys, k) {
				out = append(out, k)
			}
			if ev.Kv.ModRevision >= now {
				return out
			}
		}
	}
	t.Fatalf("reading the history after revision %d: %v", rev, ctx.Err())
	return nil
}

// clearPrefix deletes every key under prefix + "/", reserved ones included:
// the subtests of a table that share their parent's prefix on the shared
// server start each from an empty prefix, as on a server of their own.
func clearPrefix(ctx context.Context, t testing.TB, cli *clientv3.Client, prefix string) {
	t.Helper()
	_, err := cli.Delete(ctx, util.NormalizePrefix(prefix).String()+"/", clientv3.WithPrefix())
	require.NoError(t, err)
}

// updatedKeys returns the sorted relative keys of updates, requiring each
// to be an initial update and to appear once.
func updatedKeys(t *testing.T, updates []updateRecord) []string {
	t.Helper()
	seen := map[string]bool{}
	keys := []string{}
	for _, u := range updates {
		require.True(t, u.isInit, "update of %s during a load has isInit", u.rel)
		require.False(t, seen[u.rel], "%s told twice in one load", u.rel)
		seen[u.rel] = true
		keys = append(keys, u.rel)
	}
	sort.Strings(keys)
	return keys
}
