package orchestrator

// The fault-injection suite: real etcd behind fault-injecting proxies, many
// workers, and invariants that break if the worker loses, duplicates or
// tears anything. See also exactly_once_test.go, fencing_test.go and
// soak_test.go, which share the helpers defined here.

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

const (
	// faultRequestTimeout is the worker's request timeout in the fault
	// tests: short, so that lost requests are noticed quickly.
	faultRequestTimeout = time.Second
	// faultInterval is the workers' timer interval in the fault tests.
	faultInterval = 10 * time.Millisecond
	// faultProgressTimeout bounds every wait for the workers to make
	// progress after a fault.
	faultProgressTimeout = 30 * time.Second
)

// faultOptions are the worker options of the fault tests.
func faultOptions(reg prometheus.Registerer, lg *zap.Logger, more ...Option) []Option {
	return append([]Option{WithRequestTimeout(faultRequestTimeout), WithMetrics(reg), WithLogger(lg)}, more...)
}

// faultLogger returns a logger that shows warnings and errors in the test
// output when the test fails (or with -v); with FAULT_DEBUG set in the
// environment it shows debug logs too.
func faultLogger(t testing.TB) *zap.Logger {
	if os.Getenv("FAULT_DEBUG") != "" {
		return zaptest.NewLogger(t, zaptest.Level(zapcore.DebugLevel))
	}
	return zaptest.NewLogger(t, zaptest.Level(zapcore.WarnLevel))
}

// txnProbe reports the start of commit Txns sent by the clients it is
// installed in (as a gRPC interceptor): Txns with more than one compare,
// which the worker's resolution Txns never have.
type txnProbe struct{ c chan time.Time }

func newTxnProbe() *txnProbe { return &txnProbe{c: make(chan time.Time, 1)} }

func (p *txnProbe) dialOption() grpc.DialOption {
	return grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any,
		cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption,
	) error {
		if _, ok := asCommitTxn(req); ok {
			select {
			case p.c <- time.Now():
			default:
			}
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	})
}

// next drops earlier reports and returns the start time of the next commit
// Txn, failing the test if none starts within timeout.
func (p *txnProbe) next(t testing.TB, timeout time.Duration) time.Time {
	t.Helper()
	select {
	case <-p.c:
	default:
	}
	select {
	case at := <-p.c:
		return at
	case <-time.After(timeout):
		t.Fatalf("no commit Txn started within %v", timeout)
		return time.Time{}
	}
}

// sleepUntil sleeps until at (fault timing, not a wait for a condition).
func sleepUntil(at time.Time) { time.Sleep(time.Until(at)) }

// ---------------------------------------------------------------------------
// The bank: money moves between accounts, never created or destroyed, and
// the sum test's /sum == Σ /w/<i>. Every Tick checks both on its snapshot,
// and that the worker's own totals equal what it emitted (its commits all
// landed, once, and are visible).

type bankWorld struct {
	prefix   string
	accounts int
	workers  int
	tolerate bool // count violations and go on (soak) instead of failing Run

	stop       atomic.Bool // Tick finishes (ErrReactorFinished) once set
	emissions              // patch-group pairs
	violations violationRecorder
}

func newBankWorld(prefix string, workers, accounts int) *bankWorld {
	return &bankWorld{prefix: prefix, accounts: accounts, workers: workers, emissions: newEmissions(workers)}
}

func bankAccount(i int) string { return "/acct/" + strconv.Itoa(i) }
func bankTotal(i int) string   { return "/w/" + strconv.Itoa(i) }
func bankMoves(i int) string   { return "/transfers/" + strconv.Itoa(i) }
func bankDelta(i int) int64    { return int64(i + 1) }

// check verifies the invariants on values (rel key -> integer). counts are
// the groups each worker emitted; a negative entry skips that worker.
func (b *bankWorld) check(value func(rel string) int64, counts []int64) error {
	var money int64
	for i := range b.accounts {
		money += value(bankAccount(i))
	}
	if money != 0 {
		return fmt.Errorf("bank: Σ accounts = %d, want 0 (torn or partial commit)", money)
	}
	var sum int64
	for i := range b.workers {
		sum += value(bankTotal(i))
	}
	if got := value("/sum"); got != sum {
		return fmt.Errorf("bank: /sum = %d, Σ /w = %d (torn or partial commit)", got, sum)
	}
	for i, n := range counts {
		if n < 0 {
			continue
		}
		if got, want := value(bankTotal(i)), n*bankDelta(i); got != want {
			return fmt.Errorf("bank: worker %d: /w/%d = %d, want %d: a commit was lost, applied twice or is not visible", i, i, got, want)
		}
		if got := value(bankMoves(i)); got != n {
			return fmt.Errorf("bank: worker %d: %d transfers recorded, want %d", i, got, n)
		}
	}
	return nil
}

// newWorker returns bank worker id on cli.
func (b *bankWorld) newWorker(t testing.TB, cli *clientv3.Client, id int, opts ...Option) *EtcdWorker {
	t.Helper()
	state := newMapState(b.prefix)
	rng := rand.New(rand.NewPCG(uint64(id), uint64(time.Now().UnixNano())))
	var count int64
	own := make([]int64, b.workers)
	for i := range own {
		own[i] = -1
	}
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		own[id] = count
		if err := b.check(st.int, own); err != nil {
			b.violations.record(err)
			if !b.tolerate {
				return nil, err
			}
		}
		if b.stop.Load() {
			return st, ErrReactorFinished
		}
		from := rng.IntN(b.accounts)
		to := (from + 1 + rng.IntN(b.accounts-1)) % b.accounts
		amount := 1 + rng.Int64N(100)
		st.patches = append(st.patches,
			[]DataPatch{incrPatch(st.key(bankAccount(from)), -amount), incrPatch(st.key(bankAccount(to)), amount), incrPatch(st.key(bankMoves(id)), 1)},
			[]DataPatch{incrPatch(st.key(bankTotal(id)), bankDelta(id)), incrPatch(st.key("/sum"), bankDelta(id))},
		)
		count++
		b.emit(id, count)
		return st, nil
	})
	return mustNewEtcdWorker(t, cli, b.prefix, reactor, state, opts...)
}

// waitProgress waits until the workers emitted n more groups.
func (b *bankWorld) waitProgress(t testing.TB, g *workerGroup, n int64, what string) {
	t.Helper()
	waitGrown(t, g, &b.emitted, n, "bank progress "+what)
}

// finish stops the workers, requires that every Run returned nil, and checks
// the invariants and the exact totals on etcd's contents.
func (b *bankWorld) finish(t testing.TB, g *workerGroup, cli *clientv3.Client) {
	t.Helper()
	b.stop.Store(true)
	g.requireAllNil(t, faultProgressTimeout)
	b.violations.requireNone(t)
	b.requireEtcd(t, cli)
}

// requireEtcd checks the invariants and totals on etcd's contents.
func (b *bankWorld) requireEtcd(t testing.TB, cli *clientv3.Client) {
	t.Helper()
	ctx := contextWithin(t, 10*time.Second)
	require.NoError(t, b.checkEtcd(ctx, t, cli), "etcd's final contents")
	require.Positive(t, b.emitted.Load())
}

// checkEtcd checks the invariants and the exact totals on etcd's contents.
func (b *bankWorld) checkEtcd(ctx context.Context, t testing.TB, cli *clientv3.Client) error {
	t.Helper()
	kvs, _ := userKVs(ctx, t, cli, b.prefix, 0)
	counts := make([]int64, b.workers)
	for i := range counts {
		counts[i] = b.counts[i].Load()
	}
	return b.check(func(rel string) int64 {
		kv, ok := kvs[b.prefix+rel]
		if !ok {
			return 0
		}
		return mustInt(t, []byte(kv.value))
	}, counts)
}

// startBank starts b's workers, worker i on clients(i), with the fault
// options.
func startBank(t testing.TB, b *bankWorld, clients func(i int) *clientv3.Client, reg prometheus.Registerer,
	lg *zap.Logger, timeout time.Duration,
) *workerGroup {
	t.Helper()
	ws := make([]*EtcdWorker, b.workers)
	for i := range ws {
		ws[i] = b.newWorker(t, clients(i), i, faultOptions(reg, lg)...)
	}
	return startWorkerGroup(t, timeout, "bank", ws)
}

// TestFaultBankProxyCuts: six bank workers reach etcd through one proxy that
// is cut three times for 1-2s (see bankOutages).
func TestFaultBankProxyCuts(t *testing.T) {
	t.Parallel()
	bankOutages(t, newTestEnv(t, ownServer(), withProxy()), "/fault/bank-cuts", (*etcdtest.Proxy).Pause,
		time.Second, 1500*time.Millisecond, 2*time.Second)
}

// bankOutages runs six bank workers and an observer through env's proxy,
// and for each of outages applies fault to the proxy for that long, then
// resumes it. The workers must keep every invariant in every Tick, make
// progress after each outage and leave exact totals in etcd, and the
// observer's last Tick must see exactly what etcd holds.
func bankOutages(t *testing.T, env *testEnv, prefix string, fault func(*etcdtest.Proxy), outages ...time.Duration) {
	b := newBankWorld(prefix, 6, 8)
	g := startBank(t, b, func(int) *clientv3.Client { return env.client(t) }, env.reg, faultLogger(t), 3*time.Minute)
	snaps := newTickSnapshots()
	og := startWorkerGroup(t, 3*time.Minute, "observer", []*EtcdWorker{mustNewEtcdWorker(t, env.client(t), prefix,
		snaps.reactor(), newMapState(prefix), faultOptions(env.reg, faultLogger(t))...)})

	b.waitProgress(t, g, 20, "before the outages")
	for i, d := range outages {
		fault(env.proxy)
		time.Sleep(d) // the outage itself
		env.proxy.Resume()
		b.waitProgress(t, g, 20, fmt.Sprintf("after outage %d (%v)", i+1, d))
	}
	b.finish(t, g, env.cli)
	kvs, rev := userKVs(testContext(t), t, env.cli, prefix, 0)
	want := make(map[string]string, len(kvs))
	for k, kv := range kvs {
		want[k] = kv.value
	}
	waitWithin(t, faultProgressTimeout, fmt.Sprintf("the observer's state is etcd's at revision %d", rev), og.failed, func() bool {
		last, ok := snaps.last()
		return ok && maps.Equal(last.values, want)
	})
	require.ErrorIs(t, og.stop(t)["observer-0"], context.Canceled)
	require.Positive(t, metricSum(t, env.reg, "orchestrator_outages_total"), "the outages were not noticed")
	t.Logf("groups emitted: %d, conflicts: %v, unknown outcomes: %v", b.emitted.Load(),
		metricSum(t, env.reg, "orchestrator_conflicts_total"), metricSum(t, env.reg, "orchestrator_unknown_commit_outcomes_total"))
}

// TestFaultBankCompactionDuringOutage: while six bank workers are cut off,
// another client moves money, writes and deletes other keys and compacts
// past the workers' revision. After the outage every worker must reload
// (not exit) and go on with all invariants intact.
func TestFaultBankCompactionDuringOutage(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, ownServer(), withProxy())
	ctx := testContext(t)
	b := newBankWorld("/fault/bank-compact", 6, 8)
	g := startBank(t, b, func(int) *clientv3.Client { return env.client(t) }, env.reg, faultLogger(t), 3*time.Minute)

	b.waitProgress(t, g, 20, "before the outage")
	for cycle := range 2 {
		env.proxy.Pause()
		externalBankWrites(ctx, t, env.cli, b, cycle)
		_, err := etcdtest.Compact(ctx, env.cli)
		require.NoError(t, err)
		reloads := metricSum(t, env.reg, "orchestrator_reloads_total")
		env.proxy.Resume()
		waitWithin(t, faultProgressTimeout, "every worker reloads", g.failed, func() bool {
			return metricSum(t, env.reg, "orchestrator_reloads_total") >= reloads+float64(b.workers)
		})
		b.waitProgress(t, g, 20, fmt.Sprintf("after outage %d", cycle+1))
	}
	b.finish(t, g, env.cli)
	noise, _ := userKVs(ctx, t, env.cli, b.prefix+"/noise", 0)
	require.Len(t, noise, 2*2, "external keys")
}

// externalBankWrites moves money between two accounts in one CAS Txn and
// puts and deletes unrelated keys under the bank's prefix, through cli.
func externalBankWrites(ctx context.Context, t testing.TB, cli *clientv3.Client, b *bankWorld, cycle int) {
	t.Helper()
	for {
		a, c := b.prefix+bankAccount(0), b.prefix+bankAccount(1)
		resp, err := cli.Get(ctx, b.prefix+"/acct/", clientv3.WithPrefix())
		require.NoError(t, err)
		vals := map[string]*mvccKV{}
		for _, kv := range resp.Kvs {
			vals[string(kv.Key)] = &mvccKV{value: string(kv.Value), modRev: kv.ModRevision}
		}
		get := func(k string) (int64, int64) {
			if kv, ok := vals[k]; ok {
				return mustInt(t, []byte(kv.value)), kv.modRev
			}
			return 0, 0
		}
		va, ra := get(a)
		vc, rc := get(c)
		txn, err := cli.Txn(ctx).If(
			clientv3.Compare(clientv3.ModRevision(a), "=", ra),
			clientv3.Compare(clientv3.ModRevision(c), "=", rc),
		).Then(
			clientv3.OpPut(a, strconv.FormatInt(va-1000, 10)),
			clientv3.OpPut(c, strconv.FormatInt(vc+1000, 10)),
		).Commit()
		require.NoError(t, err)
		if txn.Succeeded {
			break
		}
	}
	for i := range 4 {
		_, err := cli.Put(ctx, fmt.Sprintf("%s/noise/%d-%d", b.prefix, cycle, i), "x")
		require.NoError(t, err)
	}
	_, err := cli.Delete(ctx, fmt.Sprintf("%s/noise/%d-0", b.prefix, cycle))
	require.NoError(t, err)
	_, err = cli.Put(ctx, fmt.Sprintf("%s/noise/%d-1", b.prefix, cycle), "")
	require.NoError(t, err)
	_, err = cli.Delete(ctx, fmt.Sprintf("%s/noise/%d-2", b.prefix, cycle))
	require.NoError(t, err)
}

// TestFaultBankLeaderRestart: six bank workers on a 3-node cluster (each
// member behind its proxy) while the leader is stopped and restarted,
// twice.
func TestFaultBankLeaderRestart(t *testing.T) {
	t.Parallel()
	c := etcdtest.NewCluster(t, 3)
	env := newTestEnv(t, onServer(c))
	b := newBankWorld("/fault/bank-leader", 6, 8)
	g := startBank(t, b, func(int) *clientv3.Client { return env.client(t) }, env.reg, faultLogger(t), 3*time.Minute)

	b.waitProgress(t, g, 20, "before the leader stops")
	for cycle := range 2 {
		lead := c.Leader(t)
		c.StopMember(t, lead)
		b.waitProgress(t, g, 20, fmt.Sprintf("cycle %d: after stopping leader m%d", cycle+1, lead))
		c.RestartMember(t, lead)
		b.waitProgress(t, g, 20, fmt.Sprintf("cycle %d: after restarting m%d", cycle+1, lead))
	}
	b.finish(t, g, env.cli)
}

// chainedBankOptions makes every flush of a bank worker (two groups of 3
// and 2 writes) a chain of two Txns.
func chainedBankOptions(env *testEnv, t testing.TB) []Option {
	return faultOptions(env.reg, faultLogger(t), WithTxnLimits(6, DefaultTxnMaxBytes))
}

// TestFaultBankQuorumLoss: bank workers whose flushes are chains of two
// Txns, on a 3-node cluster. Both followers stop, so the leader keeps
// proposals it cannot commit, which may land once the quorum is back, long
// after their requests timed out; then both restart at once; then the
// leader stops and restarts.
func TestFaultBankQuorumLoss(t *testing.T) {
	t.Parallel()
	c := etcdtest.NewCluster(t, 3)
	env := newTestEnv(t, onServer(c))
	b := newBankWorld("/fault/bank-quorum", 4, 6)
	ws := make([]*EtcdWorker, b.workers)
	for i := range ws {
		ws[i] = b.newWorker(t, env.client(t), i, chainedBankOptions(env, t)...)
	}
	g := startWorkerGroup(t, 2*time.Minute, "bank", ws)
	b.waitProgress(t, g, 20, "before the quorum is lost")

	lead := c.Leader(t)
	var followers []int
	for i := range c.Size() {
		if i != lead {
			followers = append(followers, i)
		}
	}
	for _, i := range followers {
		c.StopMember(t, i)
	}
	time.Sleep(2 * time.Second) // fault timing: the quorum stays lost
	c.RestartMembers(t, followers...)
	b.waitProgress(t, g, 20, "after the quorum is back")
	lead = c.Leader(t)
	c.StopMember(t, lead)
	b.waitProgress(t, g, 20, "after the leader stopped")
	c.RestartMember(t, lead)
	b.waitProgress(t, g, 20, "after the leader restarted")
	b.finish(t, g, env.cli)
}

// TestFaultBankLeaderMovesUnderChains: bank workers whose flushes are chains
// of two Txns, on a 3-node cluster whose leadership moves six times while
// they commit (proposals in flight at a move may be dropped).
func TestFaultBankLeaderMovesUnderChains(t *testing.T) {
	t.Parallel()
	c := etcdtest.NewCluster(t, 3)
	env := newTestEnv(t, onServer(c))
	b := newBankWorld("/fault/bank-move-leader", 3, 6)
	ws := make([]*EtcdWorker, b.workers)
	for i := range ws {
		ws[i] = b.newWorker(t, env.client(t), i, chainedBankOptions(env, t)...)
	}
	g := startWorkerGroup(t, 2*time.Minute, "bank", ws)
	b.waitProgress(t, g, 20, "before the moves")
	ctx := contextWithin(t, time.Minute)
	for n := range 6 {
		lead := c.Leader(t)
		lc := etcdtest.NewClient(t, c.Member(lead).Endpoint())
		_, err := lc.MoveLeader(ctx, c.Member((lead+1)%c.Size()).ID())
		require.NoError(t, err, "move %d", n+1)
		require.NoError(t, lc.Close())
		b.waitProgress(t, g, 10, fmt.Sprintf("after move %d", n+1))
	}
	b.finish(t, g, env.cli)
}

// ---------------------------------------------------------------------------
// Single-worker fault tests.

// putNumbered puts n keys prefix/k00.. with values v0..
func putNumbered(ctx context.Context, t testing.TB, cli *clientv3.Client, prefix string, n int) {
	t.Helper()
	for i := range n {
		mustPutKV(ctx, t, cli, fmt.Sprintf("%s/k%02d", prefix, i), "v"+strconv.Itoa(i))
	}
}

// TestFaultCompactionReloadMatchesEtcd: after an outage during which keys
// were put, changed, emptied and deleted and the history compacted, the first
// Tick after the reload sees exactly etcd's contents (deleted keys gone,
// empty values empty, reserved keys invisible).
func TestFaultCompactionReloadMatchesEtcd(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, ownServer(), withProxy())
	ctx := testContext(t)
	const prefix = "/fault/reload"
	putNumbered(ctx, t, env.cli, prefix, 10)
	state := newMapState(prefix)
	snaps := newTickSnapshots()
	wrote := false
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		snaps.add(st)
		if !wrote { // one commit, so the worker has a commit token and a delete counter
			wrote = true
			st.patches = append(st.patches, []DataPatch{setPatch(st.key("/own"), []byte("1")), deletePatch(st.key("/k09"))})
		}
		return st, nil
	})
	w := mustNewEtcdWorker(t, env.client(t), prefix, reactor, state, faultOptions(env.reg, faultLogger(t))...)
	g := newWorkerGroup(t, time.Minute)
	g.runWorker("reload", w)

	waitWithin(t, 10*time.Second, "first commit visible", g.failed, func() bool {
		last, ok := snaps.last()
		return ok && last.values[prefix+"/own"] == "1"
	})
	last, _ := snaps.last()
	requireStateEqualsEtcd(ctx, t, env.cli, prefix, last.values)

	env.proxy.Pause()
	ops := []clientv3.Op{
		clientv3.OpPut(prefix+"/k10", "new"),
		clientv3.OpPut(prefix+"/k01", "changed"),
		clientv3.OpDelete(prefix + "/k02"),
		clientv3.OpDelete(prefix + "/own"),
		clientv3.OpPut(prefix+"/k04", ""),
		clientv3.OpDelete(prefix + "/k05"),
	}
	for _, op := range ops {
		_, err := env.cli.Do(ctx, op)
		require.NoError(t, err)
	}
	_, err := env.cli.Put(ctx, prefix+"/k05", "again")
	require.NoError(t, err)
	_, err = env.cli.Delete(ctx, prefix+"/k06")
	require.NoError(t, err)
	_, err = etcdtest.Compact(ctx, env.cli)
	require.NoError(t, err)
	initsBefore := snaps.count()
	env.proxy.Resume()

	var after tickSnapshot
	waitWithin(t, faultProgressTimeout, "a Tick after the reload", g.failed, func() bool {
		s, ok := snaps.firstAfter(initsBefore)
		after = s
		return ok
	})
	require.Equal(t, 1.0, metricSum(t, env.reg, "orchestrator_reloads_total"))
	requireStateEqualsEtcd(ctx, t, env.cli, prefix, after.values)
	require.Contains(t, after.values, prefix+"/k04")
	require.NotNil(t, after.raw[prefix+"/k04"], "an empty value must arrive as a non-nil empty slice")
	require.ErrorIs(t, g.stop(t)["reload"], context.Canceled)
}

// TestFaultCompactionBetweenLoadPages: the history is compacted while the
// initial load is between pages (pinned at an older revision). The load
// starts over and the first Tick sees exactly etcd's contents. Pages are
// the read path of servers without a streaming range, so the worker's
// client answers RangeStream Unimplemented itself (compaction during a
// streamed read is TestReadRangeReturnsErrCompactedWhenTheRevisionIsCompactedDuringTheRead).
func TestFaultCompactionBetweenLoadPages(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, ownServer(), withProxy())
	ctx := testContext(t)
	const prefix = "/fault/paged"
	putNumbered(ctx, t, env.cli, prefix, 10)
	var hooked atomic.Int32
	// Pages: no RangeStream, and a receive limit the whole prefix exceeds.
	noStream := &rpcCounter{noStream: true}
	noStream.afterRange = func(n int) {
		if n != 2 || !hooked.CompareAndSwap(0, 1) {
			return
		}
		// Between the first and the second page: change the prefix and
		// compact past the load's pinned revision.
		_, err := env.cli.Delete(ctx, prefix+"/k07")
		if err == nil {
			_, err = env.cli.Put(ctx, prefix+"/k03", "changed")
		}
		if err == nil {
			_, err = env.cli.Put(ctx, prefix+"/k10", "new")
		}
		if err == nil {
			_, err = etcdtest.Compact(ctx, env.cli)
		}
		if err != nil {
			t.Error(err)
		}
	}
	snaps := newTickSnapshots()
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		snaps.add(s.(*mapState))
		return s, ErrReactorFinished
	})
	cfg := env.clientConfig(noStream.dialOptions()...)
	cfg.MaxCallRecvMsgSize = 256
	w := mustNewEtcdWorker(t, etcdtest.NewClientFromConfig(t, cfg), prefix, reactor, newMapState(prefix),
		faultOptions(env.reg, faultLogger(t), WithPageSize(2))...)
	require.NoError(t, w.Run(ctx, nil, faultInterval, "paged"))
	require.EqualValues(t, 1, hooked.Load())
	first, ok := snaps.last()
	require.True(t, ok)
	require.Equal(t, 1, snaps.count())
	requireStateEqualsEtcd(ctx, t, env.cli, prefix, first.values)
	require.NotContains(t, first.values, prefix+"/k07")
	require.Equal(t, "changed", first.values[prefix+"/k03"])
}

// tickSnapshot is the state one Tick saw: full keys to values.
type tickSnapshot struct {
	at     time.Time
	inits  int
	values map[string]string
	raw    map[string][]byte
}

// tickSnapshots records what each Tick saw.
type tickSnapshots struct {
	mu    sync.Mutex
	snaps []tickSnapshot
}

func newTickSnapshots() *tickSnapshots { return &tickSnapshots{} }

func (s *tickSnapshots) add(st *mapState) {
	snap := tickSnapshot{at: time.Now(), inits: st.inits, values: map[string]string{}, raw: map[string][]byte{}}
	for rel, v := range st.values {
		snap.values[st.prefix+rel] = string(v)
		snap.raw[st.prefix+rel] = v
	}
	s.mu.Lock()
	s.snaps = append(s.snaps, snap)
	s.mu.Unlock()
}

// reactor returns a Reactor that records every Tick's mapState in s.
func (s *tickSnapshots) reactor() Reactor {
	return ReactorFunc(func(_ context.Context, st ReactorState) (ReactorState, error) {
		s.add(st.(*mapState))
		return st, nil
	})
}

func (s *tickSnapshots) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.snaps)
}

func (s *tickSnapshots) last() (tickSnapshot, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.snaps) == 0 {
		return tickSnapshot{}, false
	}
	return s.snaps[len(s.snaps)-1], true
}

// firstAfter returns the first snapshot from index from on that saw more
// initial-load updates than the snapshot before index from: the first Tick
// after a reload.
func (s *tickSnapshots) firstAfter(from int) (tickSnapshot, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if from == 0 || from > len(s.snaps) {
		return tickSnapshot{}, false
	}
	base := s.snaps[from-1].inits
	for _, snap := range s.snaps[from:] {
		if snap.inits > base {
			return snap, true
		}
	}
	return tickSnapshot{}, false
}

// times returns the times of all Ticks.
func (s *tickSnapshots) times() []time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]time.Time, len(s.snaps))
	for i, snap := range s.snaps {
		out[i] = snap.at
	}
	return out
}

// requireStateEqualsEtcd requires that values (full key -> value) is exactly
// the set of user keys under prefix in etcd now.
func requireStateEqualsEtcd(ctx context.Context, t testing.TB, cli *clientv3.Client, prefix string, values map[string]string) {
	t.Helper()
	kvs, rev := userKVs(ctx, t, cli, prefix, 0)
	want := make(map[string]string, len(kvs))
	for k, kv := range kvs {
		want[k] = kv.value
	}
	require.Equal(t, want, values, "state vs etcd at revision %d", rev)
}

// TestFaultMaxOutage: with WithMaxOutage, a short cut is survived, and a
// blackhole longer than the cap ends Run with ErrEtcdUnavailable, not much
// later than the cap — for a worker that keeps writing and an idle one.
func TestFaultMaxOutage(t *testing.T) {
	t.Parallel()
	const maxOutage = 2 * time.Second
	for _, writing := range []bool{true, false} {
		name := map[bool]string{true: "writing", false: "idle"}[writing]
		t.Run(name, func(t *testing.T) {
			env := newTestEnv(t, ownServer(), withProxy())
			prefix := "/fault/outage-" + name
			var ticks atomic.Int64
			var ping atomic.Value // value of /ping the last Tick saw
			ping.Store("")
			state := newMapState(prefix)
			reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
				st := s.(*mapState)
				ticks.Add(1)
				ping.Store(string(st.values["/ping"]))
				if writing {
					st.patches = append(st.patches, []DataPatch{incrPatch(st.key("/n"), 1)})
				}
				return st, nil
			})
			w := mustNewEtcdWorker(t, env.client(t), prefix, reactor, state,
				faultOptions(env.reg, faultLogger(t), WithMaxOutage(maxOutage), WithRequestTimeout(500*time.Millisecond))...)
			g := newWorkerGroup(t, time.Minute)
			g.run("worker", func(ctx context.Context) error { return w.Run(ctx, nil, 20*time.Millisecond, name) })

			waitTicks := func(n int64, what string) {
				waitGrown(t, g, &ticks, n, what)
			}
			waitTicks(5, "ticks before the faults")
			// Shorter than the cap: survived.
			env.proxy.Pause()
			time.Sleep(maxOutage / 3) // fault timing: a cut shorter than the cap
			env.proxy.Resume()
			waitTicks(5, "ticks after a short cut")
			// The worker hears from etcd again (its watch delivers a put)
			// before the long outage starts.
			_, err := env.cli.Put(testContext(t), prefix+"/ping", "after the cut")
			require.NoError(t, err)
			waitWithin(t, faultProgressTimeout, "the worker sees a put", g.failed, func() bool {
				return ping.Load() == "after the cut"
			})

			start := time.Now()
			env.proxy.Blackhole()
			defer env.proxy.Resume()
			results := g.wait(t, maxOutage+10*time.Second)
			took := time.Since(start)
			require.ErrorIs(t, results["worker"], ErrEtcdUnavailable)
			// The last contact may be up to one progress interval (cap/4)
			// before the blackhole.
			require.GreaterOrEqual(t, took, maxOutage*3/4-100*time.Millisecond, "gave up before the cap")
			require.Less(t, took, maxOutage+3*time.Second, "gave up too late")
			t.Logf("Run returned %v after %v", results["worker"], took)
		})
	}
}

// TestFaultStalenessStopsIdleTicks: while the worker is cut off for longer
// than WithMaxStaleness, its idle timer Ticks stop (the state cannot be
// shown as current); they resume after the cut.
func TestFaultStalenessStopsIdleTicks(t *testing.T) {
	t.Parallel()
	const (
		maxStaleness = 500 * time.Millisecond
		interval     = 50 * time.Millisecond
		cut          = 2 * time.Second
	)
	env := newTestEnv(t, ownServer(), withProxy())
	const prefix = "/fault/stale"
	snaps := newTickSnapshots()
	reactor := snaps.reactor()
	w := mustNewEtcdWorker(t, env.client(t), prefix, reactor, newMapState(prefix),
		faultOptions(env.reg, faultLogger(t), WithMaxStaleness(maxStaleness))...)
	g := newWorkerGroup(t, time.Minute)
	g.run("worker", func(ctx context.Context) error { return w.Run(ctx, nil, interval, "stale") })

	waitWithin(t, 10*time.Second, "idle ticks", g.failed, func() bool { return snaps.count() >= 5 })
	cutAt := time.Now()
	env.proxy.Pause()
	time.Sleep(cut) // fault timing: the cut
	resumeAt := time.Now()
	env.proxy.Resume()
	waitWithin(t, faultProgressTimeout, "ticks after the cut", g.failed, func() bool {
		ts := snaps.times()
		return ts[len(ts)-1].After(resumeAt)
	})

	// The newest proof of freshness is at most a little older than the cut
	// (a response already on its way); leave room for scheduling.
	quietFrom := cutAt.Add(maxStaleness + 250*time.Millisecond)
	var during []time.Duration
	ticksBeforeCut := 0
	for _, at := range snaps.times() {
		if at.After(quietFrom) && at.Before(resumeAt) {
			during = append(during, at.Sub(cutAt))
		}
		if at.Before(cutAt) {
			ticksBeforeCut++
		}
	}
	require.Empty(t, during, "Ticks on a stale state (offsets from the cut)")
	require.GreaterOrEqual(t, ticksBeforeCut, 5)
	require.ErrorIs(t, g.stop(t)["worker"], context.Canceled)
}

// shutdownCase is one case of TestFaultShutdownDuringCommit.
type shutdownCase struct {
	name       string
	blackhole  bool          // stall the link after the cancel
	resume     time.Duration // resume the link this long after the cancel (0: never)
	unresolved bool
}

// shutdownCases returns the cases of TestFaultShutdownDuringCommit.
func shutdownCases() []shutdownCase {
	return []shutdownCase{
		{name: "in flight"},
		{name: "blackholed then resumed", blackhole: true, resume: 1500 * time.Millisecond},
		{name: "blackholed for good", blackhole: true, unresolved: true},
	}
}

// TestFaultShutdownDuringCommit: ctx is cancelled while a commit Txn is in
// flight. Run returns an error matching context.Canceled only once it knows
// the commit's outcome (so every commit it counted is in etcd and vice
// versa); if etcd stays unreachable for the shutdown timeout, the error also
// matches ErrCommitUnresolved.
func TestFaultShutdownDuringCommit(t *testing.T) {
	t.Parallel()
	const delay = 300 * time.Millisecond
	cases := shutdownCases()
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			env := newTestEnv(t, ownServer(), withProxy())
			ctx := testContext(t)
			prefix := fmt.Sprintf("/fault/shutdown-%d", i)
			probe := newTxnProbe()
			var emitted atomic.Int64
			reactor := counterReactor(&emitted)
			const shutdownTimeout = 2 * time.Second
			w := mustNewEtcdWorker(t, env.client(t, probe.dialOption()), prefix, reactor, newMapState(prefix),
				faultOptions(env.reg, faultLogger(t), WithShutdownTimeout(shutdownTimeout))...)
			runCtx, cancel := context.WithCancel(ctx)
			defer cancel()
			done := runAsync(runCtx, w, nil, faultInterval, "shutdown")
			waitWithin(t, 10*time.Second, "commits", nil, func() bool { return emitted.Load() >= 5 })

			env.proxy.SetDelay(delay)
			t0 := probe.next(t, 10*time.Second)
			if tc.blackhole {
				sleepUntil(t0.Add(delay / 2)) // the request is on its way
				env.proxy.Blackhole()
				defer env.proxy.Resume()
			} else {
				sleepUntil(t0.Add(delay / 2))
			}
			cancelAt := time.Now()
			cancel()
			if tc.resume > 0 {
				time.Sleep(tc.resume) // fault timing: the outage after the cancel
				env.proxy.SetDelay(0)
				env.proxy.Resume()
			}
			runErr := recvErr(contextWithin(t, 2*faultRequestTimeout+shutdownTimeout+5*time.Second), t, done)
			took := time.Since(cancelAt)
			t.Logf("Run returned after %v: %v", took, runErr)
			require.ErrorIs(t, runErr, context.Canceled)
			env.proxy.SetDelay(0)
			env.proxy.Resume()
			if tc.unresolved {
				require.ErrorIs(t, runErr, ErrCommitUnresolved)
				require.GreaterOrEqual(t, took, shutdownTimeout, "gave up resolving before the shutdown timeout")
				// The shutdown timeout counts from the cancel: neither the
				// commit in flight then nor a fence sent just before the
				// limit gets a whole request timeout on top.
				require.Less(t, took, shutdownTimeout+600*time.Millisecond, "went on resolving after the shutdown timeout")
				return
			}
			require.NotErrorIs(t, runErr, ErrCommitUnresolved)
			if !tc.blackhole {
				require.GreaterOrEqual(t, took, delay, "returned before the in-flight commit's answer could arrive")
			}
			// The worker knew the in-flight commit's outcome: what it counted
			// as landed is exactly what etcd has.
			landed := int64(metricSum(t, env.reg, "orchestrator_patch_groups_applied_total"))
			kvs, _ := userKVs(ctx, t, env.cli, prefix, 0)
			require.Equal(t, strconv.FormatInt(landed, 10), kvs[prefix+"/n"].value,
				"Run returned before it knew the in-flight commit's outcome")
			if !tc.blackhole {
				// The Txn ran to its end although ctx was cancelled: it landed.
				require.Equal(t, emitted.Load(), landed)
			}
		})
	}
}

// TestFaultSlowTickWarns: a Tick slower than a second is logged as a
// warning; the worker goes on.
func TestFaultSlowTickWarns(t *testing.T) {
	t.Parallel()
	core, logs := observer.New(zapcore.WarnLevel)
	const prefix = "/fault/slow"
	n := 0
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		n++
		if n == 1 {
			time.Sleep(slowTickThreshold + 100*time.Millisecond) // the slow user code
			return s, nil
		}
		return s, ErrReactorFinished
	})
	w := mustNewEtcdWorker(t, sharedClient(t), prefix, reactor, newMapState(prefix), WithLogger(zap.New(core)))
	require.NoError(t, w.Run(testContext(t), nil, faultInterval, "slow"))
	slow := logs.FilterMessage("reactor Tick is slow").All()
	require.Len(t, slow, 1)
	require.Equal(t, zapcore.WarnLevel, slow[0].Level)
	require.Equal(t, "slow", slow[0].ContextMap()["role"])
}

// TestFaultPatchPanicAfterUnknownOutcome: a commit's outcome is unknown (the
// link is cut while it is in flight) and, when the worker re-runs the patch
// after the resolution, the patch panics. Run returns an ErrPanic error and
// the panicking re-run wrote nothing.
func TestFaultPatchPanicAfterUnknownOutcome(t *testing.T) {
	t.Parallel()
	const delay = 200 * time.Millisecond
	env := newTestEnv(t, ownServer(), withProxy())
	ctx := testContext(t)
	const prefix = "/fault/patch-panic"
	probe := newTxnProbe()
	var runs atomic.Int64
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		if _, ok := st.values["/p"]; ok {
			return st, errors.New("the first run of the patch landed; the test needs it lost")
		}
		st.patches = append(st.patches, []DataPatch{SingleDataPatch{Key: st.key("/p"), Func: func([]byte) ([]byte, bool, error) {
			if runs.Add(1) > 1 {
				panic("patch re-run after an unknown outcome")
			}
			return []byte("1"), true, nil
		}}})
		return st, nil
	})
	w, err := NewEtcdWorker(env.client(t, probe.dialOption()), prefix, reactor, newMapState(prefix),
		faultOptions(env.reg, faultLogger(t))...)
	require.NoError(t, err)
	env.proxy.SetDelay(delay)
	done := runAsync(ctx, w, nil, faultInterval, "patch-panic")
	t0 := probe.next(t, 20*time.Second)
	sleepUntil(t0.Add(delay / 2)) // the request is still in the proxy
	env.proxy.Pause()
	env.proxy.SetDelay(0)
	time.Sleep(300 * time.Millisecond) // fault timing: the cut
	env.proxy.Resume()
	err = recvErr(contextWithin(t, 20*time.Second), t, done)
	require.ErrorIs(t, err, ErrPanic)
	require.EqualValues(t, 2, runs.Load())
	require.Equal(t, 1.0, metricSum(t, env.reg, "orchestrator_unknown_commit_outcomes_total"))
	kvs, _ := userKVs(ctx, t, env.cli, prefix, 0)
	require.Empty(t, kvs)
}

// TestFaultIdleWorkerStaysFresh: in an etcd where nothing is written, a
// worker's watch waits at the store revision + 1, and etcd sends no progress
// notifications to such a watch (mvcc progressIfSync skips watchers whose
// start revision is ahead of the store). The worker must still prove its
// state current and etcd reachable: idle timer Ticks go on past
// WithMaxStaleness, WithMaxOutage does not fire, also after the connection
// was cut and restored (clientv3 resumes the watch at the last revision +
// 1).
func TestFaultIdleWorkerStaysFresh(t *testing.T) {
	t.Parallel()
	const (
		maxStaleness = 300 * time.Millisecond
		maxOutage    = 2 * time.Second
		interval     = 20 * time.Millisecond
		// maxGap is the longest pause between Ticks accepted (slow requests
		// on a loaded machine may cost a staleness period or two); without
		// a proof of freshness Ticks stop for good.
		maxGap = 3 * maxStaleness
	)
	env := newTestEnv(t, ownServer(), withProxy())
	const prefix = "/fault/idle"
	snaps := newTickSnapshots()
	reactor := snaps.reactor()
	w := mustNewEtcdWorker(t, env.client(t), prefix, reactor, newMapState(prefix),
		faultOptions(env.reg, faultLogger(t), WithMaxStaleness(maxStaleness), WithMaxOutage(maxOutage))...)
	g := newWorkerGroup(t, time.Minute)
	g.run("worker", func(ctx context.Context) error { return w.Run(ctx, nil, interval, "idle") })

	// requireTicking waits for d and requires Ticks all along it.
	requireTicking := func(d time.Duration, what string) {
		t.Helper()
		from := time.Now()
		time.Sleep(d) // the observation window
		require.NoError(t, g.failed(), what)
		prev := from
		for _, at := range snaps.times() {
			if at.Before(from) {
				continue
			}
			require.Less(t, at.Sub(prev), maxGap, "%s: no Tick for a while before %v", what, at.Sub(from))
			prev = at
		}
		require.Less(t, time.Since(prev), maxGap, "%s: Ticks stopped %v after the start", what, prev.Sub(from))
	}
	requireTicking(maxOutage+500*time.Millisecond, "idle etcd")

	env.proxy.Pause()
	time.Sleep(maxOutage / 2) // fault timing: the cut
	env.proxy.Resume()
	waitWithin(t, 10*time.Second, "ticks after the cut", g.failed, func() bool {
		ts := snaps.times()
		return time.Since(ts[len(ts)-1]) < interval*5
	})
	requireTicking(maxOutage+500*time.Millisecond, "idle etcd after a cut")
	require.ErrorIs(t, g.stop(t)["worker"], context.Canceled)
}
