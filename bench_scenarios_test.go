package orchestrator

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"golang.org/x/sync/errgroup"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/util"
)

// The scenario benchmark compares the worker with plain etcd clients on one
// embedded etcd member with fsync on, side by side in one run, and prints a
// table. Run it with `make bench` (or
// go test -run='^$' -bench='^BenchmarkScenarios$' -benchtime=1x .).
// ORCHESTRATOR_BENCH_WINDOW (a Go duration, default 3s) sets the length of
// each measured window; ORCHESTRATOR_BENCH_ONLY selects scenario groups;
// ORCHESTRATOR_BENCH_DEPTH sets the workers' WithPipelineDepth and the raw
// pipelined loop's senders (default DefaultPipelineDepth).

const (
	benchTickInterval  = time.Millisecond // timerInterval of the throughput scenarios
	benchGroupsPerTick = 500
	benchIndepKeys     = 5000
	benchTxnPuts       = 100
	benchContenders    = 4
	// benchContendedPerTick is how many increment groups a contending
	// worker emits per Tick in the batched contention row.
	benchContendedPerTick = 8
	benchLoadKeys         = 100_000
	benchSmallKeys        = 1_000
	benchValueSize        = 100
	benchLoadReps         = 3
	benchLagSamples       = 200
)

func benchWindow(tb testing.TB) time.Duration {
	s := os.Getenv("ORCHESTRATOR_BENCH_WINDOW")
	if s == "" {
		return 3 * time.Second
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		tb.Fatalf("bad ORCHESTRATOR_BENCH_WINDOW %q", s)
	}
	return d
}

// benchDepth is the pipeline depth of the scenario workers and the number
// of concurrent senders of the raw pipelined loop.
func benchDepth(tb testing.TB) int {
	s := os.Getenv("ORCHESTRATOR_BENCH_DEPTH")
	if s == "" {
		return DefaultPipelineDepth
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		tb.Fatalf("bad ORCHESTRATOR_BENCH_DEPTH %q", s)
	}
	return n
}

// benchSelected reports whether the scenario group name should run:
// ORCHESTRATOR_BENCH_ONLY, when set, is a comma-separated list of indep,
// contention, load and lag (for profiling one of them).
func benchSelected(name string) bool {
	only := os.Getenv("ORCHESTRATOR_BENCH_ONLY")
	return only == "" || slices.Contains(strings.Split(only, ","), name)
}

// benchIncr adds one to a decimal value (absent or unparsable = 0).
func benchIncr(old []byte) ([]byte, bool, error) {
	n, _ := strconv.ParseInt(string(old), 10, 64)
	return strconv.AppendInt(nil, n+1, 10), true, nil
}

func benchKey(prefix string, i int) string { return fmt.Sprintf("%s/k%06d", prefix, i) }

// benchValue is a benchValueSize-byte value that encodes i.
func benchValue(i int) []byte {
	v := make([]byte, benchValueSize)
	for j := range v {
		v[j] = 'a' + byte(j%26)
	}
	copy(v, strconv.Itoa(i)+":")
	return v
}

// benchPopulate writes n keys of benchValue under prefix (populate).
func benchPopulate(ctx context.Context, tb testing.TB, cli *clientv3.Client, prefix string, n int) {
	tb.Helper()
	populate(ctx, tb, cli, n, func(i int) (string, string) { return benchKey(prefix, i), string(benchValue(i)) })
}

// populate writes the n keys kv(0..n-1) names, with 8 parallel Txns of
// populateTxnPuts puts.
func populate(ctx context.Context, tb testing.TB, cli *clientv3.Client, n int, kv func(i int) (key, value string)) {
	tb.Helper()
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for start := 0; start < n; start += populateTxnPuts {
		g.Go(func() error {
			ops := make([]clientv3.Op, 0, populateTxnPuts)
			for i := start; i < min(start+populateTxnPuts, n); i++ {
				k, v := kv(i)
				ops = append(ops, clientv3.OpPut(k, v))
			}
			_, err := cli.Txn(gctx).Then(ops...).Commit()
			return err
		})
	}
	if err := g.Wait(); err != nil {
		tb.Fatalf("populate: %v", err)
	}
}

// populateTxnPuts is how many puts a Txn of populate holds: as many as a
// default server takes.
const populateTxnPuts = 128

// benchSum returns the sum of the decimal values of the user keys under
// prefix.
func benchSum(ctx context.Context, tb testing.TB, cli *clientv3.Client, prefix string) int64 {
	tb.Helper()
	resp, err := cli.Get(ctx, prefix+"/", clientv3.WithPrefix())
	if err != nil {
		tb.Fatalf("sum %s: %v", prefix, err)
	}
	var sum int64
	for _, kv := range resp.Kvs {
		if strings.Contains(string(kv.Key), reservedDir) {
			continue
		}
		n, err := strconv.ParseInt(string(kv.Value), 10, 64)
		if err != nil {
			tb.Fatalf("sum %s: key %q: %v", prefix, kv.Key, err)
		}
		sum += n
	}
	return sum
}

// benchRate measures how fast the sum under prefix grows over one window,
// reading it at both ends.
func benchRate(ctx context.Context, tb testing.TB, cli *clientv3.Client, prefix string, window time.Duration) float64 {
	rate, _ := benchRateFsyncs(ctx, tb, cli, prefix, window)
	return rate
}

// benchRateFsyncs is benchRate that also counts the WAL fsyncs of the
// embedded etcd meanwhile (one per raft round that wrote entries), and
// returns how much the sum grew per fsync.
func benchRateFsyncs(ctx context.Context, tb testing.TB, cli *clientv3.Client, prefix string,
	window time.Duration,
) (rate, perFsync float64) {
	tb.Helper()
	s0, f0 := benchSum(ctx, tb, cli, prefix), walFsyncs(tb)
	t0 := time.Now()
	time.Sleep(window)
	s1, f1 := benchSum(ctx, tb, cli, prefix), walFsyncs(tb)
	return float64(s1-s0) / time.Since(t0).Seconds(), float64(s1-s0) / max(f1-f0, 1)
}

// walFsyncs is how many WAL fsyncs the etcd embedded in this process did
// (etcd_disk_wal_fsync_duration_seconds, in the default registry).
func walFsyncs(tb testing.TB) float64 {
	tb.Helper()
	mfs, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		tb.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "etcd_disk_wal_fsync_duration_seconds" && len(mf.GetMetric()) == 1 {
			return float64(mf.GetMetric()[0].GetHistogram().GetSampleCount())
		}
	}
	tb.Fatal("no metric etcd_disk_wal_fsync_duration_seconds")
	return 0
}

// startBenchWorkers runs workers (worker i as role "bench-<i>") with
// timerInterval interval until the group is stopped.
func startBenchWorkers(tb testing.TB, interval time.Duration, workers ...*EtcdWorker) *workerGroup {
	g := newWorkerGroup(tb, benchGroupTimeout)
	for i, w := range workers {
		g.runWorkerEvery("bench-"+strconv.Itoa(i), w, interval)
	}
	return g
}

// benchGroupTimeout bounds the workers of one benchmark measurement.
const benchGroupTimeout = 30 * time.Minute

// newBenchWorker is mustNewEtcdWorker at the benchmarks' pipeline depth.
func newBenchWorker(tb testing.TB, cli *clientv3.Client, prefix string, reactor Reactor, state ReactorState,
	opts ...Option,
) *EtcdWorker {
	tb.Helper()
	return mustNewEtcdWorker(tb, cli, prefix, reactor, state, append([]Option{WithPipelineDepth(benchDepth(tb))}, opts...)...)
}

// waitSumAbove waits until the sum under prefix exceeds v (the workers are
// loaded and committing).
func waitSumAbove(ctx context.Context, tb testing.TB, cli *clientv3.Client, prefix string, v int64) {
	tb.Helper()
	waitUntil(ctx, tb, fmt.Sprintf("the sum under %s above %d", prefix, v), func() bool {
		return benchSum(ctx, tb, cli, prefix) > v
	})
}

// loadAverage is the 1-minute load average of the machine, to tell a quiet
// run from a noisy one ("?" where unknown).
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	if f := strings.Fields(string(b)); len(f) > 0 {
		return f[0]
	}
	return "?"
}

// benchRow is one line of the printed table.
type benchRow struct {
	scenario string
	baseline string
	worker   string
	ratio    string
	must     string
	verdict  string
}

// verdict reports whether ratio meets must and aim (higher is better when
// higher is true).
func verdict(ratio, must, aim float64, higher bool) string {
	ok := func(limit float64) bool {
		if higher {
			return ratio >= limit
		}
		return ratio <= limit
	}
	switch {
	case ok(aim):
		return "ok (aim met)"
	case ok(must):
		return "ok"
	default:
		return "FAIL"
	}
}

func printBenchTable(rows []benchRow) string {
	head := benchRow{"scenario", "baseline", "worker", "ratio", "must reach", "verdict"}
	all := append([]benchRow{head}, rows...)
	width := make([]int, 6)
	cells := func(r benchRow) []string {
		return []string{r.scenario, r.baseline, r.worker, r.ratio, r.must, r.verdict}
	}
	for _, r := range all {
		for i, c := range cells(r) {
			width[i] = max(width[i], len(c))
		}
	}
	var sb strings.Builder
	line := func(cs []string) {
		sb.WriteString("|")
		for i, c := range cs {
			fmt.Fprintf(&sb, " %-*s |", width[i], c)
		}
		sb.WriteString("\n")
	}
	line(cells(head))
	sep := make([]string, 6)
	for i := range sep {
		sep[i] = strings.Repeat("-", width[i])
	}
	line(sep)
	for _, r := range rows {
		line(cells(r))
	}
	return sb.String()
}

// BenchmarkScenarios runs every scenario of the performance table against
// its baseline on one embedded etcd member with fsync on, and prints the
// table.
func BenchmarkScenarios(b *testing.B) {
	srv := etcdtest.NewServer(b, etcdtest.WithFsync(true))
	window := benchWindow(b)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	for range b.N {
		loadStart := loadAverage()
		var rows []benchRow
		if benchSelected("indep") {
			rows = append(rows, benchIndependent(ctx, b, srv, window)...)
		}
		if benchSelected("contention") {
			rows = append(rows, benchContention(ctx, b, srv, window)...)
		}
		if benchSelected("load") {
			rows = append(rows, benchLoadScenarios(ctx, b, srv, window)...)
		}
		if benchSelected("lag") {
			// A short timerInterval shows the worker's own delay; a
			// realistic one adds the tick rate limit (see benchTickLag).
			rows = append(rows, benchTickLag(ctx, b, srv, time.Millisecond, 15*time.Millisecond))
			rows = append(rows, benchTickLag(ctx, b, srv, 10*time.Millisecond, 25*time.Millisecond))
		}
		table := printBenchTable(rows)
		fmt.Printf("\nScenarios (embedded etcd, fsync on, %d CPUs, window %v, load average %s at start, %s at end):\n%s\n",
			runtime.NumCPU(), window, loadStart, loadAverage(), table)
	}
}

var benchRunSeq atomic.Int64

// benchPrefix returns a prefix not used before in this process.
func benchPrefix(name string) string {
	return fmt.Sprintf("/bench/%s-%d", name, benchRunSeq.Add(1))
}

// benchRounds is how many times the throughput scenarios alternate between
// the worker and its baselines; each side runs window/benchRounds per round,
// so that a noisy stretch of the machine hits every side alike.
const benchRounds = 3

// benchIndependent: every group is one SingleDataPatch on its own key; the
// reactor leaves benchGroupsPerTick groups per Tick. Baselines: one STM Txn
// per update, serial; raw Txns of benchTxnPuts blind puts, serial; and the
// same raw Txns from benchDepth concurrent senders, the physical limit of
// one etcd member (it batches concurrent Txns into one raft round and one
// fsync), which the worker's pipelined chain of Txns approaches.
func benchIndependent(ctx context.Context, b *testing.B, srv *etcdtest.Server, window time.Duration) []benchRow {
	cli := srv.Client(b)
	slice := window / benchRounds
	stmCli := srv.Client(b)
	rawCli := srv.Client(b)
	depth := benchDepth(b)

	var workerRate, stmRate, rawRate, pipeRate, casRate, casPipeRate float64
	var stats benchChainStats
	for range benchRounds {
		workerRate += benchIndepWorker(ctx, b, srv, cli, slice, &stats) / benchRounds
		stmRate += benchIndepSTM(ctx, b, stmCli, slice) / benchRounds
		rawRate += benchIndepRaw(ctx, b, rawCli, slice) / benchRounds
		pipeRate += benchIndepRawPipelined(ctx, b, rawCli, depth, slice) / benchRounds
		casRate += benchIndepRawCAS(ctx, b, rawCli, 1, slice) / benchRounds
		casPipeRate += benchIndepRawCAS(ctx, b, rawCli, depth, slice) / benchRounds
	}

	b.ReportMetric(workerRate, "patches/s")
	return []benchRow{
		rateRow(fmt.Sprintf("independent updates (%d groups/tick, depth %d): patches/s vs STM, serial", benchGroupsPerTick, depth),
			stmRate, workerRate, 1, 50, 50),
		rateRow(fmt.Sprintf("independent updates: patches/s vs raw Txn of %d puts, serial", benchTxnPuts),
			rawRate, workerRate, 2, 1, 1.3),
		{
			scenario: fmt.Sprintf("independent updates: raw Txns of %d puts, %d senders / one serial sender", benchTxnPuts, depth),
			baseline: fmt.Sprintf("%.0f/s", rawRate),
			worker:   fmt.Sprintf("%.0f/s", pipeRate),
			ratio:    fmt.Sprintf("%.2fx", pipeRate/rawRate),
			must:     "report (physical limit)",
			verdict:  "reported",
		},
		rateRow(fmt.Sprintf("independent updates: patches/s vs raw Txns of %d puts, %d senders", benchTxnPuts, depth),
			pipeRate, workerRate, 2, 0.7, 0.9),
		rateRow(fmt.Sprintf("independent updates: patches/s vs raw CAS Txns of %d increments (the same job by hand), serial", benchCASIncrements),
			casRate, workerRate, 2, 0, 0),
		rateRow(fmt.Sprintf("independent updates: patches/s vs raw CAS Txns of %d increments, %d senders, unordered", benchCASIncrements, depth),
			casPipeRate, workerRate, 2, 0, 0),
		{
			scenario: "independent updates: worker Txns sent again (overtook the one before) / landed",
			baseline: fmt.Sprintf("%.0f landed", stats.landed),
			worker:   fmt.Sprintf("%.0f resent", stats.resent),
			ratio:    fmt.Sprintf("%.3f", stats.resent/max(stats.landed, 1)),
			must:     "report",
			verdict:  "reported",
		},
	}
}

// rateRow is a table row comparing the rate of the worker with a baseline's
// (higher is better), its ratio printed with prec decimals; a row with no
// goal (must 0) is only reported.
func rateRow(scenario string, baseline, worker float64, prec int, must, aim float64) benchRow {
	if must == 0 {
		return benchRow{scenario: scenario, baseline: fmt.Sprintf("%.0f/s", baseline), worker: fmt.Sprintf("%.0f/s", worker),
			ratio: fmt.Sprintf("%.*fx", prec, worker/baseline), must: "report", verdict: "reported"}
	}
	return benchRow{
		scenario: scenario,
		baseline: fmt.Sprintf("%.0f/s", baseline),
		worker:   fmt.Sprintf("%.0f/s", worker),
		ratio:    fmt.Sprintf("%.*fx", prec, worker/baseline),
		must:     fmt.Sprintf(">= %gx (aim %gx)", must, aim),
		verdict:  verdict(worker/baseline, must, aim, true),
	}
}

// benchIndepWorker runs one worker whose reactor leaves benchGroupsPerTick
// increments of benchIndepKeys keys in turn per Tick, and returns the rate
// of increments over slice.
// The worker's commit Txns that landed, and those sent again because they
// overtook the one before them (see benchIndependent's pipeline row).
type benchChainStats struct{ landed, resent float64 }

func benchIndepWorker(ctx context.Context, b *testing.B, srv *etcdtest.Server, cli *clientv3.Client, slice time.Duration,
	stats *benchChainStats,
) float64 {
	prefix := benchPrefix("indep-worker")
	keys := make([]util.EtcdKey, benchIndepKeys)
	for i := range keys {
		keys[i] = util.NewEtcdKey(benchKey(prefix, i))
	}
	next := 0
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		groups := make([][]DataPatch, benchGroupsPerTick)
		for i := range groups {
			groups[i] = []DataPatch{SingleDataPatch{Key: keys[next%len(keys)], Func: benchIncr}}
			next++
		}
		st.patches = groups
		return st, nil
	})
	reg := prometheus.NewRegistry()
	bw := startBenchWorkers(b, benchTickInterval,
		newBenchWorker(b, srv.Client(b), prefix, reactor, newMapState(prefix), WithMetrics(reg)))
	waitSumAbove(ctx, b, cli, prefix, 0)
	rate := benchRate(ctx, b, cli, prefix, slice)
	bw.stopClean(b)
	stats.landed += metricSum(b, reg, "orchestrator_commits_total")
	stats.resent += metricSum(b, reg, "orchestrator_commit_resends_total")
	return rate
}

// benchIndepSTM increments benchIndepKeys keys in turn with one STM Txn each,
// serially, for slice and returns the rate.
func benchIndepSTM(ctx context.Context, b *testing.B, cli *clientv3.Client, slice time.Duration) float64 {
	prefix := benchPrefix("indep-stm")
	return serialRate(slice, func(done int) int {
		if err := stmIncr(ctx, cli, benchKey(prefix, done%benchIndepKeys)); err != nil {
			b.Fatal(err)
		}
		return 1
	})
}

// benchIndepRaw writes benchIndepKeys keys in turn with raw Txns of
// benchTxnPuts blind puts, serially, for slice and returns the rate of puts.
func benchIndepRaw(ctx context.Context, b *testing.B, cli *clientv3.Client, slice time.Duration) float64 {
	prefix := benchPrefix("indep-raw")
	value := string(benchValue(0)[:8])
	return serialRate(slice, func(done int) int {
		ops := make([]clientv3.Op, benchTxnPuts)
		for j := range ops {
			ops[j] = clientv3.OpPut(benchKey(prefix, (done+j)%benchIndepKeys), value)
		}
		if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
			b.Fatal(err)
		}
		return benchTxnPuts
	})
}

// benchIndepRawPipelined writes benchIndepKeys keys with raw Txns of
// benchTxnPuts blind puts from senders goroutines at once (each on its own
// slice of the keys) for slice, and returns the rate of puts.
func benchIndepRawPipelined(ctx context.Context, b *testing.B, cli *clientv3.Client, senders int, slice time.Duration) float64 {
	prefix := benchPrefix("indep-rawpipe")
	value := string(benchValue(0)[:8])
	var count atomic.Int64
	deadline := time.Now().Add(slice)
	start := time.Now()
	g, gctx := errgroup.WithContext(ctx)
	for s := range senders {
		g.Go(func() error {
			for done := 0; time.Now().Before(deadline); done += benchTxnPuts {
				ops := make([]clientv3.Op, benchTxnPuts)
				for j := range ops {
					ops[j] = clientv3.OpPut(benchKey(prefix, (s*benchTxnPuts+done*senders+j)%benchIndepKeys), value)
				}
				if _, err := cli.Txn(gctx).Then(ops...).Commit(); err != nil {
					return err
				}
				count.Add(benchTxnPuts)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		b.Fatal(err)
	}
	return float64(count.Load()) / time.Since(start).Seconds()
}

// benchCASIncrements is how many keys one raw CAS Txn increments: as many
// as the worker puts in one Txn (the default op limit, 128, less the
// worker's own token and delete-counter compares, and one to spare).
const benchCASIncrements = 125

// benchIndepRawCAS increments benchIndepKeys keys with hand-written
// compare-and-swap Txns of benchCASIncrements increments each, from senders
// goroutines at once (each on its own slice of the keys, in no order
// between them), for slice, and returns the rate of increments. It is the
// fastest way to do the worker's job by hand: every sender keeps the values
// and mod revisions it wrote, so it never reads, and each Txn compares every
// key it increments. A compare that fails would need a read and a retry;
// nothing else writes these keys, so none does.
func benchIndepRawCAS(ctx context.Context, b *testing.B, cli *clientv3.Client, senders int, slice time.Duration) float64 {
	prefix := benchPrefix("indep-rawcas")
	type seen struct {
		value  int
		modRev int64
	}
	var count atomic.Int64
	deadline := time.Now().Add(slice)
	start := time.Now()
	g, gctx := errgroup.WithContext(ctx)
	per := benchIndepKeys / senders
	for s := range senders {
		g.Go(func() error {
			known := make(map[string]seen, per)
			cmps := make([]clientv3.Cmp, benchCASIncrements)
			ops := make([]clientv3.Op, benchCASIncrements)
			keys := make([]string, benchCASIncrements)
			for done := 0; time.Now().Before(deadline); done += benchCASIncrements {
				for j := range ops {
					key := benchKey(prefix, s*per+(done+j)%per)
					k := known[key]
					keys[j] = key
					cmps[j] = clientv3.Compare(clientv3.ModRevision(key), "=", k.modRev)
					ops[j] = clientv3.OpPut(key, strconv.Itoa(k.value+1))
				}
				resp, err := cli.Txn(gctx).If(cmps...).Then(ops...).Commit()
				if err != nil {
					return err
				}
				if !resp.Succeeded {
					return fmt.Errorf("raw CAS Txn failed at revision %d", resp.Header.Revision)
				}
				for _, key := range keys {
					known[key] = seen{value: known[key].value + 1, modRev: resp.Header.Revision}
				}
				count.Add(benchCASIncrements)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		b.Fatal(err)
	}
	return float64(count.Load()) / time.Since(start).Seconds()
}

// serialRate calls op back to back for slice and returns the updates per
// second: op gets how many updates were done before it and returns how many
// it did.
func serialRate(slice time.Duration, op func(done int) int) float64 {
	var count int
	deadline := time.Now().Add(slice)
	start := time.Now()
	for time.Now().Before(deadline) {
		count += op(count)
	}
	return float64(count) / time.Since(start).Seconds()
}

// stmIncr increments the decimal value of key in one STM Txn.
func stmIncr(ctx context.Context, cli *clientv3.Client, key string) error {
	_, err := concurrency.NewSTM(cli, func(s concurrency.STM) error {
		v, _, _ := benchIncr([]byte(s.Get(key)))
		s.Put(key, string(v))
		return nil
	}, concurrency.WithAbortContext(ctx))
	return err
}

// benchContention: benchContenders workers increment one shared counter,
// against as many goroutines doing STM increments (one STM txn each).
//
// Two worker rows: one increment group per Tick, and benchContendedPerTick
// increment groups per Tick (a controller that has several requests pending
// emits one group per request; the groups of one Tick share a Txn and their
// rewrites of the counter merge into one write). With one increment per Tick
// both sides get at most one successful increment per raft round, and the
// third row counts how close they come (increments per WAL fsync): a round
// in which every Txn compares a value an earlier round replaced lands
// nothing. A conflict re-runs the patch at once on the value the failed
// Txn's Else read, as STM retries on a fresh read. More STM goroutines do
// not help STM, as they only add failed Txns.
func benchContention(ctx context.Context, b *testing.B, srv *etcdtest.Server, window time.Duration) []benchRow {
	cli := srv.Client(b)
	slice := window / benchRounds
	workerClis := make([]*clientv3.Client, benchContenders)
	stmClis := make([]*clientv3.Client, benchContenders)
	for i := range benchContenders {
		workerClis[i] = srv.Client(b)
		stmClis[i] = srv.Client(b)
	}

	var singleRate, batchedRate, stmRate, singlePer, stmPer float64
	for range benchRounds {
		rate, per := benchContendWorkers(ctx, b, cli, workerClis, 1, slice)
		singleRate, singlePer = singleRate+rate/benchRounds, singlePer+per/benchRounds
		rate, _ = benchContendWorkers(ctx, b, cli, workerClis, benchContendedPerTick, slice)
		batchedRate += rate / benchRounds
		rate, per = benchContendSTM(ctx, b, cli, stmClis, slice)
		stmRate, stmPer = stmRate+rate/benchRounds, stmPer+per/benchRounds
	}

	b.ReportMetric(batchedRate, "incr/s")
	return []benchRow{
		rateRow(fmt.Sprintf("contention: %d workers, one counter, %d increment groups per Tick: increments/s vs %d STM goroutines",
			benchContenders, benchContendedPerTick, benchContenders), stmRate, batchedRate, 2, 7, 7),
		rateRow("contention: same, 1 increment group per Tick", stmRate, singleRate, 2, 1.2, 1.2),
		{
			scenario: "contention, 1 group per Tick: increments per WAL fsync (raft round), worker / STM",
			baseline: fmt.Sprintf("%.2f", stmPer),
			worker:   fmt.Sprintf("%.2f", singlePer),
			ratio:    fmt.Sprintf("%.2f", singlePer/stmPer),
			must:     "report (bound: 1)",
			verdict:  "reported",
		},
	}
}

// benchContendWorkers runs one worker per client, each leaving perTick
// increments of one shared counter per Tick, and returns the rate of
// increments over slice and the increments per WAL fsync.
func benchContendWorkers(ctx context.Context, b *testing.B, cli *clientv3.Client, clis []*clientv3.Client,
	perTick int, slice time.Duration,
) (rate, perFsync float64) {
	prefix := benchPrefix("contend-worker")
	counter := util.NewEtcdKey(prefix + "/counter")
	workers := make([]*EtcdWorker, len(clis))
	for i := range workers {
		reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
			st := s.(*mapState)
			st.patches = make([][]DataPatch, perTick)
			for j := range st.patches {
				st.patches[j] = []DataPatch{SingleDataPatch{Key: counter, Func: benchIncr}}
			}
			return st, nil
		})
		workers[i] = newBenchWorker(b, clis[i], prefix, reactor, newMapState(prefix))
	}
	bw := startBenchWorkers(b, benchTickInterval, workers...)
	defer bw.stopClean(b)
	waitSumAbove(ctx, b, cli, prefix, int64(benchContenders))
	return benchRateFsyncs(ctx, b, cli, prefix, slice)
}

// benchContendSTM runs one goroutine per client doing STM increments of one
// shared counter, and returns the rate of increments over slice and the
// increments per WAL fsync.
func benchContendSTM(ctx context.Context, b *testing.B, cli *clientv3.Client, clis []*clientv3.Client,
	slice time.Duration,
) (rate, perFsync float64) {
	prefix := benchPrefix("contend-stm")
	key := prefix + "/counter"
	sctx, stop := context.WithCancel(ctx)
	g, gctx := errgroup.WithContext(sctx)
	for _, c := range clis {
		g.Go(func() error {
			for gctx.Err() == nil {
				if err := stmIncr(gctx, c, key); err != nil && gctx.Err() == nil {
					return err
				}
			}
			return nil
		})
	}
	waitSumAbove(ctx, b, cli, prefix, int64(benchContenders))
	rate, perFsync = benchRateFsyncs(ctx, b, cli, prefix, slice)
	stop()
	if err := g.Wait(); err != nil {
		b.Fatal(err)
	}
	return rate, perFsync
}

// firstTickWorker returns a worker on prefix whose reactor records the time
// of its first Tick and finishes.
func firstTickWorker(tb testing.TB, cli *clientv3.Client, prefix string, state ReactorState, at *time.Time) *EtcdWorker {
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		*at = time.Now()
		return s, ErrReactorFinished
	})
	return newBenchWorker(tb, cli, prefix, reactor, state)
}

// rawStreamGet reads every key under prefix + "/" into a map with one
// streaming range (etcd 3.7's RangeStream, pinned at one revision, no count):
// the fastest way to load a prefix by hand. BenchmarkScale uses it too.
func rawStreamGet(ctx context.Context, tb testing.TB, cli *clientv3.Client, prefix string) map[string][]byte {
	tb.Helper()
	key := prefix + "/"
	stream, err := cli.GetStream(ctx, key, clientv3.WithRange(clientv3.GetPrefixRangeEnd(key)))
	if err != nil {
		tb.Fatal(err)
	}
	return drainStream(tb, stream, map[string][]byte{})
}

// drainStream adds every key a streaming range (GetStream) sends to m, and
// returns m.
func drainStream(tb testing.TB, stream clientv3.GetStreamChan, m map[string][]byte) map[string][]byte {
	tb.Helper()
	for resp := range stream {
		if err := resp.Err(); err != nil {
			tb.Fatal(err)
		}
		for _, kv := range resp.Kvs {
			m[string(kv.Key)] = kv.Value
		}
	}
	return m
}

// rawUnpagedGet reads every key under prefix + "/" into a map with one
// unpaged range: the fastest way by hand on a server without RangeStream.
// BenchmarkScale uses it too.
func rawUnpagedGet(ctx context.Context, tb testing.TB, cli *clientv3.Client, prefix string) map[string][]byte {
	tb.Helper()
	resp, err := cli.Get(ctx, prefix+"/", clientv3.WithPrefix())
	if err != nil {
		tb.Fatal(err)
	}
	m := make(map[string][]byte, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		m[string(kv.Key)] = kv.Value
	}
	return m
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

// benchLoadScenarios: commit scaling, initial load and memory, on a prefix
// of benchLoadKeys keys.
func benchLoadScenarios(ctx context.Context, b *testing.B, srv *etcdtest.Server, window time.Duration) []benchRow {
	cli := srv.Client(b)
	big := benchPrefix("load")
	small := benchPrefix("small")
	benchPopulate(ctx, b, cli, big, benchLoadKeys)
	benchPopulate(ctx, b, cli, small, benchSmallKeys)

	// Initial load: Run -> first Tick, against the fastest raw read.
	var workerLoads, rawLoads []time.Duration
	for range benchLoadReps {
		runtime.GC()
		start := time.Now()
		if n := len(rawStreamGet(ctx, b, cli, big)); n != benchLoadKeys {
			b.Fatalf("raw get read %d keys, want %d", n, benchLoadKeys)
		}
		rawLoads = append(rawLoads, time.Since(start))

		runtime.GC()
		var first time.Time
		w := firstTickWorker(b, cli, big, newMapState(big), &first)
		start = time.Now()
		if err := w.Run(ctx, nil, time.Second, "bench-load"); err != nil {
			b.Fatal(err)
		}
		workerLoads = append(workerLoads, first.Sub(start))
	}
	rawLoad, workerLoad := median(rawLoads), median(workerLoads)

	// Memory held by a loaded worker and its state.
	held, rawBytes := benchHeldMemory(ctx, b, cli, big)

	// Commit scaling: one changed key per Tick, with 1k and 100k keys.
	cycle := map[int]time.Duration{}
	for _, n := range []int{benchSmallKeys, benchLoadKeys, benchSmallKeys, benchLoadKeys} {
		prefix := small
		if n == benchLoadKeys {
			prefix = big
		}
		cycle[n] += benchCommitCycle(ctx, b, srv, prefix, window/2)
	}
	cycleSmall, cycleBig := cycle[benchSmallKeys]/2, cycle[benchLoadKeys]/2

	return []benchRow{
		{
			scenario: fmt.Sprintf("commit scaling: tick->commit cycle, %dk keys / %dk keys", benchLoadKeys/1000, benchSmallKeys/1000),
			baseline: cycleSmall.Round(time.Microsecond).String(),
			worker:   cycleBig.Round(time.Microsecond).String(),
			ratio:    fmt.Sprintf("%.2f", float64(cycleBig)/float64(cycleSmall)),
			must:     "<= 1.5 (aim 1.2)",
			verdict:  verdict(float64(cycleBig)/float64(cycleSmall), 1.5, 1.2, false),
		},
		{
			scenario: fmt.Sprintf("initial load of %dk keys (%d B values): Run->first Tick / raw GetStream into a map (median of %d)", benchLoadKeys/1000, benchValueSize, benchLoadReps),
			baseline: rawLoad.Round(time.Millisecond).String(),
			worker:   workerLoad.Round(time.Millisecond).String(),
			ratio:    fmt.Sprintf("%.2f", float64(workerLoad)/float64(rawLoad)),
			must:     "<= 2.0 (aim 1.5)",
			verdict:  verdict(float64(workerLoad)/float64(rawLoad), 2, 1.5, false),
		},
		{
			scenario: "memory: Go heap held per key (worker + state) / raw key+value bytes",
			baseline: fmt.Sprintf("%.0f B/key", rawBytes),
			worker:   fmt.Sprintf("%.0f B/key", held),
			ratio:    fmt.Sprintf("%.2f", held/rawBytes),
			must:     "<= 3 (aim 2)",
			verdict:  verdict(held/rawBytes, 3, 2, false),
		},
	}
}

// benchHeldMemory loads prefix into a fresh worker with a mapState and
// returns the heap it and the state hold per key (heap while held minus heap
// after both are dropped, each after a full GC) and the raw key+value bytes
// per key.
func benchHeldMemory(ctx context.Context, b *testing.B, cli *clientv3.Client, prefix string) (held, raw float64) {
	heap := func() uint64 {
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	// The worker and the state are reachable only inside this function.
	loaded := func() (holding uint64, n, rawTotal int) {
		var first time.Time
		state := newMapState(prefix)
		w := firstTickWorker(b, cli, prefix, state, &first)
		if err := w.Run(ctx, nil, time.Second, "bench-mem"); err != nil {
			b.Fatal(err)
		}
		for k, v := range state.values { // k is relative: the raw key is prefix + k
			rawTotal += len(state.prefix) + len(k) + len(v)
		}
		holding = heap()
		runtime.KeepAlive(w)
		runtime.KeepAlive(state)
		return holding, len(state.values), rawTotal
	}
	holding, n, rawTotal := loaded()
	released := heap()
	if n != benchLoadKeys {
		b.Fatalf("state held %d keys, want %d", n, benchLoadKeys)
	}
	return float64(int64(holding)-int64(released)) / float64(n), float64(rawTotal) / float64(n)
}

// benchCommitCycle runs a worker on prefix whose every Tick changes one key,
// and returns the time per Tick -> commit -> Tick cycle over window.
func benchCommitCycle(ctx context.Context, b *testing.B, srv *etcdtest.Server, prefix string, window time.Duration) time.Duration {
	var ticks atomic.Int64
	keys := make([]util.EtcdKey, 100)
	for i := range keys {
		keys[i] = util.NewEtcdKey(benchKey(prefix, i))
	}
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		n := int(ticks.Add(1))
		value := benchValue(n)
		st.patches = [][]DataPatch{{SingleDataPatch{Key: keys[n%len(keys)], Func: func([]byte) ([]byte, bool, error) {
			return value, true, nil
		}}}}
		return st, nil
	})
	bw := startBenchWorkers(b, benchTickInterval, newBenchWorker(b, srv.Client(b), prefix, reactor, newMapState(prefix)))
	for ticks.Load() < 10 {
		if ctx.Err() != nil {
			b.Fatal(ctx.Err())
		}
		time.Sleep(5 * time.Millisecond)
	}
	t0, n0 := time.Now(), ticks.Load()
	time.Sleep(window)
	t1, n1 := time.Now(), ticks.Load()
	bw.stopClean(b)
	return t1.Sub(t0) / time.Duration(n1-n0)
}

// benchTickLag: an external client puts a probe key benchLagSamples times,
// spacing apart; the lag from the start of each Put until a Tick sees it is
// compared with the lag until a raw watch on another client delivers it. The
// worker runs with the given timerInterval. Ticks are rate limited to one per
// interval (burst 2) and the timer ticks of an idle worker use up that
// budget, so a change waits for up to one interval: the lag is about the
// watch delivery plus half an interval.
func benchTickLag(ctx context.Context, b *testing.B, srv *etcdtest.Server, interval, spacing time.Duration) benchRow {
	prefix := benchPrefix("lag")
	const probeRel = "/probe" // the probe's key in the worker's state
	probe := prefix + probeRel
	lt := &lagTimes{putAt: map[int64]time.Time{}, tickAt: map[int64]time.Time{}, wAt: map[int64]time.Time{}}
	var seen int64
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		n, _ := strconv.ParseInt(string(st.values[probeRel]), 10, 64)
		if n > seen {
			lt.record(lt.tickAt, seen+1, n, time.Now())
			seen = n
		}
		return st, nil
	})
	bw := startBenchWorkers(b, interval, newBenchWorker(b, srv.Client(b), prefix, reactor, newMapState(prefix)))
	stopWatch := lt.watch(ctx, srv.Client(b), probe)

	// Let the worker load and the watch start.
	putCli := srv.Client(b)
	if _, err := putCli.Put(ctx, probe, "0"); err != nil {
		b.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)

	next := time.Now()
	for i := int64(1); i <= benchLagSamples; i++ {
		time.Sleep(time.Until(next))
		next = next.Add(spacing)
		lt.record(lt.putAt, i, i, time.Now())
		if _, err := putCli.Put(ctx, probe, strconv.FormatInt(i, 10)); err != nil {
			b.Fatal(err)
		}
	}
	lt.waitSeen(b)
	stopWatch()
	bw.stopClean(b)
	return lt.row(interval)
}

// lagTimes holds when each probe value i of benchTickLag was put, seen by a
// Tick and delivered by the raw watch.
type lagTimes struct {
	mu                 sync.Mutex
	putAt, tickAt, wAt map[int64]time.Time
}

// record sets m[i] = at for i in from..to.
func (lt *lagTimes) record(m map[int64]time.Time, from, to int64, at time.Time) {
	lt.mu.Lock()
	defer lt.mu.Unlock()
	for i := from; i <= to; i++ {
		m[i] = at
	}
}

// watch records in wAt when a watch on probe via cli delivers each value,
// until the returned function is called.
func (lt *lagTimes) watch(ctx context.Context, cli *clientv3.Client, probe string) (stop func()) {
	wctx, stopWatch := context.WithCancel(ctx)
	wch := cli.Watch(wctx, probe)
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		for resp := range wch {
			now := time.Now()
			for _, ev := range resp.Events {
				n, _ := strconv.ParseInt(string(ev.Kv.Value), 10, 64)
				lt.record(lt.wAt, n, n, now)
			}
		}
	}()
	return func() {
		stopWatch()
		<-watchDone
	}
}

// waitSeen waits up to ten seconds until both the worker and the watch saw
// every put.
func (lt *lagTimes) waitSeen(b *testing.B) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		lt.mu.Lock()
		missing := 0
		for i := int64(1); i <= benchLagSamples; i++ {
			if lt.tickAt[i].IsZero() || lt.wAt[i].IsZero() {
				missing++
			}
		}
		lt.mu.Unlock()
		if missing == 0 {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("tick lag: %d puts not seen by both the worker and the watch", missing)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// row is the table row of the lags: Put -> Tick against Put -> watch.
func (lt *lagTimes) row(interval time.Duration) benchRow {
	lt.mu.Lock()
	defer lt.mu.Unlock()
	var tickLag, watchLag []time.Duration
	for i := int64(1); i <= benchLagSamples; i++ {
		tickLag = append(tickLag, lt.tickAt[i].Sub(lt.putAt[i]))
		watchLag = append(watchLag, lt.wAt[i].Sub(lt.putAt[i]))
	}
	slices.Sort(tickLag)
	slices.Sort(watchLag)
	pct := func(s []time.Duration, p float64) time.Duration { return s[int(p*float64(len(s)-1))] }
	t50, t99, w50, w99 := pct(tickLag, 0.5), pct(tickLag, 0.99), pct(watchLag, 0.5), pct(watchLag, 0.99)
	r50, r99 := float64(t50)/float64(w50), float64(t99)/float64(w99)
	v := "reported"
	if max(r50, r99) <= 2 {
		v = "reported (aim met)"
	}
	rd := func(d time.Duration) string { return d.Round(10 * time.Microsecond).String() }
	return benchRow{
		scenario: fmt.Sprintf("tick lag, timerInterval %v: Put -> Tick sees it / raw watch, p50 / p99", interval),
		baseline: rd(w50) + " / " + rd(w99),
		worker:   rd(t50) + " / " + rd(t99),
		ratio:    fmt.Sprintf("%.2f / %.2f", r50, r99),
		must:     "report (aim <= 2)",
		verdict:  v,
	}
}
