package orchestrator

import (
	"context"
	"fmt"
	"math"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"golang.org/x/sync/errgroup"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/util"
)

// BenchmarkSource measures what sharing a Source saves against workers that
// each have their own, on one embedded etcd (fsync off), and prints one
// table of ratios measured in the same run (make bench):
//   - fan-out: srcWorkers workers on srcKeys keys with states that keep
//     nothing, on one Source and each on its own, against one lone worker:
//     time to every first Tick, heap held, watchers on the server;
//   - a stuck worker: one of two workers on one Source blocked in Tick while
//     srcEvents overwrites of srcHotKeys keys arrive: heap growth against
//     the same writes with nobody stuck, how soon the other worker sees the
//     newest write, and how soon the stuck one does once released. The
//     embedded server keeps its raft log in the benchmark's heap, so the
//     same is measured again with etcd in a process of its own, where the
//     growth itself counts.

const (
	srcWorkers   = 8
	srcKeys      = 100_000
	srcRounds    = 5
	srcHotKeys   = 1_000
	srcEvents    = 40_000
	srcEventSize = 1024
	srcTxnPuts   = 10 // puts per writer Txn (distinct keys)
	srcWriters   = 4  // Txns in flight
	srcInterval  = 10 * time.Millisecond
	srcWatchers  = "etcd_debugging_mvcc_watcher_total"
)

// srcRow is one line of the table.
type srcRow struct{ what, measured, baseline, ratio, must string }

func BenchmarkSource(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	// The server keeps its raft log in this heap, the last
	// SnapshotCatchUpEntries entries (etcd's default 5,000 would hold more
	// than a trial's writes, and a trial would grow it by what the ones
	// before left): a short log is about the same size in every trial, and
	// the subtraction of the trial with nobody stuck cancels it.
	srv := etcdtest.NewServer(b, etcdtest.WithEmbedConfig(func(c *embed.Config) { c.SnapshotCatchUpEntries = 100 }))
	cli := scaleClient(b, srv.Endpoints()[0], false)
	big, hot := "/source/big", "/source/hot"
	scalePopulate(ctx, b, cli, big, srcKeys)
	srcPopulateHot(ctx, b, cli, hot)
	procCli := scaleClient(b, scaleEtcdProcess(b).Endpoints()[0], false)
	srcPopulateHot(ctx, b, procCli, hot)

	for b.Loop() {
		load := loadAverage()
		rows := srcFanOutRows(ctx, b, cli, big)
		rows = append(rows, srcStuckRows(ctx, b, cli, hot, "embedded etcd", true)...)
		rows = append(rows, srcStuckRows(ctx, b, procCli, hot, "etcd in its own process", false)...)
		printSourceTable(rows, load)
	}
}

func printSourceTable(rows []srcRow, load string) {
	var sb strings.Builder
	tw := tabwriter.NewWriter(&sb, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "\nBenchmarkSource: GOMAXPROCS=%d, fsync off, load average %s at start, %s at end\n",
		runtime.GOMAXPROCS(0), load, loadAverage())
	fmt.Fprintln(tw, "row\tmeasured\tbaseline\tratio\tmust reach")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.what, r.measured, r.baseline, r.ratio, r.must)
	}
	_ = tw.Flush()
	fmt.Print(sb.String())
}

// watcherTotal is the embedded server's count of watchers.
func watcherTotal(b *testing.B) float64 {
	mfs, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		b.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == srcWatchers && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	b.Fatalf("no metric %s", srcWatchers)
	return 0
}

// waitWatchers waits until the server counts want watchers (those of the
// workers stopped last are removed asynchronously).
func waitWatchers(ctx context.Context, b *testing.B, want float64) {
	waitUntil(ctx, b, fmt.Sprintf("%v server watchers", want), func() bool { return watcherTotal(b) == want })
}

// fanOut is one start of workers: the time from starting their Runs until
// the last first Tick, and the heap and watchers they added.
type fanOut struct {
	took     time.Duration
	spread   time.Duration // from the first worker's first Tick to the last's
	cpu      time.Duration // of this process (with the embedded etcd); -1: unknown
	heap     int64
	watchers float64
}

// srcFanOut starts n workers on prefix with states that keep nothing, on
// one Source if shared, each on its own otherwise, and measures them until
// each has ticked once.
func srcFanOut(ctx context.Context, b *testing.B, cli *clientv3.Client, prefix string, n int, shared bool) fanOut {
	var opts []Option
	if shared {
		src, err := NewSource(cli, prefix)
		if err != nil {
			b.Fatal(err)
		}
		opts = append(opts, WithSource(src))
	}
	var ticked sync.WaitGroup
	var first, last atomic.Int64
	first.Store(math.MaxInt64)
	workers := make([]*EtcdWorker, n)
	for i := range workers {
		var once sync.Once
		ticked.Add(1)
		reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
			once.Do(func() {
				now := time.Now().UnixNano()
				for old := last.Load(); old < now && !last.CompareAndSwap(old, now); old = last.Load() {
				}
				for old := first.Load(); old > now && !first.CompareAndSwap(old, now); old = first.Load() {
				}
				ticked.Done()
			})
			return s, nil
		})
		workers[i] = mustNewEtcdWorker(b, cli, prefix, reactor, &rdState{}, opts...) // keeps no value
	}
	heap0, watch0 := scaleHeap(), watcherTotal(b)
	cpu0, start := processCPU(), time.Now()
	g := startBenchWorkers(b, time.Second, workers...)
	all := make(chan struct{})
	go func() { ticked.Wait(); close(all) }()
	g.await(ctx, b, all, "the first Ticks")
	res := fanOut{took: time.Duration(last.Load() - start.UnixNano()), spread: time.Duration(last.Load() - first.Load()), cpu: -1}
	if cpu0 >= 0 {
		res.cpu = processCPU() - cpu0
	}
	// The watches open after the load, asynchronously: the most counted.
	for deadline := time.Now().Add(300 * time.Millisecond); time.Now().Before(deadline); {
		res.watchers = max(res.watchers, watcherTotal(b)-watch0)
		time.Sleep(20 * time.Millisecond)
	}
	res.heap = int64(scaleHeap()) - int64(heap0)
	g.stopClean(b)
	runtime.KeepAlive(workers)
	waitWatchers(ctx, b, watch0)
	return res
}

// srcFanOutRows: rows 1-3, the three set-ups alternating in srcRounds
// rounds (medians; watchers: the most seen).
func srcFanOutRows(ctx context.Context, b *testing.B, cli *clientv3.Client, prefix string) []srcRow {
	var lone, shared, lones []fanOut
	for range srcRounds {
		lone = append(lone, srcFanOut(ctx, b, cli, prefix, 1, false))
		shared = append(shared, srcFanOut(ctx, b, cli, prefix, srcWorkers, true))
		lones = append(lones, srcFanOut(ctx, b, cli, prefix, srcWorkers, false))
	}
	took := func(fs []fanOut) time.Duration {
		return median(each(fs, func(f fanOut) time.Duration { return f.took }))
	}
	perKey := func(fs []fanOut) float64 {
		hs := each(fs, func(f fanOut) int64 { return f.heap })
		slices.Sort(hs)
		return float64(hs[len(hs)/2]) / srcKeys
	}
	cpu := func(fs []fanOut) time.Duration {
		return median(each(fs, func(f fanOut) time.Duration { return f.cpu }))
	}
	watchers := func(fs []fanOut) float64 { return slices.Max(each(fs, func(f fanOut) float64 { return f.watchers })) }
	t1, tS, tL := took(lone), took(shared), took(lones)
	spread := median(each(shared, func(f fanOut) time.Duration { return f.spread }))
	h1, hS, hL := perKey(lone), perKey(shared), perKey(lones)
	c1, cS, cL := cpu(lone), cpu(shared), cpu(lones)
	k := fmt.Sprintf("%dk keys", srcKeys/1000)
	return []srcRow{
		{fmt.Sprintf("1. Runs -> every first Tick, %d workers on one Source / one lone worker, %s, median of %d", srcWorkers, k, srcRounds),
			dur(tS), dur(t1), ratioOf(tS, t1), "<= 1.3x"},
		{"   on one Source: first worker's first Tick -> the last one's (the other catch-ups); ratio (lone + that) / lone", dur(spread), dur(t1), ratioOf(spread+t1, t1), "report"},
		{fmt.Sprintf("   today: %d lone workers / one lone worker", srcWorkers), dur(tL), dur(t1), ratioOf(tL, t1), "(was 4.3x)"},
		{"   CPU time of the process (workers + embedded etcd) meanwhile: on one Source / one lone", dur(cS), dur(c1), ratioOf(cS, c1), "report"},
		{"   the same: lone workers / one lone", dur(cL), dur(c1), ratioOf(cL, c1), "report"},
		{fmt.Sprintf("2. heap held per key, %d workers on one Source / one lone worker", srcWorkers),
			fmt.Sprintf("%.0f B", hS), fmt.Sprintf("%.0f B", h1), fmt.Sprintf("%.2f", hS/h1), "<= 1.3x"},
		{fmt.Sprintf("   today: %d lone workers / one lone worker", srcWorkers),
			fmt.Sprintf("%.0f B", hL), fmt.Sprintf("%.0f B", h1), fmt.Sprintf("%.2f", hL/h1), "(was 8.2x)"},
		{fmt.Sprintf("3. server watchers (%s), %d workers on one Source / %d lone workers", srcWatchers, srcWorkers, srcWorkers),
			fmt.Sprintf("%.0f", watchers(shared)), fmt.Sprintf("%.0f", watchers(lones)), "", "1 / 8"},
	}
}

// processCPU is the user + system CPU time of this process so far, from
// /proc/self/stat (-1 where unknown: not Linux).
func processCPU() time.Duration {
	b, err := os.ReadFile("/proc/self/stat")
	i := strings.LastIndexByte(string(b), ')')
	if err != nil || i < 0 {
		return -1
	}
	f := strings.Fields(string(b[i+1:])) // from the state, field 3
	if len(f) < 13 {
		return -1
	}
	var utime, stime int64
	if _, err := fmt.Sscan(f[11]+" "+f[12], &utime, &stime); err != nil {
		return -1
	}
	return time.Duration(utime+stime) * (time.Second / 100) // USER_HZ
}

func each[T, U any](ts []T, fn func(T) U) []U {
	us := make([]U, len(ts))
	for i, t := range ts {
		us[i] = fn(t)
	}
	return us
}

// srcHotValue is a srcEventSize-byte value that starts with tag.
func srcHotValue(tag string) string {
	v := []byte(strings.Repeat("v", srcEventSize))
	copy(v, tag+":")
	return string(v)
}

func srcHotKey(prefix string, i int) string { return fmt.Sprintf("%s/h%04d", prefix, i%srcHotKeys) }

// srcPopulateHot writes the srcHotKeys keys of prefix.
func srcPopulateHot(ctx context.Context, b *testing.B, cli *clientv3.Client, prefix string) {
	for i := 0; i < srcHotKeys; i += srcTxnPuts {
		var ops []clientv3.Op
		for j := i; j < i+srcTxnPuts; j++ {
			ops = append(ops, clientv3.OpPut(srcHotKey(prefix, j), srcHotValue("init")))
		}
		if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
			b.Fatal(err)
		}
	}
}

// srcWrite overwrites the hot keys of prefix srcEvents times (Txns of
// srcTxnPuts puts, srcWriters in flight), then puts final to the first hot
// key alone and returns when that Put returned.
func srcWrite(ctx context.Context, b *testing.B, cli *clientv3.Client, prefix, final string) time.Time {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(srcWriters)
	for i := 0; i < srcEvents; i += srcTxnPuts {
		g.Go(func() error {
			ops := make([]clientv3.Op, 0, srcTxnPuts)
			for j := i; j < i+srcTxnPuts; j++ {
				ops = append(ops, clientv3.OpPut(srcHotKey(prefix, j), srcHotValue(fmt.Sprint(j))))
			}
			_, err := cli.Txn(gctx).Then(ops...).Commit()
			return err
		})
	}
	if err := g.Wait(); err != nil {
		b.Fatal(err)
	}
	if _, err := cli.Put(ctx, srcHotKey(prefix, 0), final); err != nil {
		b.Fatal(err)
	}
	return time.Now()
}

// valueState keeps every value (keyed by the key's string).
type valueState struct {
	mu     sync.Mutex // the bench reads it from outside the worker
	values map[string][]byte
}

func (s *valueState) Update(key util.EtcdKey, value []byte, _ bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if value == nil {
		delete(s.values, key.String())
	} else {
		s.values[key.String()] = value
	}
	return nil
}

func (s *valueState) GetPatches() [][]DataPatch { return nil }

// seer is a worker's reactor that notes its first Tick and when a Tick
// first sees the value it expects at key; once stick is set its next Tick
// blocks until unstick is closed.
type seer struct {
	key              string
	ticked           chan struct{}
	once             sync.Once
	stick            atomic.Bool
	entered, unstick chan struct{}

	mu   sync.Mutex
	want string
	seen chan struct{}
	at   time.Time
}

func newSeer(key string) *seer {
	return &seer{key: key, ticked: make(chan struct{}), entered: make(chan struct{}), unstick: make(chan struct{})}
}

// expect makes the seer look for value; the channel closes when a Tick saw it.
func (s *seer) expect(value string) <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.want, s.seen, s.at = value, make(chan struct{}), time.Time{}
	return s.seen
}

func (s *seer) seenAt() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.at
}

func (s *seer) Tick(ctx context.Context, st ReactorState) (ReactorState, error) {
	s.once.Do(func() { close(s.ticked) })
	if s.stick.CompareAndSwap(true, false) {
		close(s.entered)
		select {
		case <-s.unstick:
		case <-ctx.Done():
			return st, ctx.Err()
		}
	}
	vs := st.(*valueState)
	vs.mu.Lock()
	v := string(vs.values[s.key])
	vs.mu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.seen != nil && s.at.IsZero() && v == s.want {
		s.at = time.Now()
		close(s.seen)
	}
	return st, nil
}

// stuckTrial is one trial of the writes: the heap they added, when the
// free worker saw the last write after its Put returned, and (stuck) how
// long after its release the stuck worker saw it.
type stuckTrial struct {
	growth           int64
	freeLag, unstuck time.Duration
}

// srcStuckTrial runs two workers on one Source on prefix, one of them stuck
// in Tick if stuck, through srcWrite.
func srcStuckTrial(ctx context.Context, b *testing.B, cli *clientv3.Client, prefix string, stuck bool, trial int) stuckTrial {
	src, err := NewSource(cli, prefix)
	if err != nil {
		b.Fatal(err)
	}
	key := srcHotKey(prefix, 0)
	free, other := newSeer(key), newSeer(key)
	var ws []*EtcdWorker
	for _, s := range []*seer{free, other} {
		ws = append(ws, mustNewEtcdWorker(b, cli, prefix, s, &valueState{values: map[string][]byte{}}, WithSource(src)))
	}
	g := startBenchWorkers(b, srcInterval, ws...)
	wait := func(c <-chan struct{}, what string) { g.await(ctx, b, c, what) }
	wait(free.ticked, "the free worker's first Tick")
	wait(other.ticked, "the other worker's first Tick")
	if stuck {
		other.stick.Store(true)
		wait(other.entered, "the stuck Tick")
	}
	final := srcHotValue(fmt.Sprintf("final-%d", trial))
	freeSaw, otherSaw := free.expect(final), other.expect(final)
	heap0 := scaleHeap()
	putAt := srcWrite(ctx, b, cli, prefix, final)
	wait(freeSaw, "the free worker to see the last write")
	res := stuckTrial{freeLag: free.seenAt().Sub(putAt)}
	res.growth = int64(scaleHeap()) - int64(heap0)
	if stuck {
		released := time.Now()
		close(other.unstick)
		wait(otherSaw, "the released worker to see the last write")
		res.unstuck = other.seenAt().Sub(released)
	}
	g.stopClean(b)
	return res
}

var srcTrials atomic.Int64

// srcStuckRows: rows 4-6 on one etcd, the trials with and without a stuck
// worker alternating in two rounds (medians of two: means).
func srcStuckRows(ctx context.Context, b *testing.B, cli *clientv3.Client, prefix, where string, subtract bool) []srcRow {
	var free, stuck []stuckTrial
	for range 2 {
		free = append(free, srcStuckTrial(ctx, b, cli, prefix, false, int(srcTrials.Add(1)-1)))
		stuck = append(stuck, srcStuckTrial(ctx, b, cli, prefix, true, int(srcTrials.Add(1)-1)))
	}
	mib := func(ts []stuckTrial) float64 {
		return float64(ts[0].growth+ts[1].growth) / 2 / (1 << 20)
	}
	each := func(ts []stuckTrial) string {
		return fmt.Sprintf("%.1f, %.1f", float64(ts[0].growth)/(1<<20), float64(ts[1].growth)/(1<<20))
	}
	lag := func(ts []stuckTrial, f func(stuckTrial) time.Duration) string {
		d := func(d time.Duration) string {
			if d < 0 {
				return "<0" // seen before the Put returned
			}
			return dur(d)
		}
		return d(f(ts[0])) + " / " + d(f(ts[1]))
	}
	gS, gF := mib(stuck), mib(free)
	events := fmt.Sprintf("%d puts of %d B to %d keys", srcEvents, srcEventSize, srcHotKeys)
	rows := []srcRow{}
	if subtract {
		rows = append(rows, srcRow{fmt.Sprintf("4. %s: heap growth over %s, one of 2 workers stuck - nobody stuck (mean of 2)", where, events),
			fmt.Sprintf("%.1f MiB", gS-gF), fmt.Sprintf("stuck %s / free %s MiB", each(stuck), each(free)), "", "< 12 MiB"})
	} else {
		rows = append(rows, srcRow{fmt.Sprintf("4. %s: heap growth of the benchmark process, one of 2 workers stuck (mean of 2)", where),
			fmt.Sprintf("%.1f MiB (%s)", gS, each(stuck)), fmt.Sprintf("nobody stuck %s MiB", each(free)), fmt.Sprintf("diff %+.1f MiB", gS-gF), "< 12 MiB"})
	}
	return append(rows,
		srcRow{"5.   last Put returned -> the free worker's Tick sees it, with / without a stuck worker (2 trials)",
			lag(stuck, func(t stuckTrial) time.Duration { return t.freeLag }),
			lag(free, func(t stuckTrial) time.Duration { return t.freeLag }), "", "< 100 ms"},
		srcRow{"6.   stuck worker released -> its Tick sees the last write (2 trials)",
			lag(stuck, func(t stuckTrial) time.Duration { return t.unstuck }), "", "", "< 1 s"},
	)
}
