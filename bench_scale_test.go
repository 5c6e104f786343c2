package orchestrator

import (
	"context"
	"flag"
	"fmt"
	"math"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/util"
)

// BenchmarkScale measures the worker against raw etcd reads at scale: a
// prefix of ORCHESTRATOR_SCALE_KEYS keys (default 1,000,000) with 100-byte
// values, on one etcd (fsync off, 8 GiB backend quota; in its own process
// unless ORCHESTRATOR_SCALE_ETCD=embedded, see scaleEtcdMode). Its workers
// use the public API only. It prints one table and runs only when selected
// explicitly (-bench=BenchmarkScale, make bench-scale).

const (
	scaleDefaultKeys = 1_000_000
	scaleSmallKeys   = 100_000 // the linearity reference
	scaleCommitKeys  = 1_000   // the small prefix of the commit row
	scaleValueSize   = 100
	scalePageKeys    = 10_000
	scaleCommits     = 200
	scaleLagSamples  = 200
	scaleQuotaBytes  = 8 << 30
	scaleEtcdVersion = "3.7" // the server program of scaleEtcdProcess
)

// scaleEtcdMode returns "process" (the default) or "embedded", as
// ORCHESTRATOR_SCALE_ETCD says. The scale benchmark runs etcd in a process
// of its own by default, as it is deployed: an etcd embedded in the
// benchmark process shares its heap and collector, and at a million keys
// the collector's scans of etcd's index weigh on every read measured, the
// raw baselines' as much as the worker's. "embedded" runs it in the
// benchmark process instead.
func scaleEtcdMode(b *testing.B) string {
	switch m := os.Getenv("ORCHESTRATOR_SCALE_ETCD"); m {
	case "", "process":
		return "process"
	case "embedded":
		return m
	default:
		b.Fatalf("ORCHESTRATOR_SCALE_ETCD=%q: want process or embedded", m)
		return ""
	}
}

// scaleEtcdProcess starts etcd in a process of its own: the etcd
// scaleEtcdVersion server program of internal/servers (etcdtest.StartProcess:
// fsync off, as the embedded etcd), with the scale quota. It logs only
// errors (to the benchmark process's memory, where warnings of slow reads
// would add to the heap measured).
func scaleEtcdProcess(b *testing.B) *etcdtest.Process {
	return etcdtest.StartProcess(b, etcdtest.ServerBinary(b, scaleEtcdVersion),
		"-quota-backend-bytes="+strconv.Itoa(scaleQuotaBytes), "-log-level=error")
}

func scaleSelected() bool {
	f := flag.Lookup("test.bench")
	return f != nil && strings.Contains(f.Value.String(), "Scale")
}

func scaleKeys(b *testing.B) int {
	s := os.Getenv("ORCHESTRATOR_SCALE_KEYS")
	if s == "" {
		return scaleDefaultKeys
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < scaleCommitKeys {
		b.Fatalf("ORCHESTRATOR_SCALE_KEYS=%q: want an integer >= %d", s, scaleCommitKeys)
	}
	return n
}

func scaleKey(prefix string, i int) string { return fmt.Sprintf("%s/k%07d", prefix, i) }

func scaleValue(i int) string {
	v := []byte(strings.Repeat("v", scaleValueSize))
	copy(v, strconv.Itoa(i)+":")
	return string(v)
}

// scalePopulate writes n keys of scaleValue under prefix (populate) and
// returns how long it took.
func scalePopulate(ctx context.Context, b *testing.B, cli *clientv3.Client, prefix string, n int) time.Duration {
	start := time.Now()
	populate(ctx, b, cli, n, func(i int) (string, string) { return scaleKey(prefix, i), scaleValue(i) })
	return time.Since(start)
}

// scaleClient returns a client with the receive limit at its maximum and,
// if legacy, without RangeStream.
func scaleClient(b *testing.B, endpoint string, legacy bool) *clientv3.Client {
	cfg := etcdtest.ClientConfig(endpoint)
	cfg.MaxCallRecvMsgSize = math.MaxInt32
	if legacy {
		cfg.DialOptions = []grpc.DialOption{grpc.WithChainStreamInterceptor(noRangeStream)}
	}
	return etcdtest.NewClientFromConfig(b, cfg)
}

// Raw reads a user could write, each into a map[string][]byte.

// readerInto reads prefix with the package's range reader into a map.
func readerInto(ctx context.Context, b *testing.B, cli *clientv3.Client, prefix string) map[string][]byte {
	m := map[string][]byte{}
	_, err := readRange(ctx, cli, prefix+"/", clientv3.GetPrefixRangeEnd(prefix+"/"), readConfig{}, func(kv *mvccpb.KeyValue) error {
		m[string(kv.Key)] = kv.Value
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	return m
}

func rawPages(ctx context.Context, b *testing.B, cli *clientv3.Client, prefix string) map[string][]byte {
	key, end := prefix+"/", clientv3.GetPrefixRangeEnd(prefix+"/")
	m := map[string][]byte{}
	var rev int64
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(scalePageKeys)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := cli.Get(ctx, key, opts...)
		if err != nil {
			b.Fatal(err)
		}
		rev = resp.Header.Revision
		for _, kv := range resp.Kvs {
			m[string(kv.Key)] = kv.Value
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return m
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

// rawSizedStream counts the range, then streams it into a map of that
// size.
func rawSizedStream(ctx context.Context, b *testing.B, cli *clientv3.Client, prefix string) map[string][]byte {
	resp, err := cli.Get(ctx, prefix+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		b.Fatal(err)
	}
	stream, err := cli.GetStream(ctx, prefix+"/", clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision))
	if err != nil {
		b.Fatal(err)
	}
	return drainStream(b, stream, make(map[string][]byte, resp.Count))
}

// timed wraps a read returning its key count into one returning its
// duration, failing unless it read n keys.
func timed(b *testing.B, n int, read func() int) func() time.Duration {
	return func() time.Duration {
		start := time.Now()
		if got := read(); got != n {
			b.Fatalf("read %d keys, want %d", got, n)
		}
		return time.Since(start)
	}
}

// timeReads runs each read reps times, round-robin (so that noise from
// other processes spreads evenly), after one untimed warm-up read, and
// returns the median duration of each. settle runs before each read: it
// collects the garbage of the reads before, in the benchmark process and in
// the etcd process.
func timeReads(settle func(), reps int, reads ...func() time.Duration) []time.Duration {
	reads[0]()
	ds := make([][]time.Duration, len(reads))
	for range reps {
		for i, read := range reads {
			settle()
			ds[i] = append(ds[i], read())
		}
	}
	medians := make([]time.Duration, len(reads))
	for i := range ds {
		medians[i] = median(ds[i])
	}
	fmt.Fprintf(os.Stderr, "scale: samples %v\n", ds) // for a look at the spread
	return medians
}

func percentile(ds []time.Duration, p float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

// startWorker runs a worker on prefix with state whose every Tick calls
// onTick (on the worker's goroutine, where onTick may read and patch the
// state it was given).
func startWorker(b *testing.B, cli *clientv3.Client, prefix string, interval time.Duration,
	state ReactorState, onTick func(), opts ...Option,
) *workerGroup {
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		onTick()
		return s, nil
	})
	return startBenchWorkers(b, interval, mustNewEtcdWorker(b, cli, prefix, reactor, state, opts...))
}

// The states firstTick may give its worker.
const (
	plainState = false // a mapState
	sizedState = true  // a sizedMapState: a SizedState
)

// firstTick returns the time from Run to the first Tick of a worker on
// prefix that holds n keys, whose state is a fresh mapState, sized
// (sizedState) or plain (plainState).
func firstTick(ctx context.Context, b *testing.B, cli *clientv3.Client, prefix string, n int, sized bool) time.Duration {
	st := newMapState(prefix)
	var state ReactorState = st
	if sized {
		state = sizedMapState{st}
	}
	runtime.GC()
	ticked := make(chan struct{})
	var once sync.Once
	var at time.Time
	var got int
	start := time.Now()
	rw := startWorker(b, cli, prefix, time.Second, state, func() {
		once.Do(func() {
			at, got = time.Now(), len(st.values)
			close(ticked)
		})
	})
	defer rw.stopClean(b)
	rw.await(ctx, b, ticked, "the first Tick")
	if got != n {
		b.Fatalf("first Tick saw %d keys, want %d", got, n)
	}
	return at.Sub(start)
}

// scaleRow is one line of the table.
type scaleRow struct{ what, measured, baseline, ratio string }

func ratioOf(a, b time.Duration) string { return fmt.Sprintf("%.2f", float64(a)/float64(b)) }

func dur(d time.Duration) string {
	switch {
	case d >= 10*time.Second:
		return d.Round(100 * time.Millisecond).String()
	case d >= time.Millisecond:
		return d.Round(10 * time.Microsecond).String()
	}
	return d.Round(time.Microsecond).String()
}

func BenchmarkScale(b *testing.B) {
	if !scaleSelected() {
		b.Skip("run explicitly: -bench=BenchmarkScale (make bench-scale)")
	}
	n := scaleKeys(b)
	ctx, cancel := context.WithTimeout(context.Background(), 55*time.Minute)
	defer cancel()
	mode := scaleEtcdMode(b)
	var endpoint string
	settle := runtime.GC // before each timed read: no garbage of the one before
	if mode == "embedded" {
		endpoint = etcdtest.NewServer(b, etcdtest.WithQuotaBackendBytes(scaleQuotaBytes)).Endpoints()[0]
	} else {
		etcd := scaleEtcdProcess(b)
		endpoint = etcd.Endpoints()[0]
		settle = func() { etcd.CollectGarbage(b); runtime.GC() }
	}
	admin := scaleClient(b, endpoint, false)
	big, small100k, tiny := "/scale/big", "/scale/small", "/scale/tiny"
	setup := scalePopulate(ctx, b, admin, big, n)
	if n != scaleSmallKeys {
		scalePopulate(ctx, b, admin, small100k, scaleSmallKeys)
	}
	scalePopulate(ctx, b, admin, tiny, scaleCommitKeys)
	fmt.Printf("setup: %d keys written in %v (%.0f keys/s; fsync off)\n", n, dur(setup), float64(n)/setup.Seconds())

	for b.Loop() {
		start := time.Now()
		var rows []scaleRow
		var small []scaleRow
		if n != scaleSmallKeys {
			scaleLoadRows(ctx, b, settle, admin, small100k, scaleSmallKeys, &small)
			scaleProgress(start, "load of the small prefix")
		}
		streamN := scaleLoadRows(ctx, b, settle, admin, big, n, &rows)
		scaleProgress(start, "load")
		if n != scaleSmallKeys {
			rows = append(rows, small...)
			rows = append(rows, scaleLinearityRows(ctx, b, settle, admin, big, small100k, n)...)
			scaleProgress(start, "linearity")
		}
		rows = append(rows, scaleFallbackRows(ctx, b, settle, endpoint, admin, big, n)...)
		scaleProgress(start, "fallback")
		rows = append(rows, scaleReloadRows(ctx, b, endpoint, admin, big, n, streamN)...)
		scaleProgress(start, "reload")
		rows = append(rows, scaleMemoryRows(ctx, b, admin, big, n)...)
		scaleProgress(start, "memory")
		rows = append(rows, scaleCommitRow(ctx, b, admin, tiny, big, n))
		rows = append(rows, scaleLagRow(ctx, b, admin, big, n))
		printScaleTable(n, mode, rows)
	}
}

// scaleLinearityRows: load time at n keys over load time at
// scaleSmallKeys, for the worker and for the fastest raw read. The two sizes
// alternate in the same rounds, so that a machine that slows down during
// the benchmark (this VM does, by up to a third over minutes) slows both.
func scaleLinearityRows(ctx context.Context, b *testing.B, settle func(), cli *clientv3.Client, big, small string, n int) []scaleRow {
	ns := scaleSmallKeys
	ds := timeReads(settle, 5,
		func() time.Duration { return firstTick(ctx, b, cli, big, n, sizedState) },
		func() time.Duration { return firstTick(ctx, b, cli, small, ns, sizedState) },
		func() time.Duration { return firstTick(ctx, b, cli, big, n, plainState) },
		func() time.Duration { return firstTick(ctx, b, cli, small, ns, plainState) },
		timed(b, n, func() int { return len(rawSizedStream(ctx, b, cli, big)) }),
		timed(b, ns, func() int { return len(rawSizedStream(ctx, b, cli, small)) }),
		timed(b, n, func() int { return len(rawStreamGet(ctx, b, cli, big)) }),
		timed(b, ns, func() int { return len(rawStreamGet(ctx, b, cli, small)) }),
	)
	row := func(what string, a, b time.Duration) scaleRow {
		return scaleRow{what: what, measured: dur(a), baseline: dur(b), ratio: ratioOf(a, b)}
	}
	return []scaleRow{
		row(fmt.Sprintf("linearity (linear = %.1f, sizes alternating, median of 5): first Tick %dk / %dk keys, SizedState",
			float64(n)/float64(ns), n/1000, ns/1000), ds[0], ds[1]),
		row("  the same, plain map state", ds[2], ds[3]),
		row("  the same for raw count + GetStream into sized map", ds[4], ds[5]),
		row("  the same for raw GetStream into map", ds[6], ds[7]),
	}
}

// scaleProgress notes on stderr which part of the benchmark is done (the
// table comes at the end; a 1M-key run takes many minutes).
func scaleProgress(start time.Time, part string) {
	fmt.Fprintf(os.Stderr, "scale: %s done after %v\n", part, time.Since(start).Round(time.Second))
}

func printScaleTable(n int, mode string, rows []scaleRow) {
	var sb strings.Builder
	tw := tabwriter.NewWriter(&sb, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "BenchmarkScale: %d keys, %d B values, GOMAXPROCS=%d, etcd %s\n", n, scaleValueSize, runtime.GOMAXPROCS(0), mode)
	fmt.Fprintln(tw, "row\tmeasured\tbaseline\tratio")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", r.what, r.measured, r.baseline, r.ratio)
	}
	_ = tw.Flush()
	fmt.Print(sb.String())
}

// scaleLoadRows: the worker's first Tick, with a plain and with a sized
// state, and four raw reads of prefix (n keys); returns the raw stream's
// time.
func scaleLoadRows(ctx context.Context, b *testing.B, settle func(), cli *clientv3.Client, prefix string, n int, rows *[]scaleRow) time.Duration {
	reps := 9 // small reads are short and noisy
	if n > 300_000 {
		reps = 3
	}
	ds := timeReads(settle, reps,
		timed(b, n, func() int { return len(rawStreamGet(ctx, b, cli, prefix)) }),
		timed(b, n, func() int { return len(rawSizedStream(ctx, b, cli, prefix)) }),
		timed(b, n, func() int { return len(rawPages(ctx, b, cli, prefix)) }),
		timed(b, n, func() int { return len(rawUnpagedGet(ctx, b, cli, prefix)) }),
		func() time.Duration { return firstTick(ctx, b, cli, prefix, n, plainState) },
		func() time.Duration { return firstTick(ctx, b, cli, prefix, n, sizedState) },
		timed(b, n, func() int { return len(readerInto(ctx, b, cli, prefix)) }),
	)
	stream, sizedStream, pages, unpaged, worker, sizedWorker, reader := ds[0], ds[1], ds[2], ds[3], ds[4], ds[5], ds[6]
	fastest := min(stream, sizedStream, pages, unpaged)
	k := fmt.Sprintf("%dk keys", n/1000)
	*rows = append(*rows,
		scaleRow{"load " + k + ": worker Run -> first Tick, plain map state", dur(worker), "fastest raw " + dur(fastest), ratioOf(worker, fastest)},
		scaleRow{"load " + k + ": worker Run -> first Tick, SizedState", dur(sizedWorker), "fastest raw " + dur(fastest), ratioOf(sizedWorker, fastest)},
		scaleRow{"load " + k + ": readRange (the worker's reader) into map", dur(reader), "fastest raw", ratioOf(reader, fastest)},
		scaleRow{"load " + k + ": raw GetStream into map", dur(stream), "fastest raw", ratioOf(stream, fastest)},
		scaleRow{"load " + k + ": raw count + GetStream into sized map", dur(sizedStream), "fastest raw", ratioOf(sizedStream, fastest)},
		scaleRow{"load " + k + ": raw pinned 10k-key pages into map", dur(pages), "fastest raw", ratioOf(pages, fastest)},
		scaleRow{"load " + k + ": raw unpaged Get into map", dur(unpaged), "fastest raw", ratioOf(unpaged, fastest)},
	)
	return stream
}

// scaleFallbackRows: first Tick of a worker whose client has no RangeStream
// (etcd < 3.7) against one raw unpaged Get.
func scaleFallbackRows(ctx context.Context, b *testing.B, settle func(), endpoint string, cli *clientv3.Client, prefix string, n int) []scaleRow {
	legacy := scaleClient(b, endpoint, true)
	ds := timeReads(settle, 3,
		timed(b, n, func() int { return len(rawUnpagedGet(ctx, b, cli, prefix)) }),
		func() time.Duration { return firstTick(ctx, b, legacy, prefix, n, sizedState) },
		func() time.Duration { return firstTick(ctx, b, legacy, prefix, n, plainState) },
		timed(b, n, func() int { return len(readerInto(ctx, b, legacy, prefix)) }),
	)
	unpaged, sized, plain, reader := ds[0], ds[1], ds[2], ds[3]
	k := fmt.Sprintf("%dk keys", n/1000)
	base := "raw unpaged Get " + dur(unpaged)
	return []scaleRow{
		{"fallback (no RangeStream) " + k + ": worker first Tick, SizedState", dur(sized), base, ratioOf(sized, unpaged)},
		{"fallback (no RangeStream) " + k + ": worker first Tick, plain map state", dur(plain), base, ratioOf(plain, unpaged)},
		{"fallback (no RangeStream) " + k + ": readRange into map", dur(reader), base, ratioOf(reader, unpaged)},
	}
}

// scaleReloadRows: a running worker loses its connection (proxy cut), a key
// is written and the history compacted beyond the worker's watch revision,
// the connection comes back: the time from the reconnection to the Tick
// that sees the key (a full reload), against a raw streaming read.
func scaleReloadRows(ctx context.Context, b *testing.B, endpoint string, admin *clientv3.Client, prefix string, n int, stream time.Duration) []scaleRow {
	proxy := etcdtest.NewProxy(b, endpoint)
	pcli := scaleClient(b, proxy.Endpoint(), false)
	const probeRel = "/zz-reload" // the probe's key in the worker's state
	probe := prefix + probeRel
	ready, seen := make(chan struct{}), make(chan struct{})
	var readyOnce, seenOnce sync.Once
	var seenAt time.Time
	// The worker's own log says when it noticed the compaction and how long
	// the reload took, apart from the reconnection.
	core, logs := observer.New(zapcore.InfoLevel)
	st := newMapState(prefix)
	rw := startWorker(b, pcli, prefix, 100*time.Millisecond, st, func() {
		readyOnce.Do(func() { close(ready) })
		if _, ok := st.values[probeRel]; ok {
			seenOnce.Do(func() { seenAt = time.Now(); close(seen) })
		}
	}, WithLogger(zap.New(core)))
	defer rw.stopClean(b)
	rw.await(ctx, b, ready, "the first Tick")

	proxy.Pause()
	for _, k := range []string{probe, "/scale/elsewhere"} { // compact beyond the probe
		if _, err := admin.Put(ctx, k, "x"); err != nil {
			b.Fatal(err)
		}
	}
	if _, err := etcdtest.Compact(ctx, admin); err != nil {
		b.Fatal(err)
	}
	resumeAt := time.Now()
	proxy.Resume()
	if _, err := pcli.Get(ctx, "/scale/elsewhere"); err != nil {
		b.Fatal(err)
	}
	reconnect := time.Since(resumeAt)
	rw.await(ctx, b, seen, "the Tick after the reload")
	reload := seenAt.Sub(resumeAt)
	if _, err := admin.Delete(ctx, probe); err != nil {
		b.Fatal(err)
	}
	noticed, loaded := scaleReloadLog(b, logs)
	k := fmt.Sprintf("%dk keys", n/1000)
	return []scaleRow{
		{"reload after compaction " + k + ": compaction noticed -> Tick", dur(seenAt.Sub(noticed)), "raw GetStream " + dur(stream), ratioOf(seenAt.Sub(noticed), stream)},
		{"  of which: the reload (worker's log)", dur(loaded), "raw GetStream " + dur(stream), ratioOf(loaded, stream)},
		{"  reconnect -> Tick, incl. gRPC reconnection", dur(reload), "", ""},
		{"  reconnect -> first Get through the proxy", dur(reconnect), "", ""},
	}
}

// scaleReloadLog returns when the worker logged that its watch revision
// was compacted, and the duration it logged for the reload that followed.
func scaleReloadLog(b *testing.B, logs *observer.ObservedLogs) (noticed time.Time, loaded time.Duration) {
	compacted := logs.FilterMessage("watch revision compacted, reloading the source").All()
	if len(compacted) == 0 {
		b.Fatal("the worker logged no compaction")
	}
	noticed = compacted[0].Time
	for _, e := range logs.FilterMessage("source loaded").All() {
		if e.Time.After(noticed) {
			if d, ok := e.ContextMap()["duration"].(time.Duration); ok {
				return noticed, d
			}
		}
	}
	b.Fatal("the worker logged no reload")
	return noticed, 0
}

// scaleHeap returns the live heap after two full collections.
func scaleHeap() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// scaleMemoryRows: heap held per key by a running worker with its state,
// and by the same state built alone from a raw stream. Each is the heap
// while held minus the heap right after it is dropped (the embedded etcd
// shares the heap: measuring both ends back to back keeps its own
// allocations out).
func scaleMemoryRows(ctx context.Context, b *testing.B, cli *clientv3.Client, prefix string, n int) []scaleRow {
	held := func() uint64 {
		stream, err := cli.GetStream(ctx, prefix+"/", clientv3.WithPrefix())
		if err != nil {
			b.Fatal(err)
		}
		state := newMapState(prefix)
		for resp := range stream {
			if err := resp.Err(); err != nil {
				b.Fatal(err)
			}
			for _, kv := range resp.Kvs {
				_ = state.Update(util.NewEtcdKeyFromBytes(kv.Key), kv.Value, true)
			}
		}
		h := scaleHeap()
		runtime.KeepAlive(state)
		return h
	}()
	stateOnly := float64(int64(held)-int64(scaleHeap())) / float64(n)
	held = func() uint64 {
		ready := make(chan struct{})
		var once sync.Once
		rw := startWorker(b, cli, prefix, time.Second, newMapState(prefix), func() { once.Do(func() { close(ready) }) })
		defer rw.stopClean(b)
		rw.await(ctx, b, ready, "the first Tick")
		return scaleHeap()
	}()
	withWorker := float64(int64(held)-int64(scaleHeap())) / float64(n)
	k := fmt.Sprintf("%dk keys", n/1000)
	rawPerKey := float64(len(scaleKey(prefix, 0)) + scaleValueSize)
	return []scaleRow{
		{"heap/key " + k + ": running worker + its state", fmt.Sprintf("%.0f B", withWorker), fmt.Sprintf("state alone %.0f B", stateOnly), fmt.Sprintf("%.2f", withWorker/stateOnly)},
		{"heap/key " + k + ": worker's own share (total - state)", fmt.Sprintf("%.0f B", withWorker-stateOnly), fmt.Sprintf("raw key+value %.0f B", rawPerKey), fmt.Sprintf("%.2f", (withWorker-stateOnly)/rawPerKey)},
	}
}

// commitCycle returns the median time between Ticks of a worker on prefix
// whose every Tick commits one single-key patch group.
func commitCycle(ctx context.Context, b *testing.B, cli *clientv3.Client, prefix string) time.Duration {
	var ticks []time.Time
	done := make(chan struct{})
	st := newMapState(prefix)
	rw := startWorker(b, cli, prefix, time.Millisecond, st, func() {
		if len(ticks) > scaleCommits {
			return
		}
		ticks = append(ticks, time.Now())
		if len(ticks) > scaleCommits {
			close(done)
			return
		}
		i := len(ticks)
		key, value := util.NewEtcdKey(scaleKey(prefix, i%100)), []byte(scaleValue(i))
		st.patches = append(st.patches, []DataPatch{SingleDataPatch{
			Key: key, Func: func([]byte) ([]byte, bool, error) { return value, true, nil },
		}})
	})
	rw.await(ctx, b, done, "the commits")
	rw.stopClean(b)
	var ds []time.Duration
	for i := 1; i < len(ticks); i++ {
		ds = append(ds, ticks[i].Sub(ticks[i-1]))
	}
	return median(ds)
}

func scaleCommitRow(ctx context.Context, b *testing.B, cli *clientv3.Client, tiny, big string, n int) scaleRow {
	small := commitCycle(ctx, b, cli, tiny)
	large := commitCycle(ctx, b, cli, big)
	return scaleRow{
		fmt.Sprintf("commit cycle (Tick -> commit -> Tick, median of %d): %dk keys", scaleCommits, n/1000),
		dur(large), fmt.Sprintf("%dk keys %s", scaleCommitKeys/1000, dur(small)), ratioOf(large, small),
	}
}

// scaleLagRow: the time from the start of a raw Put of a key to the Tick
// that sees it, with an n-key state (timerInterval 1ms).
func scaleLagRow(ctx context.Context, b *testing.B, cli *clientv3.Client, prefix string, n int) scaleRow {
	const probeRel = "/zz-lag" // the probe's key in the worker's state
	probe := prefix + probeRel
	seen := make(chan string, 1)
	ready := make(chan struct{})
	var once sync.Once
	last := ""
	st := newMapState(prefix)
	rw := startWorker(b, cli, prefix, time.Millisecond, st, func() {
		once.Do(func() { close(ready) })
		if v := string(st.values[probeRel]); v != last {
			last = v
			seen <- v
		}
	})
	defer rw.stopClean(b)
	rw.await(ctx, b, ready, "the first Tick")
	var lags, puts []time.Duration
	for i := range scaleLagSamples {
		v := strconv.Itoa(i + 1)
		start := time.Now()
		if _, err := cli.Put(ctx, probe, v); err != nil {
			b.Fatal(err)
		}
		puts = append(puts, time.Since(start))
		select {
		case got := <-seen:
			if got != v {
				b.Fatalf("Tick saw %q, want %q", got, v)
			}
			lags = append(lags, time.Since(start))
		case <-ctx.Done():
			b.Fatal(ctx.Err())
		}
	}
	if _, err := cli.Delete(ctx, probe); err != nil {
		b.Fatal(err)
	}
	<-seen // the deletion
	return scaleRow{
		fmt.Sprintf("Tick lag %dk keys: Put start -> Tick, p50 / p99", n/1000),
		dur(percentile(lags, 0.5)) + " / " + dur(percentile(lags, 0.99)),
		"Put alone p50 " + dur(percentile(puts, 0.5)), ratioOf(percentile(lags, 0.5), percentile(puts, 0.5)),
	}
}
