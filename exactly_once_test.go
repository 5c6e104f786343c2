package orchestrator

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// ---------------------------------------------------------------------------
// The counter: every Tick of every worker emits one group {increment
// /counter, put /log/<worker>-<n>}. A group applied twice increments the
// counter more often than there are log keys; a lost group leaves the
// worker's own log short of what it emitted. Each Tick also checks that the
// worker's own last group is visible, and can record a history for
// porcupine: each increment with the value it wrote, each Tick's read of the
// counter.

type counterWorld struct {
	prefix   string
	workers  int
	tolerate bool // count violations and go on (soak) instead of failing Run
	record   bool // keep a porcupine history
	origin   time.Time

	stop       atomic.Bool
	emissions  // increment groups
	violations violationRecorder

	mu  sync.Mutex
	ops []porcupine.Operation
}

func newCounterWorld(prefix string, workers int, record bool) *counterWorld {
	return &counterWorld{prefix: prefix, workers: workers, record: record, origin: time.Now(), emissions: newEmissions(workers)}
}

// counterInput is a porcupine input: an increment or a read.
type counterInput struct{ inc bool }

// counterModel is a linearizable counter: an increment returns the new value,
// a read the current one.
var counterModel = porcupine.Model{
	Init: func() any { return int64(0) },
	Step: func(state, input, output any) (bool, any) {
		s, out := state.(int64), output.(int64)
		if input.(counterInput).inc {
			return out == s+1, s + 1
		}
		return out == s, s
	},
	DescribeOperation: func(input, output any) string {
		if input.(counterInput).inc {
			return fmt.Sprintf("inc() -> %d", output)
		}
		return fmt.Sprintf("read() -> %d", output)
	},
}

func counterLog(id int, n int64) string { return fmt.Sprintf("/log/%d-%d", id, n) }

// recordOp adds an operation by client id over [call, ret].
func (c *counterWorld) recordOp(id int, inc bool, call, ret time.Time, value int64) {
	if !c.record {
		return
	}
	op := porcupine.Operation{
		ClientId: id,
		Input:    counterInput{inc: inc},
		Call:     call.Sub(c.origin).Nanoseconds(),
		Output:   value,
		Return:   ret.Sub(c.origin).Nanoseconds(),
	}
	c.mu.Lock()
	c.ops = append(c.ops, op)
	c.mu.Unlock()
}

// counterInc is one increment in flight: emitted at call, wrote is the
// value the last run of its patch wrote (the run that landed, once the
// worker ticks again).
type counterInc struct {
	call  time.Time
	wrote int64
}

// newWorker returns counter worker id on cli.
func (c *counterWorld) newWorker(t testing.TB, cli *clientv3.Client, id int, opts ...Option) *EtcdWorker {
	t.Helper()
	state := newMapState(c.prefix)
	var (
		count    int64
		inflight *counterInc
		readFrom = time.Now() // lower bound of the time of the next read's snapshot
	)
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		now := time.Now()
		st := s.(*mapState)
		value := st.int("/counter")
		if inflight != nil {
			// The group landed (Tick only runs once the last commit did) and
			// must be visible.
			var err error
			switch {
			case value < inflight.wrote:
				err = fmt.Errorf("counter: worker %d: /counter = %d but its own last increment wrote %d", id, value, inflight.wrote)
			case st.values[counterLog(id, count)] == nil:
				err = fmt.Errorf("counter: worker %d: its own last log key %s is missing", id, counterLog(id, count))
			}
			if err != nil {
				c.violations.record(err)
				if !c.tolerate {
					return nil, err
				}
			}
			c.recordOp(id, true, inflight.call, now, inflight.wrote)
			// The snapshot includes that increment, so it is not older
			// than the increment's call.
			if inflight.call.After(readFrom) {
				readFrom = inflight.call
			}
			inflight = nil
		}
		c.recordOp(id, false, readFrom, now, value)
		if c.stop.Load() {
			return st, ErrReactorFinished
		}
		count++
		inc := &counterInc{call: now}
		inflight = inc
		st.patches = append(st.patches, []DataPatch{
			SingleDataPatch{Key: st.key("/counter"), Func: func(old []byte) ([]byte, bool, error) {
				var n int64
				if old != nil {
					var err error
					if n, err = strconv.ParseInt(string(old), 10, 64); err != nil {
						return nil, false, err
					}
				}
				inc.wrote = n + 1
				return []byte(strconv.FormatInt(n+1, 10)), true, nil
			}},
			setPatch(st.key(counterLog(id, count)), []byte(strconv.Itoa(id))),
		})
		c.emit(id, count)
		return st, nil
	})
	return mustNewEtcdWorker(t, cli, c.prefix, reactor, state, opts...)
}

// readEtcd returns /counter and the number of log keys per worker.
func (c *counterWorld) readEtcd(ctx context.Context, t testing.TB, cli *clientv3.Client) (int64, []int64) {
	t.Helper()
	kvs, _ := userKVs(ctx, t, cli, c.prefix, 0)
	logs := make([]int64, c.workers)
	var counter int64
	for k, kv := range kvs {
		rel := strings.TrimPrefix(k, c.prefix)
		switch {
		case rel == "/counter":
			counter = mustInt(t, []byte(kv.value))
		case strings.HasPrefix(rel, "/log/"):
			id := mustInt(t, []byte(kv.value))
			logs[id]++
		}
	}
	return counter, logs
}

// check compares etcd's contents with what the workers emitted: every group
// landed exactly once.
func (c *counterWorld) check(ctx context.Context, t testing.TB, cli *clientv3.Client) error {
	t.Helper()
	counter, logs := c.readEtcd(ctx, t, cli)
	var total int64
	for _, n := range logs {
		total += n
	}
	if counter != total {
		return fmt.Errorf("counter: /counter = %d but there are %d log keys: a group was applied twice or torn", counter, total)
	}
	for i, n := range logs {
		if want := c.counts[i].Load(); n != want {
			return fmt.Errorf("counter: worker %d: %d log keys, but it emitted %d groups", i, n, want)
		}
	}
	return nil
}

// waitProgress waits until the workers emitted n more groups.
func (c *counterWorld) waitProgress(t testing.TB, g *workerGroup, n int64, what string) {
	t.Helper()
	waitGrown(t, g, &c.emitted, n, "counter progress "+what)
}

// finish stops the workers, requires that every Run returned nil, and that
// etcd holds exactly what they emitted.
func (c *counterWorld) finish(ctx context.Context, t testing.TB, g *workerGroup, cli *clientv3.Client) {
	t.Helper()
	c.stop.Store(true)
	g.requireAllNil(t, faultProgressTimeout)
	c.violations.requireNone(t)
	require.NoError(t, c.check(ctx, t, cli))
}

// startCounter starts c's workers, each on a client from newClient, for at
// most timeout.
func startCounter(t testing.TB, c *counterWorld, newClient func(i int) *clientv3.Client, opts []Option,
	timeout time.Duration,
) *workerGroup {
	t.Helper()
	ws := make([]*EtcdWorker, c.workers)
	for i := range ws {
		ws[i] = c.newWorker(t, newClient(i), i, opts...)
	}
	return startWorkerGroup(t, timeout, "counter", ws)
}

// commitFault cuts the link while a commit Txn is in flight: the proxy
// delays traffic by delay each way, and at `at` after a commit Txn starts,
// the link is cut (Pause: the connection drops) or stalled (Blackhole: the
// request or the response arrives, late, after the client gave up) for
// outage.
type commitFault struct {
	name      string
	at        time.Duration
	blackhole bool
	outage    time.Duration
}

const commitFaultDelay = 150 * time.Millisecond

// commitFaults: with 150ms each way, a Txn reaches etcd after ~150ms and its
// answer the client after ~300ms. At 75ms the request is lost (or stalled);
// at 250ms the Txn has landed and its answer is lost (or stalled).
var commitFaults = []commitFault{
	{name: "request lost", at: commitFaultDelay / 2, outage: 700 * time.Millisecond},
	{name: "response lost", at: commitFaultDelay * 5 / 3, outage: 700 * time.Millisecond},
	{name: "request stalled", at: commitFaultDelay / 2, blackhole: true, outage: faultRequestTimeout + 500*time.Millisecond},
	{name: "response stalled", at: commitFaultDelay * 5 / 3, blackhole: true, outage: faultRequestTimeout + 500*time.Millisecond},
}

// inject applies f to p, timing it on the next commit Txn probe reports.
func (f commitFault) inject(t testing.TB, p *etcdtest.Proxy, probe *txnProbe) {
	t.Helper()
	p.SetDelay(commitFaultDelay)
	t0 := probe.next(t, faultProgressTimeout)
	sleepUntil(t0.Add(f.at))
	if f.blackhole {
		p.Blackhole()
	} else {
		p.Pause()
	}
	p.SetDelay(0)
	time.Sleep(f.outage) // the outage itself
	p.Resume()
}

// resolutionLogs counts the worker's reports of resolved unknown outcomes.
func resolutionLogs(logs *observer.ObservedLogs) (landed, notLanded int) {
	return logs.FilterMessage("unknown commit outcome resolved: landed").Len(),
		logs.FilterMessage("unknown commit outcome resolved: not landed").Len()
}

// observedLogger returns a logger that records Info and above in the
// returned observer and also shows warnings in the test output.
func observedLogger(t testing.TB) (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(zapcore.InfoLevel)
	return zap.New(zapcore.NewTee(core, faultLogger(t).Core())), logs
}

// TestExactlyOnceCommitCuts: four workers emit {increment /counter, put
// /log/<unique>} groups while commits are cut mid-flight: the request or the
// response is lost with the connection, or stalled past the request timeout
// and delivered late. Each unknown outcome must be resolved: at the end
// /counter equals the number of log keys and each worker's log keys equal
// the groups it emitted. The workers make progress after each fault, and
// both resolution outcomes (landed, not landed) occur.
func TestExactlyOnceCommitCuts(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, ownServer(), withProxy())
	ctx := testContext(t)
	probe := newTxnProbe()
	lg, logs := observedLogger(t)
	c := newCounterWorld("/fault/exactly-once", 4, false)
	g := startCounter(t, c, func(int) *clientv3.Client { return env.client(t, probe.dialOption()) },
		faultOptions(env.reg, lg), 3*time.Minute)

	c.waitProgress(t, g, 10, "before the faults")
	for cycle := 1; ; cycle++ {
		for _, f := range commitFaults {
			before := c.emitted.Load()
			f.inject(t, env.proxy, probe)
			c.waitProgress(t, g, 5, fmt.Sprintf("cycle %d, after %s", cycle, f.name))
			t.Logf("cycle %d, %s: groups %d -> %d", cycle, f.name, before, c.emitted.Load())
		}
		landed, notLanded := resolutionLogs(logs)
		if landed > 0 && notLanded > 0 {
			break
		}
		require.Less(t, cycle, 4, "after %d cycles of faults: %d unknown outcomes resolved as landed, %d as not landed; want both",
			cycle, landed, notLanded)
	}
	c.finish(ctx, t, g, env.cli)

	unknown := metricSum(t, env.reg, "orchestrator_unknown_commit_outcomes_total")
	landed, notLanded := resolutionLogs(logs)
	t.Logf("groups: %d, unknown outcomes: %v (landed %d, not landed %d), conflicts: %v",
		c.emitted.Load(), unknown, landed, notLanded, metricSum(t, env.reg, "orchestrator_conflicts_total"))
	require.Positive(t, unknown, "no commit outcome was unknown: the resolution path was not exercised")
}

// TestLinearizableCounter records a history of the counter while commits
// are cut mid-flight, the link is cut, and the history is compacted during
// an outage: each increment with the value it wrote (from its emission to
// the Tick that saw it landed), each Tick's read of the counter (from the
// call of the worker's own last increment, which its snapshot must include,
// to the Tick), and linearizable reads by a direct client. porcupine must
// find the history linearizable for a counter.
func TestLinearizableCounter(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, ownServer(), withProxy())
	ctx := testContext(t)
	probe := newTxnProbe()
	c := newCounterWorld("/fault/linearizable", 4, true)
	g := startCounter(t, c, func(int) *clientv3.Client { return env.client(t, probe.dialOption()) },
		faultOptions(env.reg, faultLogger(t)), 3*time.Minute)
	g.run("direct reader", func(ctx context.Context) error {
		for ctx.Err() == nil && !c.stop.Load() {
			if err := c.directRead(ctx, env.cli); err != nil && ctx.Err() == nil {
				return err
			}
			time.Sleep(50 * time.Millisecond) // fault timing: a reader, not a busy loop
		}
		return nil
	})

	c.waitProgress(t, g, 10, "before the faults")
	faults := []struct {
		name   string
		inject func()
	}{
		{"request lost", func() { commitFaults[0].inject(t, env.proxy, probe) }},
		{"response lost", func() { commitFaults[1].inject(t, env.proxy, probe) }},
		{"cut", func() {
			env.proxy.Pause()
			time.Sleep(time.Second) // fault timing: the cut
			env.proxy.Resume()
		}},
		{"compaction during an outage", func() {
			env.proxy.Pause()
			for i := range 3 {
				_, err := env.cli.Put(ctx, fmt.Sprintf("%s/noise/%d", c.prefix, i), "x")
				require.NoError(t, err)
			}
			_, err := etcdtest.Compact(ctx, env.cli)
			require.NoError(t, err)
			env.proxy.Resume()
		}},
		{"response stalled", func() { commitFaults[3].inject(t, env.proxy, probe) }},
	}
	for _, f := range faults {
		f.inject()
		c.waitProgress(t, g, 5, "after "+f.name)
	}
	c.finish(ctx, t, g, env.cli)
	require.NoError(t, c.directRead(ctx, env.cli)) // the final value
	require.Positive(t, metricSum(t, env.reg, "orchestrator_reloads_total"))
	c.requireLinearizable(t)
}

// directRead records a linearizable read of /counter through cli.
func (c *counterWorld) directRead(ctx context.Context, cli *clientv3.Client) error {
	call := time.Now()
	resp, err := cli.Get(ctx, c.prefix+"/counter")
	ret := time.Now()
	if err != nil {
		return err
	}
	var v int64
	if len(resp.Kvs) == 1 {
		if v, err = strconv.ParseInt(string(resp.Kvs[0].Value), 10, 64); err != nil {
			return err
		}
	}
	c.recordOp(c.workers, false, call, ret, v)
	return nil
}

// requireLinearizable checks the recorded history with porcupine and, when
// it is not linearizable, writes a visualization next to the test's temp
// files.
func (c *counterWorld) requireLinearizable(t testing.TB) {
	t.Helper()
	c.mu.Lock()
	ops := append([]porcupine.Operation(nil), c.ops...)
	c.mu.Unlock()
	incs := 0
	for _, op := range ops {
		if op.Input.(counterInput).inc {
			incs++
		}
	}
	start := time.Now()
	res, info := porcupine.CheckOperationsVerbose(counterModel, ops, time.Minute)
	t.Logf("porcupine: %d operations (%d increments): %s in %v", len(ops), incs, res, time.Since(start))
	if res == porcupine.Illegal {
		path := filepath.Join(os.TempDir(), fmt.Sprintf("porcupine-%s-%d.html", strings.ReplaceAll(t.Name(), "/", "_"), time.Now().UnixNano()))
		if err := porcupine.VisualizePath(counterModel, info, path); err == nil {
			t.Logf("visualization: %s", path)
		}
	}
	require.Equal(t, porcupine.Ok, res, "the counter history is not linearizable")

	// The check has teeth: the same history with the last increment applied
	// twice (its output one too high) is rejected.
	last := -1
	for i, op := range ops {
		if op.Input.(counterInput).inc && (last < 0 || op.Output.(int64) > ops[last].Output.(int64)) {
			last = i
		}
	}
	require.GreaterOrEqual(t, last, 0)
	ops[last].Output = ops[last].Output.(int64) + 1
	require.Equal(t, porcupine.Illegal, porcupine.CheckOperationsTimeout(counterModel, ops, time.Minute),
		"porcupine accepted a history with a doubled increment")
}

// txnAction is what txnFaultInjector does with one Txn.
type txnAction int

const (
	txnPass       txnAction = iota // send it, return its answer
	txnDrop                        // do not send it, report the connection lost
	txnLoseAnswer                  // send it, then report the connection lost
)

// txnFaultInjector is a gRPC interceptor that applies scripted actions to
// the worker's commit Txns (more than one compare) and resolution Txns (one
// compare), in order; Txns beyond the script pass.
type txnFaultInjector struct {
	mu      sync.Mutex
	armed   bool
	commits []txnAction
	fences  []txnAction
	seen    []string
}

func (f *txnFaultInjector) arm(commits, fences []txnAction) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.armed, f.commits, f.fences = true, commits, fences
}

func (f *txnFaultInjector) next(req *etcdserverpb.TxnRequest) (string, txnAction) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.armed {
		return "", txnPass
	}
	kind, queue := "commit", &f.commits
	if _, ok := asCommitTxn(req); !ok {
		kind, queue = "fence", &f.fences
	}
	a := txnPass
	if len(*queue) > 0 {
		a, *queue = (*queue)[0], (*queue)[1:]
	}
	f.seen = append(f.seen, fmt.Sprintf("%s:%d", kind, a))
	return kind, a
}

func (f *txnFaultInjector) dialOption() grpc.DialOption {
	return grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any,
		cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption,
	) error {
		tr, ok := req.(*etcdserverpb.TxnRequest)
		if !ok {
			return invoker(ctx, method, req, reply, cc, opts...)
		}
		kind, a := f.next(tr)
		lost := status.Error(codes.Unavailable, "injected: connection lost during "+kind)
		switch a {
		case txnDrop:
			return lost
		case txnLoseAnswer:
			if err := invoker(ctx, method, req, reply, cc, opts...); err != nil {
				return err
			}
			return lost
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	})
}

// TestExactlyOnceScriptedUnknownOutcomes drives the resolution of an unknown
// commit outcome through each combination of a lost commit (never reached
// etcd, or landed with its answer lost) and lost resolution answers (the
// fence landed, or failed, and its answer was lost). In every case the
// group lands exactly once and Run goes on.
func TestExactlyOnceScriptedUnknownOutcomes(t *testing.T) {
	t.Parallel()
	scriptedUnknownOutcomes(t, newTestEnv(t))
}

// scriptedUnknownOutcomes runs TestExactlyOnceScriptedUnknownOutcomes
// against env's server.
func scriptedUnknownOutcomes(t *testing.T, env *testEnv) {
	direct := env.cli
	cases := []struct {
		name    string
		commits []txnAction
		fences  []txnAction
		landed  bool // the first run of the patch landed
	}{
		{name: "commit lost", commits: []txnAction{txnDrop}, landed: false},
		{name: "commit answer lost", commits: []txnAction{txnLoseAnswer}, landed: true},
		{name: "commit lost, fence answer lost", commits: []txnAction{txnDrop}, fences: []txnAction{txnLoseAnswer}, landed: false},
		{name: "commit answer lost, fence answer lost", commits: []txnAction{txnLoseAnswer}, fences: []txnAction{txnLoseAnswer}, landed: true},
		{name: "commit lost, fence lost twice", commits: []txnAction{txnDrop}, fences: []txnAction{txnDrop, txnLoseAnswer, txnDrop}, landed: false},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testContext(t)
			prefix := fmt.Sprintf("/fault/scripted-%d", i)
			inj := &txnFaultInjector{}
			cli := env.client(t, inj.dialOption())
			reg := prometheus.NewRegistry()
			lg, logs := observedLogger(t)
			var runs atomic.Int64
			ticks := 0
			reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
				st := s.(*mapState)
				ticks++
				switch ticks {
				case 1: // a commit that passes, so the worker has a token
					st.patches = append(st.patches, []DataPatch{incrPatch(st.key("/n"), 1)})
				case 2:
					inj.arm(tc.commits, tc.fences)
					st.patches = append(st.patches, []DataPatch{SingleDataPatch{Key: st.key("/n"), Func: func(old []byte) ([]byte, bool, error) {
						runs.Add(1)
						n := mustInt(t, old)
						return []byte(strconv.FormatInt(n+1, 10)), true, nil
					}}})
				default:
					return st, ErrReactorFinished
				}
				return st, nil
			})
			w := mustNewEtcdWorker(t, cli, prefix, reactor, newMapState(prefix), faultOptions(reg, lg)...)
			require.NoError(t, w.Run(ctx, nil, faultInterval, "scripted"))

			resp, err := direct.Get(ctx, prefix+"/n")
			require.NoError(t, err)
			require.Len(t, resp.Kvs, 1)
			require.Equal(t, "2", string(resp.Kvs[0].Value), "the group must land exactly once (Txns: %v)", inj.seen)
			require.Equal(t, 1.0, metricSum(t, reg, "orchestrator_unknown_commit_outcomes_total"))
			landed, notLanded := resolutionLogs(logs)
			if tc.landed {
				require.EqualValues(t, 1, runs.Load(), "a landed patch was re-run")
				require.Equal(t, [2]int{1, 0}, [2]int{landed, notLanded})
			} else {
				require.EqualValues(t, 2, runs.Load(), "a lost patch must be re-run once")
				require.Equal(t, [2]int{0, 1}, [2]int{landed, notLanded})
			}
		})
	}
}
