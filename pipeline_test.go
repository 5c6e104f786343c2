package orchestrator

// Pipelined commits and conflicts that re-run at once: the Txns of one
// flush are in flight together, land in the order of their groups, never
// after an earlier one failed, and exactly once through unknown outcomes in
// the middle of a chain; a conflict re-runs on the values its Txn read back.

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/util"
)

// chainGate is a gRPC interceptor that, once armed with n, holds the
// worker's commit Txns (more than one compare; fences have one) until n are
// held at once: proof that the worker sent them before the first answered.
// The test then releases them one at a time, in chain order (by the token
// value each writes), each with a txnAction, and sees its answer. Txns
// beyond the n pass.
type chainGate struct {
	mu   sync.Mutex
	want int
	held []*gatedTxn
	full chan struct{}
	stop chan struct{} // closed at cleanup: held Txns fail
}

// gatedTxn is one held commit Txn.
type gatedTxn struct {
	value uint64 // the token value it writes: its place in the chain
	act   chan txnAction
	done  chan gateResult
}

// gateResult is what became of a released Txn: what etcd answered
// (succeeded, for txnPass and txnLoseAnswer) and what the worker was told.
type gateResult struct {
	succeeded bool
	err       error
}

func newChainGate(t testing.TB) *chainGate {
	g := &chainGate{full: make(chan struct{}), stop: make(chan struct{})}
	t.Cleanup(func() { close(g.stop) })
	return g
}

// arm makes the gate hold the next n commit Txns; call it once, before the
// worker runs.
func (g *chainGate) arm(n int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.want = n
}

func (g *chainGate) hold(req *etcdserverpb.TxnRequest) *gatedTxn {
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.held) >= g.want {
		return nil
	}
	h := &gatedTxn{value: tokenValueOf(req), act: make(chan txnAction, 1), done: make(chan gateResult, 1)}
	g.held = append(g.held, h)
	if len(g.held) == g.want {
		close(g.full)
	}
	return h
}

func (g *chainGate) dialOption() grpc.DialOption {
	return grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any,
		cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption,
	) error {
		tr, ok := asCommitTxn(req)
		if !ok {
			return invoker(ctx, method, req, reply, cc, opts...)
		}
		h := g.hold(tr)
		if h == nil {
			return invoker(ctx, method, req, reply, cc, opts...)
		}
		var a txnAction
		select {
		case a = <-h.act:
		case <-ctx.Done():
			return ctx.Err()
		case <-g.stop:
			return status.Error(codes.Unavailable, "injected: test over")
		}
		var res gateResult
		if a == txnDrop {
			res.err = status.Error(codes.Unavailable, "injected: commit lost")
		} else {
			res.err = invoker(ctx, method, req, reply, cc, opts...)
			if resp, ok := reply.(*etcdserverpb.TxnResponse); ok && res.err == nil {
				res.succeeded = resp.Succeeded
			}
			if res.err == nil && a == txnLoseAnswer {
				res.err = status.Error(codes.Unavailable, "injected: answer lost")
			}
		}
		h.done <- res
		return res.err
	})
}

// tokenValueOf returns the commit token value a commit Txn writes: the
// value of its put under a commit tokens' directory (keysOf("").tokenKey("")
// is that directory's name below any prefix).
func tokenValueOf(req *etcdserverpb.TxnRequest) uint64 {
	tokenDir := keysOf("").tokenKey("")
	for _, op := range req.Success {
		if put := op.GetRequestPut(); put != nil && strings.Contains(string(put.Key), tokenDir) {
			v, _ := strconv.ParseUint(string(put.Value), 10, 64)
			return v
		}
	}
	return 0
}

// awaitFull waits until the gate holds its n Txns and returns them in chain
// order.
func (g *chainGate) awaitFull(ctx context.Context, t testing.TB) []*gatedTxn {
	t.Helper()
	g.mu.Lock()
	full, n := g.full, g.want
	g.mu.Unlock()
	select {
	case <-full:
	case <-ctx.Done():
		g.mu.Lock()
		got := len(g.held)
		g.mu.Unlock()
		t.Fatalf("the worker never had %d commit Txns in flight at once (%d held by then): %v", n, got, ctx.Err())
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	held := slices.Clone(g.held)
	slices.SortFunc(held, func(a, b *gatedTxn) int { return int(a.value) - int(b.value) })
	return held
}

// release lets h go with action a and returns what became of it.
func (h *gatedTxn) release(ctx context.Context, t testing.TB, a txnAction) gateResult {
	t.Helper()
	h.act <- a
	return h.result(ctx, t)
}

func (h *gatedTxn) result(ctx context.Context, t testing.TB) gateResult {
	t.Helper()
	select {
	case r := <-h.done:
		return r
	case <-ctx.Done():
		t.Fatalf("a released commit Txn never returned: %v", ctx.Err())
		return gateResult{}
	}
}

// chainGroups is how many groups (one Txn each: see holdChain) the chain
// tests commit in one flush: as many as the default pipeline depth.
const chainGroups = DefaultPipelineDepth

func chainKey(i int, part string) string { return fmt.Sprintf("/g%d/%s", i, part) }

// releaseFrom lets the held Txns from the i-th on go, one by one, and
// requires that each is answered, and lands if and only if landed (why
// says what the Txns are).
func (c *heldChain) releaseFrom(ctx context.Context, t testing.TB, i int, landed bool, why string) {
	t.Helper()
	for j, h := range c.links[i:] {
		res := h.release(ctx, t, txnPass)
		require.NoError(t, res.err, "Txn %d", i+j)
		require.Equal(t, landed, res.succeeded, "Txn %d %s: landed", i+j, why)
	}
}

// finish waits until Run returns nil, and requires the chain to have landed
// in order, with group i's increment at want[i] (requireLinksLanded).
func (c *heldChain) finish(ctx context.Context, t testing.TB, cli *clientv3.Client, prefix string, want [chainGroups]int64) {
	t.Helper()
	require.NoError(t, recvErr(ctx, t, c.done))
	requireLinksLanded(ctx, t, cli, prefix, want[:])
}

// TestPipelineTxnBehindAFailedOneNeverLands: the worker sends the Txns of
// one flush before the first answers (the gate holds chainGroups of them at
// once). Another client changes a key of the first group, so the first Txn
// conflicts; the Txns behind it reach etcd afterwards, one by one, and must
// all fail: a group never lands when an earlier group of its flush did not.
// The groups then re-run (the first on the other client's value) and land
// once each, in order.
func TestPipelineTxnBehindAFailedOneNeverLands(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := testContext(t)
	const prefix = "/test/pipeline/behind-failed"
	c := holdChain(ctx, t, env, prefix, chainSetup{opts: []Option{WithMetrics(env.reg)}})
	mustPutKV(ctx, t, env.cli, prefix+chainKey(0, "a"), "10")
	c.releaseFrom(ctx, t, 0, false, "of a chain whose Txn 0 conflicted")
	c.finish(ctx, t, env.cli, prefix, [chainGroups]int64{11, 1, 1, 1})
	require.Equal(t, []int64{2, 2, 2, 2}, loadRuns(c.runs), "each group runs once, then once more after the conflict")
	require.GreaterOrEqual(t, metricSum(t, env.reg, "orchestrator_conflicts_total"), 1.0)
}

// TestPipelineUnknownOutcomeMidChain: of a chain of chainGroups Txns in
// flight, the second one's outcome is unknown: its request is lost, or it
// landed and its answer is lost. The Txns behind it reach etcd and fail (it
// never landed) or land (it did). The worker resolves the outcome (a fence,
// or the answers behind it), and every group lands exactly once, in order.
func TestPipelineUnknownOutcomeMidChain(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	for i, tc := range []struct {
		name   string
		second txnAction
		landed bool
	}{
		{"request lost", txnDrop, false},
		{"answer lost", txnLoseAnswer, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testContext(t)
			prefix := fmt.Sprintf("/test/pipeline/unknown-%d", i)
			reg := prometheus.NewRegistry()
			lg, logs := observedLogger(t)
			c := holdChain(ctx, t, env, prefix, chainSetup{opts: []Option{WithMetrics(reg), WithLogger(lg)}})
			first := c.links[0].release(ctx, t, txnPass)
			require.NoError(t, first.err)
			require.True(t, first.succeeded)
			require.Error(t, c.links[1].release(ctx, t, tc.second).err)
			c.releaseFrom(ctx, t, 2, tc.landed, "behind the unknown one")
			c.finish(ctx, t, env.cli, prefix, [chainGroups]int64{1, 1, 1, 1})
			require.Equal(t, 1.0, metricSum(t, reg, "orchestrator_unknown_commit_outcomes_total"))
			landed, notLanded := resolutionLogs(logs)
			if tc.landed {
				require.Equal(t, [2]int{1, 0}, [2]int{landed, notLanded})
				require.Equal(t, []int64{1, 1, 1, 1}, loadRuns(c.runs), "a landed group was re-run")
			} else {
				require.Equal(t, [2]int{0, 1}, [2]int{landed, notLanded})
				require.Equal(t, []int64{1, 2, 2, 2}, loadRuns(c.runs), "the groups from the lost Txn on re-run once")
			}
		})
	}
}

// TestPipelineProxyDropsTheSecondAnswer: four Txns of a chain are in flight
// through the fault proxy. The first is answered; the second reaches etcd
// and lands (a direct watch sees it), and the proxy cuts the link while its
// answer is still in the proxy's delay line, so the worker never gets it.
// The third and fourth go out once the link is back and land behind it.
// The second's outcome is resolved as landed, and every group lands once,
// in order.
func TestPipelineProxyDropsTheSecondAnswer(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, withProxy())
	ctx := testContext(t)
	const prefix = "/test/pipeline/proxy-drop"
	lg, logs := observedLogger(t)
	c := holdChain(ctx, t, env, prefix, chainSetup{opts: []Option{WithMetrics(env.reg), WithLogger(lg)}})
	held := c.links
	first := held[0].release(ctx, t, txnPass)
	require.NoError(t, first.err)
	require.True(t, first.succeeded)

	wctx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	second := env.cli.Watch(wctx, prefix+chainKey(1, "b"), clientv3.WithRev(headRevision(ctx, t, env.cli)+1))
	env.proxy.SetDelay(300 * time.Millisecond)
	held[1].act <- txnPass
	select {
	case resp := <-second:
		require.NoError(t, resp.Err())
		require.NotEmpty(t, resp.Events, "the second Txn never landed")
	case <-ctx.Done():
		t.Fatal(ctx.Err())
	}
	env.proxy.Pause() // its answer is still in the delay line
	require.Error(t, held[1].result(ctx, t).err, "the second Txn's answer reached the worker")
	env.proxy.SetDelay(0)
	env.proxy.Resume()
	c.releaseFrom(ctx, t, 2, true, "behind the landed one")
	c.finish(ctx, t, env.cli, prefix, [chainGroups]int64{1, 1, 1, 1})
	require.Equal(t, []int64{1, 1, 1, 1}, loadRuns(c.runs), "a landed group was re-run")
	require.Equal(t, 1.0, metricSum(t, env.reg, "orchestrator_unknown_commit_outcomes_total"))
	landed, notLanded := resolutionLogs(logs)
	require.Equal(t, [2]int{1, 0}, [2]int{landed, notLanded})
}

// TestPipelineDepthOneSendsOneTxnAtATime: with WithPipelineDepth(1) the
// worker never has two commit Txns in flight; the chain still lands in order.
func TestPipelineDepthOneSendsOneTxnAtATime(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := testContext(t)
	const prefix = "/test/pipeline/depth-one"
	flight := &txnFlight{}
	count := flight.dialOption()
	runs := make([]atomic.Int64, chainGroups)
	w := mustNewEtcdWorker(t, env.client(t, count), prefix,
		chainReactor(false, nil, linkGroups(chainGroups, runs), stateHolds(chainGroups)), newMapState(prefix),
		WithTxnLimits(4, DefaultTxnMaxBytes), WithPipelineDepth(1))
	require.NoError(t, w.Run(ctx, nil, behaviourTick, "depth-one"))
	requireLinksLanded(ctx, t, env.cli, prefix, []int64{1, 1, 1, 1})
	require.Equal(t, 1, flight.max())
}

// stalledConflict is a conflict test: a worker on prefix whose Source
// follows the prefix through env's proxy, committing through env.cli, and
// the write of another client that makes its commit conflict.
type stalledConflict struct {
	env              *testEnv
	prefix           string
	entered, release chan struct{} // the reactor's patch is blocked / may go on
}

func newStalledConflict(t *testing.T, prefix string) *stalledConflict {
	t.Helper()
	return &stalledConflict{env: newTestEnv(t, withProxy()), prefix: prefix,
		entered: make(chan struct{}), release: make(chan struct{})}
}

// run runs the worker with reactor. Once the patch is blocked (entered), it
// stalls the Source's watch, puts key = value through env.cli (the pending
// commit conflicts), lets the patch go on (release) and waits, the watch
// still stalled, until what says etcd's keys under the prefix hold the
// outcome (landed); then it lets the watch through and requires Run to
// return nil.
func (c *stalledConflict) run(ctx context.Context, t *testing.T, reactor Reactor, key, value, what string,
	landed func(keys map[string]string) bool, opts ...Option,
) {
	t.Helper()
	env := c.env
	src, err := NewSource(env.client(t), c.prefix)
	require.NoError(t, err)
	opts = append([]Option{WithSource(src), WithMetrics(env.reg)}, opts...)
	w := mustNewEtcdWorker(t, env.cli, c.prefix, reactor, newRecordingState(c.prefix), opts...)
	done := runAsync(ctx, w, nil, behaviourTick, "at-once")

	awaitSignal(ctx, t, c.entered, "the worker never ran its patch")
	env.proxy.Blackhole() // the Source sees nothing from now on
	mustPutKV(ctx, t, env.cli, c.prefix+key, value)
	close(c.release)
	stalled, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	waitUntil(stalled, t, what+" while the watch is stalled", func() bool {
		return landed(etcdSnapshot(ctx, t, env.cli, c.prefix))
	})
	env.proxy.Resume()
	require.NoError(t, recvErr(ctx, t, done))
}

// TestConflictRerunsAtOnceWithoutTheWatch: the worker's Source follows the
// prefix through a proxy that stalls after the first load, so no change
// reaches the worker's state; the worker commits through its own client.
// Another client changes the key a pending increment read, the Txn
// conflicts, and the increment re-runs at once on the value the Txn's Else
// read back, and lands, while the state still lacks that value. Only the
// next Tick waits for the state (the barrier): it runs once the proxy lets
// the watch through again.
func TestConflictRerunsAtOnceWithoutTheWatch(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	c := newStalledConflict(t, "/test/conflict/at-once")
	mustPutKV(ctx, t, c.env.cli, c.prefix+"/n", "0")

	var seen, stateSaw []string
	reactor := newStepReactor(
		when(func(st *recordingState) bool { return st.has("/n", "0") }, func(_ context.Context, st *recordingState) error {
			inc := incrPatch(st.key("/n"), 1).(SingleDataPatch)
			st.group(SingleDataPatch{Key: inc.Key, Func: func(old []byte) ([]byte, bool, error) {
				seen = append(seen, string(old))
				stateSaw = append(stateSaw, stringValues(st.values)["/n"])
				if len(seen) == 1 {
					close(c.entered)
					if err := blockUntil(ctx, c.release); err != nil {
						return nil, false, err
					}
				}
				return inc.Func(old)
			}})
			return nil
		}),
		when(func(st *recordingState) bool { return st.has("/n", "11") }, nil),
	)
	c.run(ctx, t, reactor, "/n", "10", "the conflict to re-run and land",
		func(keys map[string]string) bool { return keys["/n"] == "11" })

	require.Equal(t, []string{"0", "10"}, seen, "the re-run must see the other client's value")
	require.Equal(t, []string{"0", "0"}, stateSaw, "the re-run did not wait for the state")
	require.Equal(t, 1.0, metricSum(t, c.env.reg, "orchestrator_conflicts_total"))
}

// TestConflictRerunAtOnceSeesWhatEarlierTxnsWrote: one flush of three Txns
// (two keys at most each). The first lands; the second conflicts on a key
// another client changed; the third, which rewrites a key the first wrote,
// may go out only once the first answered, and fails behind the second. The
// worker's Source is stalled, so its state has neither the first Txn nor
// the other client's write. The remaining groups re-run at once: on the
// value the second Txn's Else read back, and on what the first Txn wrote,
// so the third group's patch runs once more only, not twice (a re-run on
// the stale state would conflict again).
func TestConflictRerunAtOnceSeesWhatEarlierTxnsWrote(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	c := newStalledConflict(t, "/test/conflict/at-once-chain")

	var aRuns int
	reactor := newStepReactor(
		when(always, func(_ context.Context, st *recordingState) error {
			incrA := incrPatch(st.key("/a"), 1).(SingleDataPatch)
			incrY := incrPatch(st.key("/y"), 1).(SingleDataPatch)
			first := true
			st.group(setPatch(st.key("/a"), []byte("5")), setPatch(st.key("/b"), []byte("b")))
			st.group(incrPatch(st.key("/x"), 1), SingleDataPatch{Key: incrY.Key, Func: func(old []byte) ([]byte, bool, error) {
				if first {
					first = false
					close(c.entered)
					if err := blockUntil(ctx, c.release); err != nil {
						return nil, false, err
					}
				}
				return incrY.Func(old)
			}})
			st.group(SingleDataPatch{Key: incrA.Key, Func: func(old []byte) ([]byte, bool, error) {
				aRuns++
				return incrA.Func(old)
			}})
			return nil
		}),
		when(func(st *recordingState) bool { return st.has("/a", "6") }, nil),
	)
	c.run(ctx, t, reactor, "/y", "10", "every group to land",
		func(keys map[string]string) bool { return keys["/a"] == "6" }, WithTxnLimits(4, DefaultTxnMaxBytes))

	require.Equal(t, map[string]string{"/a": "6", "/b": "b", "/x": "1", "/y": "11"}, etcdSnapshot(ctx, t, c.env.cli, c.prefix))
	require.Equal(t, 2, aRuns, "the third group re-ran on what the first Txn wrote")
	// The second Txn, and the third when it went out before the second's
	// answer came back.
	conflicts := metricSum(t, c.env.reg, "orchestrator_conflicts_total")
	require.True(t, conflicts == 1 || conflicts == 2, "conflicts: %v", conflicts)
}

// TestPipelineTokenWipedMidChain: the first Txn of the worker's first chain
// lands on the commit token the worker put before it; then another client
// deletes the token (a wipe of the reserved area), and the Txns behind it
// find it absent, where no Txn of the worker's left it. The worker takes the
// token as it is (a conflict, not a resend: nothing of its own is in flight
// any more), puts it again, and re-runs the rest: every group lands exactly
// once, in order, and Run goes on (no endless resends).
func TestPipelineTokenWipedMidChain(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := testContext(t)
	const prefix = "/test/pipeline/token-wiped"
	c := holdChain(ctx, t, env, prefix, chainSetup{opts: []Option{WithMetrics(env.reg)}})
	first := c.links[0].release(ctx, t, txnPass)
	require.NoError(t, first.err)
	require.True(t, first.succeeded)
	_, err := env.cli.Delete(ctx, keysOf(prefix).tokenKey(""), clientv3.WithPrefix())
	require.NoError(t, err)
	c.releaseFrom(ctx, t, 1, false, "on a wiped token")
	c.finish(ctx, t, env.cli, prefix, [chainGroups]int64{1, 1, 1, 1})
	require.Equal(t, []int64{1, 2, 2, 2}, loadRuns(c.runs), "the groups behind the first re-run once")
	require.Positive(t, metricSum(t, env.reg, "orchestrator_conflicts_total"), "the absent token is a conflict")
}

// TestChainPositionReadsWhereTheTokenStood: how a chain places a read of
// its commit token (from a failed link's Else or a fence), without etcd.
// The window's links write the values 11, 12, 13; the window starts at
// token revision 50, and the flush's earlier links left revisions 40, 45.
func TestChainPositionReadsWhereTheTokenStood(t *testing.T) {
	c := &chain{r: &run{token: &commitToken{rev: 50}}, earlier: map[int64]struct{}{40: {}, 45: {}}}
	w := []*link{{value: 11}, {value: 12}, {value: 13}}
	kv := func(value string, modRev int64) []*mvccpb.KeyValue {
		return []*mvccpb.KeyValue{{Key: []byte("t"), Value: []byte(value), ModRevision: modRev}}
	}
	tests := []struct {
		name string
		kvs  []*mvccpb.KeyValue
		want int
	}{
		{"where the window starts", kv("10", 50), 0},
		{"after the first link", kv("11", 51), 1},
		{"after the last link", kv("13", 58), 3},
		{"at an earlier link of the flush: it overtook", kv("9", 45), evalEarlier},
		{"absent", nil, evalForeign},
		{"a value no link writes", kv("99", 60), evalForeign},
		{"not a number", kv("x", 61), evalForeign},
		{"two keys (never a token read)", append(kv("11", 51), kv("12", 52)...), evalForeign},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.Equal(t, tt.want, c.position(w, readToken(tt.kvs)))
		})
	}
}

// txnFlight counts the commit Txns (Txns with a compare besides the
// token's) a client has in flight, and the most it had at once.
type txnFlight struct {
	mu            sync.Mutex
	now, maxSoFar int
}

// dialOption is the interceptor that counts; give it to the client.
func (f *txnFlight) dialOption() grpc.DialOption {
	return grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any,
		cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption,
	) error {
		if _, ok := asCommitTxn(req); !ok {
			return invoker(ctx, method, req, reply, cc, opts...)
		}
		f.mu.Lock()
		f.now++
		f.maxSoFar = max(f.maxSoFar, f.now)
		f.mu.Unlock()
		defer func() {
			f.mu.Lock()
			f.now--
			f.mu.Unlock()
		}()
		return invoker(ctx, method, req, reply, cc, opts...)
	})
}

// max is the most commit Txns that were in flight at once.
func (f *txnFlight) max() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.maxSoFar
}

// finishWith is a reactor that leaves the groups build makes on the first
// Tick's state and finishes: Run commits them and returns nil, or the
// commit's error.
func finishWith(build func(st *mapState) [][]DataPatch) Reactor {
	return ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		st.patches = append(st.patches, build(st)...)
		return st, ErrReactorFinished
	})
}

// TestAConflictOfLargeValuesUnderAClientReceiveLimit: a worker whose client
// has a receive limit of 2 MiB (above the load's stream chunks, about the
// server's 1.5 MiB request limit) rewrites 16 keys that hold 200 KiB each
// with small values, in one group. The request is small. Another client
// changes one of the keys before the Txn lands: a conflict, which the
// contract says is no reason to return. The failed Txn's Else read the 16
// compared keys back, 3 MiB, over the client's receive limit, and Run ended
// with a size error for a group of a few hundred bytes. Keys whose values
// are large are no longer read back (elseReadMaxBytes): the group re-runs
// once the watch brings the change, and lands.
func TestAConflictOfLargeValuesUnderAClientReceiveLimit(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := contextWithin(t, 20*time.Second)
	direct := env.cli
	const prefix = "/test/readback-recv"
	clearPrefix(ctx, t, direct, prefix)
	const keys = elseReadMaxKeys
	big := strings.Repeat("b", 200*1024)
	key := func(i int) string { return fmt.Sprintf("%s/k%02d", prefix, i) }
	for i := range keys {
		mustPutKV(ctx, t, direct, key(i), big)
	}
	var runs atomic.Int64
	build := func(*mapState) [][]DataPatch {
		var g []DataPatch
		for i := range keys {
			k := util.NewEtcdKey(key(i))
			g = append(g, SingleDataPatch{Key: k, Func: func(old []byte) ([]byte, bool, error) {
				if i == 0 && runs.Add(1) == 1 {
					// Another writer changes the key after the group ran on
					// it: the Txn's compare on it fails.
					if _, err := direct.Put(ctx, key(0), "foreign"); err != nil {
						return nil, false, err
					}
				}
				return []byte("small-" + strconv.Itoa(i)), true, nil
			}})
		}
		return [][]DataPatch{g}
	}
	cfg := env.clientConfig()
	cfg.MaxCallRecvMsgSize = 2 * 1024 * 1024 // the load fits, the 16 values read back do not
	cli := etcdtest.NewClientFromConfig(t, cfg)
	w := mustNewEtcdWorker(t, cli, prefix, finishWith(build), newMapState(prefix), WithLogger(faultLogger(t)))
	err := w.Run(ctx, nil, behaviourTick, "readback-recv")
	require.NoError(t, err, "a conflict ended Run")
	require.EqualValues(t, 2, runs.Load(), "the group must re-run exactly once after the one conflict")
	got := etcdSnapshot(ctx, t, direct, prefix)
	for i := range keys {
		require.Equal(t, "small-"+strconv.Itoa(i), got[fmt.Sprintf("/k%02d", i)])
	}
}

// TestAnOvertakingLinkOfLargeValuesUnderAClientReceiveLimit: no other
// writer at all. A chain of two Txns, each rewriting 16 keys of 200 KiB
// with small values; the worker's client has a 2 MiB receive limit (above
// the load's chunks). The second link reaches etcd before the first (a gate
// holds both and lets the second go first), as the design says happens to
// about one link in twelve: it fails its token compare and its Else reads
// its 16 keys back, 3 MiB, and Run ended with a size error. Keys whose
// values are large are no longer read back (elseReadMaxBytes): the link is
// sent again once the first landed, and both groups land.
func TestAnOvertakingLinkOfLargeValuesUnderAClientReceiveLimit(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := contextWithin(t, 20*time.Second)
	direct := env.cli
	const prefix = "/test/overtake-recv"
	clearPrefix(ctx, t, direct, prefix)
	const keys = elseReadMaxKeys
	big := strings.Repeat("b", 200*1024)
	key := func(g, i int) string { return fmt.Sprintf("%s/g%d/k%02d", prefix, g, i) }
	for g := range 2 {
		for i := range keys {
			mustPutKV(ctx, t, direct, key(g, i), big)
		}
	}
	build := func(*mapState) [][]DataPatch {
		var groups [][]DataPatch
		for g := range 2 {
			var group []DataPatch
			for i := range keys {
				group = append(group, setKey(key(g, i), []byte("small")))
			}
			groups = append(groups, group)
		}
		return groups
	}
	gate := newChainGate(t)
	gate.arm(2)
	cfg := env.clientConfig(gate.dialOption())
	cfg.MaxCallRecvMsgSize = 2 * 1024 * 1024
	cli := etcdtest.NewClientFromConfig(t, cfg)
	// 16 writes + token + counter: one group a Txn.
	w := mustNewEtcdWorker(t, cli, prefix, finishWith(build), newMapState(prefix),
		WithTxnLimits(keys+2, DefaultTxnMaxBytes), WithLogger(faultLogger(t)))
	done := runAsync(ctx, w, nil, behaviourTick, "overtake-recv")
	links := awaitChain(ctx, t, gate, done)
	second := links[1].release(ctx, t, txnPass)
	require.False(t, second.succeeded, "the second link cannot land before the first")
	require.True(t, links[0].release(ctx, t, txnPass).succeeded)
	require.NoError(t, recvErr(ctx, t, done), "a link that overtook the one before it ended Run")
	got := etcdSnapshot(ctx, t, direct, prefix)
	for g := range 2 {
		for i := range keys {
			require.Equal(t, "small", got[fmt.Sprintf("/g%d/k%02d", g, i)])
		}
	}
}

// TestAConflictThatGrewTheValuesUnderAClientReceiveLimit: the keys a group
// rewrites are small in the worker's view, so the Txn reads them back in
// its Else; another writer grows each of them (one put at a time, each well
// under the client's 2 MiB receive limit, so the watch takes them) just
// before the Txn: a conflict whose answer is over the limit. Run ended with
// a size error. A refused answer larger than the request can be on the
// wire is now a lost answer (answerTooLarge, requestBound): the worker
// resolves the Txn, and the group re-runs on the new values and lands.
// With a large request (16 values of 75 KiB, 1.2 MiB) the answer (2.2 MiB)
// is under twice the request, which a first bound took for a refused
// request.
func TestAConflictThatGrewTheValuesUnderAClientReceiveLimit(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		mine  int // bytes of each value the group writes
		grown int // bytes of each value the other writer puts
	}{
		{"small request", 0, 200 << 10},
		{"large request", 75 << 10, 140 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			env := newTestEnv(t)
			ctx := contextWithin(t, 25*time.Second)
			direct := env.cli
			prefix := "/test/readback-grown/" + strings.ReplaceAll(tc.name, " ", "-")
			const keys = elseReadMaxKeys
			grown := strings.Repeat("g", tc.grown)
			mine := func(i int) string { return fmt.Sprintf("mine-%02d-", i) + strings.Repeat("m", tc.mine) }
			key := func(i int) string { return fmt.Sprintf("%s/k%02d", prefix, i) }
			for i := range keys {
				mustPutKV(ctx, t, direct, key(i), "small")
			}
			var runs atomic.Int64
			build := func(*mapState) [][]DataPatch {
				var g []DataPatch
				for i := range keys {
					g = append(g, SingleDataPatch{Key: util.NewEtcdKey(key(i)), Func: func([]byte) ([]byte, bool, error) {
						if i == 0 && runs.Add(1) == 1 {
							for j := range keys { // another writer, one put at a time
								if _, err := direct.Put(ctx, key(j), grown); err != nil {
									return nil, false, err
								}
							}
						}
						return []byte(mine(i)), true, nil
					}})
				}
				return [][]DataPatch{g}
			}
			cfg := env.clientConfig()
			cfg.MaxCallRecvMsgSize = 2 << 20
			cli := etcdtest.NewClientFromConfig(t, cfg)
			w := mustNewEtcdWorker(t, cli, prefix, finishWith(build), newMapState(prefix), WithLogger(faultLogger(t)))
			require.NoError(t, w.Run(ctx, nil, behaviourTick, "readback-grown"), "a conflict ended Run")
			got := etcdSnapshot(ctx, t, direct, prefix)
			for i := range keys {
				require.Equal(t, mine(i), got[fmt.Sprintf("/k%02d", i)])
			}
		})
	}
}
