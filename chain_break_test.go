package orchestrator

// Attempts to break the pipelined commit chain (pipeline.go, commit.go,
// token.go, readdeps.go, batch.go) against a real embedded etcd: foreign
// writers and token wipes in the middle of a chain, lost answers for
// several links, fencing lost mid-chain, ErrEtcdTryAgain on a re-run,
// groups exactly at the Txn limits, depths 1 and 8, groups writing the same
// key in several links, and a bank whose chains conflict with each other.
// Every test checks invariants that can fail: increments counted exactly,
// sums, and the order in which a watch (or the mod revisions) saw the
// groups land.

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"

	"github.com/etcdworker/orchestrator/util"
)

// chainBreakTimeout bounds each test of this file.
const chainBreakTimeout = 45 * time.Second

// chainReactor emits the groups of build in one Tick: the first Tick, or
// with warmup the second (the first commits one group, so that the worker's
// commit token exists when the chain goes out). before runs right before
// build (to arm a gate). The Tick after the chain runs check on the state
// (read-your-writes: the state must hold every group that landed) and
// finishes.
func chainReactor(warmup bool, before func(), build func(st *mapState) [][]DataPatch,
	check func(st *mapState) error,
) Reactor {
	ticks := 0
	return ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		ticks++
		step := ticks
		if !warmup {
			step++
		}
		switch step {
		case 1:
			st.patches = append(st.patches, []DataPatch{setPatch(st.key("/warm"), []byte("1"))})
		case 2:
			if before != nil {
				before()
			}
			st.patches = append(st.patches, build(st)...)
		default:
			if check != nil {
				if err := check(st); err != nil {
					return st, err
				}
			}
			return st, ErrReactorFinished
		}
		return st, nil
	})
}

// countedIncr is incrPatch on key that counts its runs.
func countedIncr(key util.EtcdKey, runs *atomic.Int64) DataPatch {
	inc := incrPatch(key, 1).(SingleDataPatch)
	return SingleDataPatch{Key: key, Func: func(old []byte) ([]byte, bool, error) {
		runs.Add(1)
		return inc.Func(old)
	}}
}

// linkGroups returns n groups {increment /g<i>/a (counted in runs[i]), put
// /g<i>/b = i}: with WithTxnLimits(4, ...) each is a Txn of its own.
func linkGroups(n int, runs []atomic.Int64) func(st *mapState) [][]DataPatch {
	return func(st *mapState) [][]DataPatch {
		groups := make([][]DataPatch, 0, n)
		for i := range n {
			groups = append(groups, []DataPatch{
				countedIncr(st.key(chainKey(i, "a")), &runs[i]),
				setPatch(st.key(chainKey(i, "b")), []byte(strconv.Itoa(i))),
			})
		}
		return groups
	}
}

// stateHolds checks, in the Tick after the chain, that the state holds
// every /g<i>/b of the chain (the barrier: the Tick must see the worker's
// own last commit).
func stateHolds(n int) func(st *mapState) error {
	return func(st *mapState) error {
		for i := range n {
			if string(st.values[chainKey(i, "b")]) != strconv.Itoa(i) {
				return fmt.Errorf("the Tick after the chain does not see group %d's write (state: %q)", i,
					st.values[chainKey(i, "b")])
			}
		}
		return nil
	}
}

func loadRuns(runs []atomic.Int64) []int64 {
	out := make([]int64, len(runs))
	for i := range runs {
		out[i] = runs[i].Load()
	}
	return out
}

// requireLinksLanded checks that group i of a linkGroups chain incremented
// /g<i>/a to want[i] and wrote /g<i>/b once, after group i-1 (a higher mod
// revision).
func requireLinksLanded(ctx context.Context, t testing.TB, cli *clientv3.Client, prefix string, want []int64) {
	t.Helper()
	kvs, _ := userKVs(ctx, t, cli, prefix, 0)
	prev := int64(0)
	for i := range want {
		a, ok := kvs[prefix+chainKey(i, "a")]
		require.True(t, ok, "group %d did not land", i)
		require.Equal(t, strconv.FormatInt(want[i], 10), a.value, "group %d: /g%d/a (each increment must land once)", i, i)
		b, ok := kvs[prefix+chainKey(i, "b")]
		require.True(t, ok, "group %d: /g%d/b missing", i, i)
		require.Equal(t, strconv.Itoa(i), b.value)
		require.Greater(t, b.modRev, prev, "group %d landed before group %d", i, i-1)
		require.Equal(t, a.modRev, b.modRev, "group %d did not land atomically", i)
		prev = b.modRev
	}
}

// getValue returns key's value in etcd ("" when absent) and whether it is
// present.
func getValue(ctx context.Context, t testing.TB, cli *clientv3.Client, key string) (string, bool) {
	t.Helper()
	resp, err := cli.Get(ctx, key)
	require.NoError(t, err)
	if len(resp.Kvs) == 0 {
		return "", false
	}
	return string(resp.Kvs[0].Value), true
}

// wipeTokens deletes every commit token under prefix, as a wipe of the
// reserved area would.
func wipeTokens(ctx context.Context, t testing.TB, cli *clientv3.Client, prefix string) {
	t.Helper()
	resp, err := cli.Delete(ctx, keysOf(prefix).tokenKey(""), clientv3.WithPrefix())
	require.NoError(t, err)
	require.EqualValues(t, 1, resp.Deleted, "the worker's commit token was not there to wipe")
}

// awaitChain is chainGate.awaitFull that fails at once when Run returns
// before its chain is in flight.
func awaitChain(ctx context.Context, t testing.TB, g *chainGate, done <-chan error) []*gatedTxn {
	t.Helper()
	g.mu.Lock()
	full := g.full
	g.mu.Unlock()
	select {
	case <-full:
	case err := <-done:
		t.Fatalf("Run returned before its chain was in flight: %v", err)
	case <-ctx.Done():
	}
	return g.awaitFull(ctx, t)
}

// chainSetup says how holdChain builds the worker of a chain test (here and
// in pipeline_test.go).
// The zero value: chainGroups increment groups (linkGroups), checked by
// stateHolds on the Tick after them, as the Run's first commit.
type chainSetup struct {
	// warmup: the chain is the second commit (the first commits one group),
	// so the commit token has a commit of the worker's behind it.
	warmup bool
	// build returns the groups of the chain, counting runs in runs; nil:
	// linkGroups. check runs on the Tick after the chain; nil: stateHolds,
	// or no check with build.
	build func(runs []atomic.Int64) func(st *mapState) [][]DataPatch
	check func(st *mapState) error
	// dial adds interceptors to the worker's client (after the gate), opts
	// options to the worker (after the defaults: 4 ops a Txn and an
	// observed logger; the default request timeout, so that a link held at
	// the gate does not time out on a busy machine).
	dial []grpc.DialOption
	opts []Option
}

// heldChain is a chain test under way: a worker on its own prefix
// runs, and the chainGroups links of its chain are held at its gate, in
// chain order.
type heldChain struct {
	gate  *chainGate
	runs  []atomic.Int64 // how often each group's increment ran
	logs  *observer.ObservedLogs
	done  <-chan error // Run's result
	links []*gatedTxn
}

// holdChain starts the worker s describes on prefix and waits until its
// chain is held at the gate.
func holdChain(ctx context.Context, t testing.TB, env *testEnv, prefix string, s chainSetup) *heldChain {
	t.Helper()
	h := &heldChain{gate: newChainGate(t), runs: make([]atomic.Int64, chainGroups)}
	build, check := linkGroups(chainGroups, h.runs), s.check
	if s.build != nil {
		build = s.build(h.runs)
	} else if check == nil {
		check = stateHolds(chainGroups)
	}
	var before func()
	if s.warmup {
		before = func() { h.gate.arm(chainGroups) }
	}
	lg, logs := observedLogger(t)
	h.logs = logs
	cli := env.client(t, append([]grpc.DialOption{h.gate.dialOption()}, s.dial...)...)
	opts := append([]Option{WithTxnLimits(4, DefaultTxnMaxBytes), WithLogger(lg)}, s.opts...)
	w := mustNewEtcdWorker(t, cli, prefix, chainReactor(s.warmup, before, build, check), newMapState(prefix), opts...)
	if !s.warmup {
		h.gate.arm(chainGroups)
	}
	h.done = runAsync(ctx, w, nil, behaviourTick, prefix)
	h.links = awaitChain(ctx, t, h.gate, h.done)
	return h
}

// ---------------------------------------------------------------------------
// The commit token.

// TestChainBreakTokenWipedWhileAnswerLost: the first link of a chain lands
// and its answer is lost; before the worker resolves that outcome, another
// client wipes the worker's commit token (a wipe of the reserved area). The
// links behind it fail. The worker must not guess: either it finds out that
// the first link landed, or Run returns ErrCommitUnresolved ("Commit token
// fence"). What it must never do is re-run the landed increment.
//
// "first commit": the chain is the Run's first commit, so the token its
// first link compared is the one the worker put before it (ensureToken).
// "later commit": a warm-up commit came first, so a commit of the worker's
// moved the token before the chain.
func TestChainBreakTokenWipedWhileAnswerLost(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	direct := env.cli
	for i, warmup := range []bool{false, true} {
		name := map[bool]string{false: "first commit", true: "later commit"}[warmup]
		t.Run(name, func(t *testing.T) {
			ctx := contextWithin(t, chainBreakTimeout)
			prefix := fmt.Sprintf("/test/chainbreak/wiped-lost-%d", i)
			c := holdChain(ctx, t, env, prefix, chainSetup{warmup: warmup})
			first := c.links[0].release(ctx, t, txnLoseAnswer)
			require.True(t, first.succeeded, "the first link must land (its answer is then lost)")
			require.Error(t, first.err)
			wipeTokens(ctx, t, direct, prefix)
			for j, h := range c.links[1:] {
				res := h.release(ctx, t, txnPass)
				require.NoError(t, res.err)
				require.False(t, res.succeeded, "link %d landed on a wiped token", j+1)
			}
			requireOnceOrUnresolved(ctx, t, direct, prefix, recvErr(ctx, t, c.done), c.runs, c.logs)
		})
	}
}

// TestChainBreakTokenWipedTwice: the same as
// TestChainBreakTokenWipedWhileAnswerLost, not on the Run's first commit
// but after the worker recovered from an earlier wipe of its token (it
// "takes the token as it is": absent). The next chain's first link lands
// and its answer is lost, and the token is wiped again before the worker
// resolves it. The landed increment must not be re-run.
func TestChainBreakTokenWipedTwice(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := contextWithin(t, chainBreakTimeout)
	direct := env.cli
	const prefix = "/test/chainbreak/wiped-twice"
	gate := newChainGate(t)
	runs := make([]atomic.Int64, chainGroups)
	lg, logs := observedLogger(t)
	cli := env.client(t, []grpc.DialOption{gate.dialOption()}...)
	before := func() { gate.arm(2 * chainGroups) }
	w := mustNewEtcdWorker(t, cli, prefix,
		chainReactor(true, before, linkGroups(chainGroups, runs), stateHolds(chainGroups)), newMapState(prefix),
		WithTxnLimits(4, DefaultTxnMaxBytes), WithRequestTimeout(faultRequestTimeout), WithLogger(lg))
	done := runAsync(ctx, w, nil, behaviourTick, "wiped-twice")
	held := func(from, to int) []*gatedTxn {
		waitUnlessFailed(ctx, t, fmt.Sprintf("%d commit Txns held", to), func() error {
			select {
			case err := <-done:
				return fmt.Errorf("Run returned: %w", err)
			default:
				return nil
			}
		}, func() bool {
			gate.mu.Lock()
			defer gate.mu.Unlock()
			return len(gate.held) >= to
		})
		gate.mu.Lock()
		defer gate.mu.Unlock()
		hs := append([]*gatedTxn(nil), gate.held[from:to]...)
		slices.SortFunc(hs, func(a, b *gatedTxn) int { return int(a.value) - int(b.value) })
		return hs
	}

	// The first chain: the token is wiped before it reaches etcd (after
	// the warm-up commit created it); every link fails and the worker takes
	// the token as it is, absent.
	first := held(0, chainGroups)
	wipeTokens(ctx, t, direct, prefix)
	for j, h := range first {
		require.False(t, h.release(ctx, t, txnPass).succeeded, "link %d landed on a wiped token", j)
	}
	// The re-run: its first link lands, its answer is lost, the token is
	// wiped again, and the links behind it fail.
	second := held(chainGroups, 2*chainGroups)
	res := second[0].release(ctx, t, txnLoseAnswer)
	require.True(t, res.succeeded)
	wipeTokens(ctx, t, direct, prefix)
	for j, h := range second[1:] {
		require.False(t, h.release(ctx, t, txnPass).succeeded, "link %d landed on a wiped token", j+1)
	}
	requireOnceOrUnresolved(ctx, t, direct, prefix, recvErr(ctx, t, done), runs, logs)
}

// requireOnceOrUnresolved checks the end of a chain whose first link landed
// with its answer lost before the token was wiped: group 0's increment is
// in etcd once, and Run either returned runErr ErrCommitUnresolved or went
// on, and then every group landed once.
func requireOnceOrUnresolved(ctx context.Context, t testing.TB, cli *clientv3.Client, prefix string, runErr error,
	runs []atomic.Int64, logs *observer.ObservedLogs,
) {
	t.Helper()
	landed, notLanded := resolutionLogs(logs)
	a, _ := getValue(ctx, t, cli, prefix+chainKey(0, "a"))
	require.Equal(t, "1", a,
		"group 0's increment landed %s times (Run: %v; runs of the increments %v; resolutions landed=%d not landed=%d)",
		a, runErr, loadRuns(runs), landed, notLanded)
	if runErr != nil {
		require.ErrorIs(t, runErr, ErrCommitUnresolved)
		return
	}
	requireLinksLanded(ctx, t, cli, prefix, []int64{1, 1, 1, 1})
}

// TestChainBreakTokenRewrittenMidChain: the first link lands; another client
// then rewrites the commit token (a value the worker never wrote); the links
// behind it must fail, and the worker, taking the token as it is, re-runs
// them once: every group lands exactly once, in order.
func TestChainBreakTokenRewrittenMidChain(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := contextWithin(t, chainBreakTimeout)
	direct := env.cli
	const prefix = "/test/chainbreak/token-rewritten"
	c := holdChain(ctx, t, env, prefix, chainSetup{warmup: true})
	res := c.links[0].release(ctx, t, txnPass)
	require.NoError(t, res.err)
	require.True(t, res.succeeded)
	tokens, err := direct.Get(ctx, keysOf(prefix).tokenKey(""), clientv3.WithPrefix())
	require.NoError(t, err)
	require.Len(t, tokens.Kvs, 1)
	mustPutKV(ctx, t, direct, string(tokens.Kvs[0].Key), "rewritten")
	for j, h := range c.links[1:] {
		res := h.release(ctx, t, txnPass)
		require.NoError(t, res.err)
		require.False(t, res.succeeded, "link %d landed on a rewritten token", j+1)
	}
	require.NoError(t, recvErr(ctx, t, c.done))
	requireLinksLanded(ctx, t, direct, prefix, []int64{1, 1, 1, 1})
	require.Equal(t, []int64{1, 2, 2, 2}, loadRuns(c.runs))
}

// ---------------------------------------------------------------------------
// Foreign writers and conflicts in the middle of a chain.

// TestChainBreakForeignWrites: four links in flight; another client writes
// a key of one of them while they are held, then they reach etcd in the
// order of the case. No link may land over the other client's write or
// behind a link that failed; the groups that did not land re-run once (the
// one whose key was written, on the other client's value) and every group
// lands once, in order.
func TestChainBreakForeignWrites(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	direct := env.cli
	cases := []struct {
		name   string
		warmup bool
		// After writeAfter links were released, the other client puts value
		// at group write's /a; then the rest of order reach etcd.
		writeAfter, write int
		value             string
		order             []int
		lands             []bool // per released link, in order
		landed, runs      []int64
	}{{
		// The second lands, the third conflicts, the fourth fails behind it.
		name: "on a later link", writeAfter: 1, write: 2, value: "10",
		order: []int{0, 1, 2, 3}, lands: []bool{true, true, false, false},
		landed: []int64{1, 1, 11, 1}, runs: []int64{1, 1, 2, 2},
	}, {
		// The fourth and the third overtake the second, which then conflicts.
		name: "while later links overtake", writeAfter: 1, write: 1, value: "20",
		order: []int{0, 3, 2, 1}, lands: []bool{true, false, false, false},
		landed: []int64{1, 21, 1, 1}, runs: []int64{1, 2, 2, 2},
	}, {
		// The later links reach etcd first, then the first conflicts: nothing
		// lands in that round.
		name: "on the first link behind overtakers", warmup: true, writeAfter: 0, write: 0, value: "5",
		order: []int{2, 1, 3, 0}, lands: []bool{false, false, false, false},
		landed: []int64{6, 1, 1, 1}, runs: []int64{2, 2, 2, 2},
	}}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := contextWithin(t, chainBreakTimeout)
			prefix := fmt.Sprintf("/test/chainbreak/foreign-%d", i)
			c := holdChain(ctx, t, env, prefix, chainSetup{warmup: tc.warmup})
			for k, j := range tc.order {
				if k == tc.writeAfter {
					mustPutKV(ctx, t, direct, prefix+chainKey(tc.write, "a"), tc.value)
				}
				require.Equal(t, tc.lands[k], c.links[j].release(ctx, t, txnPass).succeeded, "link %d", j)
			}
			require.NoError(t, recvErr(ctx, t, c.done))
			requireLinksLanded(ctx, t, direct, prefix, tc.landed)
			require.Equal(t, tc.runs, loadRuns(c.runs))
		})
	}
}

// ---------------------------------------------------------------------------
// Unknown outcomes for several links.

// TestChainBreakSeveralAnswersLost: scripted fates for the four links of a
// chain (released in chain order) and for the fences that resolve them.
// Every group must land exactly once, in order, and Run must go on.
func TestChainBreakSeveralAnswersLost(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	direct := env.cli
	P, D, L := txnPass, txnDrop, txnLoseAnswer
	cases := []struct {
		name   string
		links  [chainGroups]txnAction
		fences []txnAction
		warmup bool
	}{
		{name: "all answers lost", links: [chainGroups]txnAction{L, L, L, L}},
		{name: "middle answers lost", links: [chainGroups]txnAction{P, L, L, P}, warmup: true},
		{name: "first dropped", links: [chainGroups]txnAction{D, P, P, P}},
		{name: "lost, dropped, lost, dropped", links: [chainGroups]txnAction{L, D, L, D}, warmup: true},
		{name: "second dropped, third lost", links: [chainGroups]txnAction{P, D, L, P}},
		{name: "last answer lost", links: [chainGroups]txnAction{P, P, P, L}, warmup: true},
		{name: "all lost, fences lost", links: [chainGroups]txnAction{L, L, D, D}, fences: []txnAction{L, D, L}},
		{name: "all dropped, fence answer lost", links: [chainGroups]txnAction{D, D, D, D},
			fences: []txnAction{L}, warmup: true},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := contextWithin(t, chainBreakTimeout)
			prefix := fmt.Sprintf("/test/chainbreak/lost-%d", i)
			inj := &txnFaultInjector{}
			inj.arm(nil, tc.fences)
			c := holdChain(ctx, t, env, prefix, chainSetup{warmup: tc.warmup, dial: []grpc.DialOption{inj.dialOption()}})
			for j, h := range c.links {
				res := h.release(ctx, t, tc.links[j])
				if tc.links[j] == txnPass {
					require.NoError(t, res.err, "link %d", j)
				}
			}
			err := recvErr(ctx, t, c.done)
			landed, notLanded := resolutionLogs(c.logs)
			require.NoError(t, err, "runs %v, resolutions landed=%d not landed=%d, Txns %v",
				loadRuns(c.runs), landed, notLanded, inj.seen)
			requireLinksLanded(ctx, t, direct, prefix, []int64{1, 1, 1, 1})
		})
	}
}

// TestChainBreakUnknownRevisionsThenDependentGroups: six groups, four
// links in flight; the first two land with their answers lost, the third
// and fourth land. The worker then knows that the first two landed, but
// not at which revisions; groups 4 and 5 increment the keys groups 0 and 1
// wrote (and so compare them). They must re-run on a state that has those
// writes and land once: /g0/a and /g1/a end at 2.
func TestChainBreakUnknownRevisionsThenDependentGroups(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := contextWithin(t, chainBreakTimeout)
	direct := env.cli
	const prefix = "/test/chainbreak/unknown-revs"
	var again [2]atomic.Int64
	build := func(runs []atomic.Int64) func(st *mapState) [][]DataPatch {
		return func(st *mapState) [][]DataPatch {
			groups := linkGroups(chainGroups, runs)(st)
			for i := range 2 {
				groups = append(groups, []DataPatch{
					countedIncr(st.key(chainKey(i, "a")), &again[i]),
					setPatch(st.key(chainKey(4+i, "b")), []byte(strconv.Itoa(4+i))),
				})
			}
			return groups
		}
	}
	c := holdChain(ctx, t, env, prefix, chainSetup{warmup: true, build: build})
	for j, a := range []txnAction{txnLoseAnswer, txnLoseAnswer, txnPass, txnPass} {
		require.True(t, c.links[j].release(ctx, t, a).succeeded, "link %d", j)
	}
	require.NoError(t, recvErr(ctx, t, c.done))
	kvs, _ := userKVs(ctx, t, direct, prefix, 0)
	require.Equal(t, "2", kvs[prefix+chainKey(0, "a")].value)
	require.Equal(t, "2", kvs[prefix+chainKey(1, "a")].value)
	require.Equal(t, "1", kvs[prefix+chainKey(2, "a")].value)
	require.Equal(t, "1", kvs[prefix+chainKey(3, "a")].value)
	prev := int64(0)
	for i := range chainGroups + 2 {
		b := kvs[prefix+chainKey(i, "b")]
		require.NotNil(t, b, "group %d", i)
		require.Greater(t, b.modRev, prev, "group %d landed before group %d", i, i-1)
		prev = b.modRev
	}
	require.Equal(t, []int64{1, 1, 1, 1}, loadRuns(c.runs), "a landed group re-ran")
	landed, notLanded := resolutionLogs(c.logs)
	require.Equal(t, [2]int{2, 0}, [2]int{landed, notLanded})
}

// TestChainBreakAnswerLostThenConflict: the first link lands with its
// answer lost, and another client changes a key of the second link, which
// conflicts: reaching etcd after the first ("in order"), or before it
// ("overtaking", so its Else read shows the token where the chain began).
// The first group must count as landed (never re-run), the second re-runs
// on the other client's value, and every group lands once, in order.
func TestChainBreakAnswerLostThenConflict(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	direct := env.cli
	for i, overtake := range []bool{false, true} {
		name := map[bool]string{false: "in order", true: "overtaking"}[overtake]
		t.Run(name, func(t *testing.T) {
			ctx := contextWithin(t, chainBreakTimeout)
			prefix := fmt.Sprintf("/test/chainbreak/lost-conflict-%d", i)
			c := holdChain(ctx, t, env, prefix, chainSetup{warmup: true})
			mustPutKV(ctx, t, direct, prefix+chainKey(1, "a"), "30")
			if overtake {
				require.False(t, c.links[1].release(ctx, t, txnPass).succeeded)
				require.True(t, c.links[0].release(ctx, t, txnLoseAnswer).succeeded)
			} else {
				require.True(t, c.links[0].release(ctx, t, txnLoseAnswer).succeeded)
				require.False(t, c.links[1].release(ctx, t, txnPass).succeeded)
			}
			for j, h := range c.links[2:] {
				require.False(t, h.release(ctx, t, txnPass).succeeded, "link %d landed behind a conflict", j+2)
			}
			require.NoError(t, recvErr(ctx, t, c.done))
			requireLinksLanded(ctx, t, direct, prefix, []int64{1, 31, 1, 1})
			require.Equal(t, int64(1), c.runs[0].Load(), "the landed group re-ran")
			landed, notLanded := resolutionLogs(c.logs)
			require.Equal(t, [2]int{1, 0}, [2]int{landed, notLanded})
		})
	}
}

// TestChainBreakIgnoreAndSkipOnRerun: after a conflict on the second link,
// the second group's re-run takes another decision on the other client's
// value: its increment returns ErrEtcdIgnore (the group still writes its
// other key), or the whole group returns ErrEtcdSkipGroup (it writes
// nothing). The groups behind it still land once, in order; what the
// ignored patch or the skipped group would have written never lands.
func TestChainBreakIgnoreAndSkipOnRerun(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	direct := env.cli
	for i, skip := range []bool{false, true} {
		name := map[bool]string{false: "ignore", true: "skip group"}[skip]
		t.Run(name, func(t *testing.T) {
			ctx := contextWithin(t, chainBreakTimeout)
			prefix := fmt.Sprintf("/test/chainbreak/ignore-skip-%d", i)
			stop := ErrEtcdIgnore
			if skip {
				stop = ErrEtcdSkipGroup
			}
			build := func(runs []atomic.Int64) func(st *mapState) [][]DataPatch {
				return func(st *mapState) [][]DataPatch {
					groups := linkGroups(chainGroups, runs)(st)
					inner := groups[1][0].(SingleDataPatch)
					groups[1][0] = SingleDataPatch{Key: inner.Key, Func: func(old []byte) ([]byte, bool, error) {
						if string(old) == "100" { // the other client's value: decide otherwise
							runs[1].Add(1)
							return []byte("999"), true, stop // what it returns must be dropped
						}
						return inner.Func(old)
					}}
					return groups
				}
			}
			check := func(st *mapState) error {
				for _, j := range []int{0, 2, 3} {
					if string(st.values[chainKey(j, "b")]) != strconv.Itoa(j) {
						return fmt.Errorf("the Tick after the chain misses group %d", j)
					}
				}
				return nil
			}
			c := holdChain(ctx, t, env, prefix, chainSetup{warmup: true, build: build, check: check})
			require.True(t, c.links[0].release(ctx, t, txnPass).succeeded)
			mustPutKV(ctx, t, direct, prefix+chainKey(1, "a"), "100")
			for j, h := range c.links[1:] {
				require.False(t, h.release(ctx, t, txnPass).succeeded, "link %d", j+1)
			}
			require.NoError(t, recvErr(ctx, t, c.done))

			kvs, _ := userKVs(ctx, t, direct, prefix, 0)
			require.Equal(t, "100", kvs[prefix+chainKey(1, "a")].value, "the ignored increment landed")
			b1, ok := kvs[prefix+chainKey(1, "b")]
			if skip {
				require.False(t, ok, "the skipped group wrote /g1/b")
			} else {
				require.True(t, ok, "the group of the ignored patch lost its other write")
				require.Equal(t, "1", b1.value)
			}
			prev := int64(0)
			for _, j := range []int{0, 1, 2, 3} {
				if j == 1 && skip {
					continue
				}
				b := kvs[prefix+chainKey(j, "b")]
				require.Greater(t, b.modRev, prev, "group %d landed out of order", j)
				prev = b.modRev
				if j != 1 {
					require.Equal(t, "1", kvs[prefix+chainKey(j, "a")].value, "group %d", j)
				}
			}
		})
	}
}

// ---------------------------------------------------------------------------
// Fencing in a chain.

// TestChainBreakFencingLostMidChain: a fenced worker has four links in
// flight; the first lands (its answer delivered, or lost), then the fencing
// key is deleted. The links behind it must fail, Run must return
// ErrNotOwner, and exactly the first group is in etcd, once.
func TestChainBreakFencingLostMidChain(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	direct := env.cli
	for i, first := range []txnAction{txnPass, txnLoseAnswer} {
		name := map[txnAction]string{txnPass: "first answer delivered", txnLoseAnswer: "first answer lost"}[first]
		t.Run(name, func(t *testing.T) {
			ctx := contextWithin(t, chainBreakTimeout)
			prefix := fmt.Sprintf("/test/chainbreak/fencing-%d", i)
			fenceKey := prefix + "-leader"
			put, err := direct.Put(ctx, fenceKey, "me")
			require.NoError(t, err)
			c := holdChain(ctx, t, env, prefix, chainSetup{warmup: true, opts: []Option{
				WithFencingKey(fenceKey, put.Header.Revision), WithTxnLimits(5, DefaultTxnMaxBytes), // one op more for fencing
			}})
			require.True(t, c.links[0].release(ctx, t, first).succeeded)
			_, err = direct.Delete(ctx, fenceKey)
			require.NoError(t, err)
			for j, h := range c.links[1:] {
				require.False(t, h.release(ctx, t, txnPass).succeeded, "link %d landed without the fencing key", j+1)
			}
			require.ErrorIs(t, recvErr(ctx, t, c.done), ErrNotOwner)

			a, _ := getValue(ctx, t, direct, prefix+chainKey(0, "a"))
			require.Equal(t, "1", a, "group 0 must be in etcd once")
			for j := 1; j < chainGroups; j++ {
				_, ok := getValue(ctx, t, direct, prefix+chainKey(j, "a"))
				require.False(t, ok, "group %d landed after the fencing key was lost", j)
			}
			require.Equal(t, int64(1), c.runs[0].Load(), "group 0 re-ran")
		})
	}
}

// ---------------------------------------------------------------------------
// ErrEtcdTryAgain on a re-run.

// TestChainBreakTryAgainOnRerun: the second link conflicts (another client
// changed its key); on the re-run the third group's patch asks to try
// again, twice, then goes on. Nothing may land while a group of the re-run
// asks to try again, no Tick may run before the rest landed, and every group
// lands once, in order.
func TestChainBreakTryAgainOnRerun(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := contextWithin(t, chainBreakTimeout)
	direct := env.cli
	const prefix = "/test/chainbreak/try-again"
	var tries atomic.Int64
	var sawLanded atomic.Bool // a try-again run saw group 3 in etcd already
	build := func(runs []atomic.Int64) func(st *mapState) [][]DataPatch {
		return func(st *mapState) [][]DataPatch {
			groups := linkGroups(chainGroups, runs)(st)
			inner := groups[2][0].(SingleDataPatch)
			groups[2][0] = SingleDataPatch{Key: inner.Key, Func: func(old []byte) ([]byte, bool, error) {
				n := tries.Add(1)
				if n == 2 || n == 3 { // the re-run after the conflict, and the try after it
					if resp, err := direct.Get(ctx, prefix+chainKey(3, "a")); err == nil && len(resp.Kvs) > 0 {
						sawLanded.Store(true)
					}
					return nil, false, ErrEtcdTryAgain
				}
				return inner.Func(old)
			}}
			return groups
		}
	}
	c := holdChain(ctx, t, env, prefix, chainSetup{build: build, check: stateHolds(chainGroups)})
	require.True(t, c.links[0].release(ctx, t, txnPass).succeeded)
	mustPutKV(ctx, t, direct, prefix+chainKey(1, "a"), "7")
	for j, h := range c.links[1:] {
		require.False(t, h.release(ctx, t, txnPass).succeeded, "link %d", j+1)
	}
	require.NoError(t, recvErr(ctx, t, c.done))
	requireLinksLanded(ctx, t, direct, prefix, []int64{1, 8, 1, 1})
	require.EqualValues(t, 4, tries.Load(), "group 2's patch: first run, two tries again, the run that lands")
	require.False(t, sawLanded.Load(), "group 3 landed while group 2 was trying again")
	// Group 1 runs four times (the first run, the re-run, and the two tries
	// after it); group 3 only twice: group 2's try again ends each flush
	// before group 3 runs.
	require.Equal(t, []int64{1, 4, 2, 2}, loadRuns(c.runs))
}

// ---------------------------------------------------------------------------
// Txn limits.

// TestChainBreakGroupsAtTheOpLimit: the server allows 8 ops per Txn and the
// worker (fenced) is told so. Groups of exactly 8 ops (5 writes, one of
// them a delete, or 4 writes and a dependency) go out as a chain of four
// Txns and all land, in order; etcd never rejects one. A flush with one
// group of 9 ops among groups that fit fails with ErrEtcdTxnOpsExceed and
// writes nothing at all.
func TestChainBreakGroupsAtTheOpLimit(t *testing.T) {
	t.Parallel()
	const limit = 8
	env := newTestEnv(t, withMaxTxnOps(limit))
	ctx := contextWithin(t, chainBreakTimeout)
	direct := env.cli
	const prefix = "/test/chainbreak/op-limit"
	fenceKey := prefix + "-leader"
	put, err := direct.Put(ctx, fenceKey, "me")
	require.NoError(t, err)
	for i := range 4 {
		mustPutKV(ctx, t, direct, fmt.Sprintf("%s/gone/%d", prefix, i), "x")
	}
	opts := []Option{WithTxnLimits(limit, DefaultTxnMaxBytes), WithFencingKey(fenceKey, put.Header.Revision),
		WithLogger(faultLogger(t))}
	group := func(st *mapState, i int, writes int, deleteAt int, withDep bool) []DataPatch {
		var g []DataPatch
		for k := range writes {
			g = append(g, setPatch(st.key(fmt.Sprintf("/g%d/k%d", i, k)), []byte(strconv.Itoa(i))))
		}
		if deleteAt >= 0 { // an existing key, so that the delete is a write
			g = append(g, deletePatch(st.key(fmt.Sprintf("/gone/%d", deleteAt))))
		}
		if withDep {
			g = append(g, ReadDependency{Key: st.key(fmt.Sprintf("/dep/%d", i))})
		}
		return g
	}
	var txns atomic.Int64
	count := grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any,
		cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption,
	) error {
		if _, ok := asCommitTxn(req); ok {
			txns.Add(1)
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	})
	cli := env.client(t, []grpc.DialOption{count}...)
	build := func(st *mapState) [][]DataPatch {
		return [][]DataPatch{
			group(st, 0, 4, 0, false),  // 5 writes + token + counter + fencing = 8 compares
			group(st, 1, 4, -1, true),  // 4 writes + 1 dependency + 3 = 8
			group(st, 2, 4, 2, false),  // a delete again
			group(st, 3, 5, -1, false), // 5 writes + 3 = 8
		}
	}
	w := mustNewEtcdWorker(t, cli, prefix, chainReactor(false, nil, build, nil), newMapState(prefix), opts...)
	require.NoError(t, w.Run(ctx, nil, behaviourTick, "op-limit"))
	// Each group at the limit is a Txn of its own (more Txns only when a
	// link overtook the one before it and was sent again).
	require.GreaterOrEqual(t, txns.Load(), int64(4))
	kvs, _ := userKVs(ctx, t, direct, prefix, 0)
	prev := int64(0)
	for i := range 4 {
		kv, ok := kvs[fmt.Sprintf("%s/g%d/k0", prefix, i)]
		require.True(t, ok, "group %d did not land", i)
		require.Greater(t, kv.modRev, prev, "group %d landed before group %d", i, i-1)
		prev = kv.modRev
	}
	_, ok := kvs[prefix+"/gone/0"]
	require.False(t, ok)
	_, ok = kvs[prefix+"/gone/2"]
	require.False(t, ok)

	// One group too many ops, after two that fit: nothing is written.
	before := etcdSnapshot(ctx, t, direct, prefix)
	rev := headRevision(ctx, t, direct)
	build = func(st *mapState) [][]DataPatch {
		return [][]DataPatch{
			group(st, 10, 5, -1, false),
			group(st, 11, 5, -1, false),
			group(st, 12, 5, 3, false), // 6 writes + 3 = 9 > 8
			group(st, 13, 1, -1, false),
		}
	}
	w = mustNewEtcdWorker(t, cli, prefix, chainReactor(false, nil, build, nil), newMapState(prefix), opts...)
	err = w.Run(ctx, nil, behaviourTick, "op-limit-over")
	require.ErrorIs(t, err, ErrEtcdTxnOpsExceed)
	require.NotContains(t, err.Error(), "max-txn-ops", "etcd rejected a Txn the worker sent")
	require.Equal(t, before, etcdSnapshot(ctx, t, direct, prefix), "a flush with a group over the limit wrote something")
	require.Empty(t, writesSince(ctx, t, direct, rev, prefix), "a flush with a group over the limit wrote something")
}

// TestChainBreakGroupsAtTheByteLimit: groups whose size is exactly the
// worker's byte limit go out as a chain of Txns of one group each and all
// land in order; a flush with one group a byte over the limit fails with
// ErrEtcdTxnSizeExceed and writes nothing.
func TestChainBreakGroupsAtTheByteLimit(t *testing.T) {
	t.Parallel()
	const maxBytes = 4096
	env := newTestEnv(t)
	ctx := contextWithin(t, chainBreakTimeout)
	direct := env.cli
	const prefix = "/test/chainbreak/byte-limit"
	probe := mustNewEtcdWorker(t, direct, prefix, idleReactor(), newMapState(prefix),
		WithTxnLimits(DefaultTxnMaxOps, maxBytes))
	l := probe.limits
	key := func(i int) string { return fmt.Sprintf("%s/g%d", prefix, i) }
	// One key per group: overhead + 3 copies of the key + the value.
	valueLen := func(i, extra int) int { return maxBytes - l.overheadBytes - writeKeyCopies*len(key(i)) + extra }
	build := func(extraAt int) func(st *mapState) [][]DataPatch {
		return func(st *mapState) [][]DataPatch {
			var groups [][]DataPatch
			for i := range 4 {
				extra := 0
				if i == extraAt {
					extra = 1
				}
				v := strings.Repeat(strconv.Itoa(i), valueLen(i, extra))
				groups = append(groups, []DataPatch{setKey(key(i), []byte(v))})
			}
			return groups
		}
	}
	w := mustNewEtcdWorker(t, direct, prefix, chainReactor(false, nil, build(-1), nil), newMapState(prefix),
		WithTxnLimits(DefaultTxnMaxOps, maxBytes), WithLogger(faultLogger(t)))
	require.NoError(t, w.Run(ctx, nil, behaviourTick, "byte-limit"))
	kvs, _ := userKVs(ctx, t, direct, prefix, 0)
	prev := int64(0)
	for i := range 4 {
		kv, ok := kvs[key(i)]
		require.True(t, ok, "group %d did not land", i)
		require.Len(t, kv.value, valueLen(i, 0))
		require.Greater(t, kv.modRev, prev, "group %d not in a Txn of its own after group %d", i, i-1)
		prev = kv.modRev
	}

	before := etcdSnapshot(ctx, t, direct, prefix)
	w = mustNewEtcdWorker(t, direct, prefix, chainReactor(false, nil, build(2), nil), newMapState(prefix),
		WithTxnLimits(DefaultTxnMaxOps, maxBytes), WithLogger(faultLogger(t)))
	require.ErrorIs(t, w.Run(ctx, nil, behaviourTick, "byte-limit-over"), ErrEtcdTxnSizeExceed)
	require.Equal(t, before, etcdSnapshot(ctx, t, direct, prefix), "a flush with a group over the limit wrote something")
}

// TestChainBreakRerunOutgrowsTheByteLimit: the second link conflicts on a
// value another client made large; on the re-run the second group's patch
// (append to the value) no longer fits a Txn. Run must end with
// ErrEtcdTxnSizeExceed before sending anything of the re-run: the first
// group stays landed once, the other client's value stays, and the groups
// behind never land.
func TestChainBreakRerunOutgrowsTheByteLimit(t *testing.T) {
	t.Parallel()
	const maxBytes = 2048
	env := newTestEnv(t)
	ctx := contextWithin(t, chainBreakTimeout)
	direct := env.cli
	const prefix = "/test/chainbreak/outgrows"
	key := func(i int) string { return fmt.Sprintf("%s/g%d", prefix, i) }
	build := func([]atomic.Int64) func(st *mapState) [][]DataPatch {
		return func(*mapState) [][]DataPatch {
			var groups [][]DataPatch
			for i := range chainGroups {
				k := util.NewEtcdKey(key(i))
				groups = append(groups, []DataPatch{SingleDataPatch{Key: k, Func: func(old []byte) ([]byte, bool, error) {
					return append(old, 'x'), true, nil
				}}})
			}
			return groups
		}
	}
	c := holdChain(ctx, t, env, prefix, chainSetup{warmup: true, build: build, opts: []Option{WithTxnLimits(3, maxBytes)}})
	require.True(t, c.links[0].release(ctx, t, txnPass).succeeded)
	big := strings.Repeat("b", maxBytes)
	mustPutKV(ctx, t, direct, key(1), big)
	rev := headRevision(ctx, t, direct)
	for j, h := range c.links[1:] {
		require.False(t, h.release(ctx, t, txnPass).succeeded, "link %d", j+1)
	}
	require.ErrorIs(t, recvErr(ctx, t, c.done), ErrEtcdTxnSizeExceed)
	v, _ := getValue(ctx, t, direct, key(0))
	require.Equal(t, "x", v)
	v, _ = getValue(ctx, t, direct, key(1))
	require.Equal(t, big, v, "the group that cannot fit wrote something")
	for j := 2; j < chainGroups; j++ {
		_, ok := getValue(ctx, t, direct, key(j))
		require.False(t, ok, "group %d landed behind a group that cannot fit", j)
	}
	var user []string // the token's removal when Run returns is no write of a group
	for _, k := range writesSince(ctx, t, direct, rev, prefix) {
		if !strings.Contains(k, reservedDir) {
			user = append(user, k)
		}
	}
	require.Empty(t, user, "something was written after the conflict")
}

// ---------------------------------------------------------------------------
// Depth.

// TestChainBreakMaxPipelineDepthCommits: the largest depth NewEtcdWorker
// accepts (MaxPipelineDepth; above it is ErrInvalidArgument, see
// TestOptionErrorsNameTheOption) commits a chain longer than one Txn
// without a panic (the window is sized by the chain, not by the depth).
func TestChainBreakMaxPipelineDepthCommits(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	ctx := contextWithin(t, 20*time.Second)
	const prefix = "/test/chainbreak/max-depth"
	clearPrefix(ctx, t, cli, prefix)
	build := func(st *mapState) [][]DataPatch {
		return [][]DataPatch{{setPatch(st.key("/a"), []byte("a"))}, {setPatch(st.key("/b"), []byte("b"))}}
	}
	w := mustNewEtcdWorker(t, cli, prefix, chainReactor(false, nil, build, nil), newMapState(prefix),
		WithPipelineDepth(MaxPipelineDepth), WithTxnLimits(3, DefaultTxnMaxBytes))
	var runErr error
	panicked := func() (p any) {
		defer func() { p = recover() }()
		runErr = w.Run(ctx, nil, behaviourTick, "max-depth")
		return nil
	}()
	require.Nil(t, panicked, "Run panicked with WithPipelineDepth(MaxPipelineDepth)")
	require.NoError(t, runErr)
	require.Equal(t, map[string]string{"/a": "a", "/b": "b"}, etcdSnapshot(ctx, t, cli, prefix))
}

// prefixWatch records, in order, the puts under prefix + "/" (reserved keys
// left out) from revision from on.
type prefixWatch struct {
	mu     sync.Mutex
	events []watchedPut
	cancel context.CancelFunc
	done   chan struct{}
}

type watchedPut struct {
	key   string // relative
	value string
	rev   int64
	del   bool
}

func watchPrefix(ctx context.Context, t testing.TB, cli *clientv3.Client, prefix string, from int64) *prefixWatch {
	t.Helper()
	wctx, cancel := context.WithCancel(ctx)
	pw := &prefixWatch{cancel: cancel, done: make(chan struct{})}
	ch := cli.Watch(wctx, prefix+"/", clientv3.WithPrefix(), clientv3.WithRev(from))
	go func() {
		defer close(pw.done)
		for resp := range ch {
			for _, ev := range resp.Events {
				k := string(ev.Kv.Key)
				if strings.Contains(k, reservedDir) {
					continue
				}
				pw.mu.Lock()
				pw.events = append(pw.events, watchedPut{key: k[len(prefix):], value: string(ev.Kv.Value),
					rev: ev.Kv.ModRevision, del: ev.Type == clientv3.EventTypeDelete})
				pw.mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-pw.done
	})
	return pw
}

// waitFor waits until the watch saw a put of key = value.
func (pw *prefixWatch) waitFor(ctx context.Context, t testing.TB, key, value string) {
	t.Helper()
	waitUntil(ctx, t, "the watch to see "+key+" = "+value, func() bool {
		pw.mu.Lock()
		defer pw.mu.Unlock()
		for _, e := range pw.events {
			if e.key == key && e.value == value && !e.del {
				return true
			}
		}
		return false
	})
}

func (pw *prefixWatch) snapshot() []watchedPut {
	pw.mu.Lock()
	defer pw.mu.Unlock()
	return append([]watchedPut(nil), pw.events...)
}

// TestChainBreakDepthOneAndEight: twelve groups of one flush, each a Txn of
// its own, committed with depth 1 and with depth 8 (a gate proves that 8
// were in flight at once). Both land every group once; a watch on the
// prefix sees group i's write only after group i-1's, in another revision.
func TestChainBreakDepthOneAndEight(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	direct := env.cli
	const groups = 12
	for _, depth := range []int{1, 8} {
		t.Run(fmt.Sprintf("depth %d", depth), func(t *testing.T) {
			ctx := contextWithin(t, chainBreakTimeout)
			prefix := fmt.Sprintf("/test/chainbreak/depth-%d", depth)
			flight := &txnFlight{}
			count := flight.dialOption()
			dial := []grpc.DialOption{count}
			var gate *chainGate
			if depth > 1 {
				gate = newChainGate(t)
				gate.arm(depth)
				dial = append(dial, gate.dialOption())
			}
			runs := make([]atomic.Int64, groups)
			watch := watchPrefix(ctx, t, direct, prefix, headRevision(ctx, t, direct)+1)
			w := mustNewEtcdWorker(t, env.client(t, dial...), prefix,
				chainReactor(false, nil, linkGroups(groups, runs), stateHolds(groups)), newMapState(prefix),
				WithTxnLimits(4, DefaultTxnMaxBytes), WithPipelineDepth(depth), WithLogger(faultLogger(t)))
			done := runAsync(ctx, w, nil, behaviourTick, "depth")
			if gate != nil {
				for _, h := range awaitChain(ctx, t, gate, done) {
					require.True(t, h.release(ctx, t, txnPass).succeeded)
				}
			}
			require.NoError(t, recvErr(ctx, t, done))

			want := make([]int64, groups)
			for i := range want {
				want[i] = 1
			}
			requireLinksLanded(ctx, t, direct, prefix, want)
			require.Equal(t, want, loadRuns(runs))
			if depth == 1 {
				require.Equal(t, 1, flight.max())
			} else {
				require.GreaterOrEqual(t, flight.max(), depth)
				require.LessOrEqual(t, flight.max(), depth, "more links in flight than the depth")
			}
			watch.waitFor(ctx, t, chainKey(groups-1, "b"), strconv.Itoa(groups-1))
			seen := map[int]int64{}
			for _, e := range watch.snapshot() {
				var i int
				var part string
				if _, err := fmt.Sscanf(e.key, "/g%d/%s", &i, &part); err != nil || part != "b" {
					continue
				}
				if i > 0 {
					prev, ok := seen[i-1]
					require.True(t, ok, "group %d's write seen before group %d's", i, i-1)
					require.Greater(t, e.rev, prev)
				}
				seen[i] = e.rev
			}
			require.Len(t, seen, groups)
		})
	}
}

// TestChainBreakSameKeyInEveryLink: eight groups of one flush each
// increment /n and put /s/<i>; each is a Txn of its own, and each must wait
// for the one before it (it writes /n too). Another client increments /n
// concurrently (CAS). /n ends at 8 plus the other client's increments, and
// a watch sees /s/<i> land in order, in the same revision as an /n one
// higher than the /n of /s/<i-1>.
func TestChainBreakSameKeyInEveryLink(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := contextWithin(t, chainBreakTimeout)
	direct := env.cli
	const prefix = "/test/chainbreak/same-key"
	const groups = 8
	var runs atomic.Int64
	flight := &txnFlight{}
	count := flight.dialOption()
	build := func(st *mapState) [][]DataPatch {
		var out [][]DataPatch
		for i := range groups {
			out = append(out, []DataPatch{countedIncr(st.key("/n"), &runs),
				setPatch(st.key(fmt.Sprintf("/s/%d", i)), []byte("x"))})
		}
		return out
	}
	watch := watchPrefix(ctx, t, direct, prefix, headRevision(ctx, t, direct)+1)
	w := mustNewEtcdWorker(t, env.client(t, []grpc.DialOption{count}...), prefix,
		chainReactor(false, nil, build, nil), newMapState(prefix),
		WithTxnLimits(4, DefaultTxnMaxBytes), WithPipelineDepth(8), WithLogger(faultLogger(t)))
	// The other client stops at a flag, never by a cancelled request, so
	// that each of its increments is counted exactly when it landed.
	var foreign atomic.Int64
	var stopForeign atomic.Bool
	var fwg sync.WaitGroup
	var ferr error
	fwg.Add(1)
	go func() {
		defer fwg.Done()
		for !stopForeign.Load() && foreign.Load() < 20 {
			if ferr = casIncrement(ctx, direct, prefix+"/n", 1); ferr != nil {
				return
			}
			foreign.Add(1)
			time.Sleep(2 * time.Millisecond)
		}
	}()
	err := w.Run(ctx, nil, behaviourTick, "same-key")
	stopForeign.Store(true)
	fwg.Wait()
	require.NoError(t, err)
	require.NoError(t, ferr)

	n, _ := getValue(ctx, t, direct, prefix+"/n")
	require.Equal(t, strconv.FormatInt(groups+foreign.Load(), 10), n, "/n lost or doubled an increment")
	require.Equal(t, 1, flight.max(), "two links that write /n were in flight at once")
	watch.waitFor(ctx, t, fmt.Sprintf("/s/%d", groups-1), "x")
	// Each /s/<i> lands with an /n put of the same revision.
	nAt := map[int64]int64{}
	events := watch.snapshot()
	for _, e := range events {
		if e.key == "/n" {
			nAt[e.rev] = mustInt(t, []byte(e.value))
		}
	}
	prevRev, prevN := int64(0), int64(-1)
	for i := range groups {
		var rev int64
		for _, e := range events {
			if e.key == fmt.Sprintf("/s/%d", i) {
				require.Zero(t, rev, "/s/%d written twice", i)
				rev = e.rev
			}
		}
		require.NotZero(t, rev, "/s/%d never written", i)
		require.Greater(t, rev, prevRev, "/s/%d landed before /s/%d", i, i-1)
		nv, ok := nAt[rev]
		require.True(t, ok, "/s/%d landed without its increment of /n", i)
		require.Greater(t, nv, prevN)
		prevRev, prevN = rev, nv
	}
}

// ---------------------------------------------------------------------------
// Deletes and dependencies across links.

// TestChainBreakDeletesAndDependenciesAcrossLinks: one flush whose links
// delete keys (the delete counter) and depend on keys an earlier link
// deleted or wrote, while another worker on the same prefix deletes and
// recreates keys of its own (bumping the counter under the first worker's
// chains) and another client changes a key a group depends on. Each
// group's decision is taken in a patch on the values it is given: group
// "move" moves a token from /slot/<i> to /slot/<i+1> only if /slot/<i>
// holds it (a ReadDependency on /slot/<i+1>, a delete of /slot/<i>).
// Exactly one token must exist at the end, at the last slot, and /moves must
// count each move once.
func TestChainBreakDeletesAndDependenciesAcrossLinks(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := contextWithin(t, chainBreakTimeout)
	direct := env.cli
	const prefix = "/test/chainbreak/deletes-deps"
	const slots = 6
	mustPutKV(ctx, t, direct, prefix+"/slot/0", "token")
	var violations violationRecorder
	build := func(st *mapState) [][]DataPatch {
		var out [][]DataPatch
		for i := range slots - 1 {
			from, to := st.key(fmt.Sprintf("/slot/%d", i)), st.key(fmt.Sprintf("/slot/%d", i+1))
			held := false
			out = append(out, []DataPatch{
				SingleDataPatch{Key: from, Func: func(old []byte) ([]byte, bool, error) {
					held = string(old) == "token"
					if !held {
						return nil, false, ErrEtcdSkipGroup
					}
					return nil, true, nil // delete
				}},
				SingleDataPatch{Key: to, Func: func(old []byte) ([]byte, bool, error) {
					if old != nil {
						violations.record(fmt.Errorf("slot %d already holds %q", i+1, old))
						return nil, false, ErrEtcdSkipGroup
					}
					return []byte("token"), true, nil
				}},
				ReadDependency{Key: st.key("/gate")},
				incrPatch(st.key("/moves"), 1),
			})
		}
		return out
	}
	w := mustNewEtcdWorker(t, direct, prefix, chainReactor(false, nil, build, nil), newMapState(prefix),
		WithTxnLimits(6, DefaultTxnMaxBytes), WithPipelineDepth(8), WithLogger(faultLogger(t)))

	// The other worker deletes and recreates keys of its own under the
	// prefix: every delete bumps the counter the first worker compares.
	otherCtx, stopOther := context.WithCancel(ctx)
	defer stopOther()
	var toggles atomic.Int64
	other := mustNewEtcdWorker(t, direct, prefix, ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		k := st.key("/other/x")
		st.patches = append(st.patches, []DataPatch{SingleDataPatch{Key: k, Func: func(old []byte) ([]byte, bool, error) {
			toggles.Add(1)
			if old == nil {
				return []byte("1"), true, nil
			}
			return nil, true, nil
		}}})
		return st, nil
	}), newMapState(prefix), WithLogger(faultLogger(t)))
	otherDone := runAsync(otherCtx, other, nil, 20*time.Millisecond, "other")
	waitUntil(ctx, t, "the other worker to toggle", func() bool { return toggles.Load() > 4 })
	gateCtx, stopGate := context.WithCancel(ctx)
	var gwg sync.WaitGroup
	gwg.Add(1)
	go func() {
		defer gwg.Done()
		for i := 0; gateCtx.Err() == nil; i++ {
			if _, err := direct.Put(gateCtx, prefix+"/gate", strconv.Itoa(i)); err != nil {
				return
			}
			time.Sleep(15 * time.Millisecond)
		}
	}()

	// Several rounds: each Run moves the token along every slot.
	for round := range 3 {
		err := w.Run(ctx, nil, behaviourTick, "mover")
		require.NoError(t, err, "round %d", round)
		kvs, _ := userKVs(ctx, t, direct, prefix, 0)
		tokens := 0
		for k, kv := range kvs {
			if strings.HasPrefix(k, prefix+"/slot/") {
				tokens++
				require.Equal(t, prefix+fmt.Sprintf("/slot/%d", slots-1), k, "round %d: the token stopped at %s", round, k)
				require.Equal(t, "token", kv.value)
			}
		}
		require.Equal(t, 1, tokens, "round %d: tokens in the slots: %d", round, tokens)
		moves, _ := getValue(ctx, t, direct, prefix+"/moves")
		require.Equal(t, strconv.Itoa((round+1)*(slots-1)), moves, "round %d: a move landed twice or not at all", round)
		// Back to slot 0 for the next round.
		_, err = direct.Txn(ctx).Then(clientv3.OpDelete(prefix+fmt.Sprintf("/slot/%d", slots-1)),
			clientv3.OpPut(prefix+"/slot/0", "token")).Commit()
		require.NoError(t, err)
		w = mustNewEtcdWorker(t, direct, prefix, chainReactor(false, nil, build, nil), newMapState(prefix),
			WithTxnLimits(6, DefaultTxnMaxBytes), WithPipelineDepth(8), WithLogger(faultLogger(t)))
	}
	stopGate()
	gwg.Wait()
	stopOther()
	require.ErrorIs(t, recvErr(ctx, t, otherDone), context.Canceled)
	violations.requireNone(t)
}

// ---------------------------------------------------------------------------
// Conflicts that must wait for the watch, and the one that need not.

// TestChainBreakConflictWaitsForTheWatch: a flush of two links; the worker's
// Source is stalled (a proxy blackholes it) before the Txns go out, and
// another client changes a key the second link compares. With only
// SingleDataPatches and key dependencies the second group re-runs at once
// on the values its Txn read back and lands during the stall. With a range
// dependency, a general DataPatch or more than 16 keys it must not: it
// re-runs only once the watch brings the conflicting revision. Either way
// the increment lands exactly once more.
func TestChainBreakConflictWaitsForTheWatch(t *testing.T) {
	t.Parallel()
	type tc struct {
		name    string
		group   func(st *recordingState, incr DataPatch) []DataPatch
		foreign string // the key the other client changes
		landed  string // /x once the group landed
		atOnce  bool
		limits  int // ops per Txn
	}
	cases := []tc{
		{name: "single patches", atOnce: true, foreign: "/x", landed: "11", limits: 4,
			group: func(st *recordingState, incr DataPatch) []DataPatch {
				return []DataPatch{incr, setPatch(st.key("/z"), []byte("z"))}
			}},
		{name: "key dependency", atOnce: true, foreign: "/d", landed: "1", limits: 4,
			group: func(st *recordingState, incr DataPatch) []DataPatch {
				return []DataPatch{incr, ReadDependency{Key: st.key("/d")}}
			}},
		{name: "range dependency", foreign: "/x", landed: "11", limits: 4,
			group: func(st *recordingState, incr DataPatch) []DataPatch {
				return []DataPatch{incr, ReadRangeDependency{Prefix: st.prefix + "/r/"}}
			}},
		{name: "general patch", foreign: "/x", landed: "11", limits: 4,
			group: func(st *recordingState, incr DataPatch) []DataPatch {
				k := st.key("/gen")
				return []DataPatch{incr, patchFunc(func(vm map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
					vm[k] = []byte("g")
					changed[k] = struct{}{}
					return nil
				})}
			}},
		{name: "17 keys", foreign: "/x", landed: "11", limits: 20,
			group: func(st *recordingState, incr DataPatch) []DataPatch {
				g := []DataPatch{incr}
				for i := range 16 {
					g = append(g, setPatch(st.key(fmt.Sprintf("/l/%d", i)), []byte("l")))
				}
				return g
			}},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			env := newTestEnv(t, withProxy())
			ctx := contextWithin(t, chainBreakTimeout)
			prefix := fmt.Sprintf("/test/chainbreak/watch-%d", i)
			if c.foreign == "/x" {
				mustPutKV(ctx, t, env.cli, prefix+"/x", "0")
			}
			src, err := NewSource(env.client(t), prefix)
			require.NoError(t, err)
			var runs atomic.Int64
			entered, release := make(chan struct{}), make(chan struct{})
			reactor := newStepReactor(
				when(always, func(_ context.Context, st *recordingState) error {
					inc := incrPatch(st.key("/x"), 1).(SingleDataPatch)
					incr := SingleDataPatch{Key: inc.Key, Func: func(old []byte) ([]byte, bool, error) {
						if runs.Add(1) == 1 {
							close(entered)
							if err := blockUntil(ctx, release); err != nil {
								return nil, false, err
							}
						}
						return inc.Func(old)
					}}
					// Two keys in the first group: with 20 ops a Txn, it and the 17 keys do not fit together.
					st.group(setPatch(st.key("/a"), []byte("a")), setPatch(st.key("/a2"), []byte("a")))
					st.group(c.group(st, incr)...)
					return nil
				}),
				when(func(st *recordingState) bool { return st.has("/x", c.landed) }, nil),
			)
			w, err := NewEtcdWorker(env.cli, prefix, reactor, newRecordingState(prefix), WithSource(src),
				WithTxnLimits(c.limits, DefaultTxnMaxBytes), WithLogger(faultLogger(t)))
			require.NoError(t, err)
			done := runAsync(ctx, w, nil, behaviourTick, "watch")

			awaitSignal(ctx, t, entered, "the worker never ran its patch")
			env.proxy.Blackhole()
			mustPutKV(ctx, t, env.cli, prefix+c.foreign, "10")
			close(release)
			waitWithin(t, 10*time.Second, "the first group to land", nil, func() bool {
				return etcdSnapshot(ctx, t, env.cli, prefix)["/a"] == "a"
			})
			landed := func() bool { return etcdSnapshot(ctx, t, env.cli, prefix)["/x"] == c.landed }
			if c.atOnce {
				waitWithin(t, 10*time.Second, "the conflict to re-run at once and land during the stall", nil, landed)
				// The barrier: no Tick until the state holds the worker's
				// own last commit, which the stalled watch cannot bring.
				ticks := reactor.ticks.Load()
				time.Sleep(500 * time.Millisecond)
				require.Equal(t, ticks, reactor.ticks.Load(), "a Tick ran before the state had the worker's last commit")
			} else {
				deadline := time.Now().Add(1500 * time.Millisecond)
				for time.Now().Before(deadline) {
					require.False(t, landed(), "the group re-ran at once, without the watch (runs: %d)", runs.Load())
					time.Sleep(50 * time.Millisecond)
				}
				require.EqualValues(t, 1, runs.Load(), "the group re-ran before the watch had the conflict")
			}
			env.proxy.Resume()
			require.NoError(t, recvErr(ctx, t, done))
			require.Equal(t, c.landed, etcdSnapshot(ctx, t, env.cli, prefix)["/x"])
			require.EqualValues(t, 2, runs.Load(), "the increment ran once, then once more after the conflict")
		})
	}
}

// ---------------------------------------------------------------------------
// A bank of chains.

// TestChainBreakBankOfChains: three workers on one prefix, each Tick
// emitting six transfer groups (a Txn each: decrement one account,
// increment another, count the transfer in /w/<id>, and for every other
// group toggle a key of its own, a delete that bumps the counter), with
// depth 8, while another client moves money with CAS Txns and one worker's
// link to etcd is cut now and then (unknown outcomes mid-chain). Every Tick
// checks, on its snapshot, that the money adds up and that /w/<id> counts
// exactly the groups this worker emitted before (exactly once, and the
// barrier). At the end etcd agrees.
func TestChainBreakBankOfChains(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, withProxy())
	ctx := contextWithin(t, 90*time.Second)
	const (
		prefix   = "/test/chainbreak/bank"
		accounts = 6
		workers  = 3
		perTick  = 6
		ticks    = 10
		start    = 100
	)
	for i := range accounts {
		mustPutKV(ctx, t, env.cli, fmt.Sprintf("%s/acct/%d", prefix, i), strconv.Itoa(start))
	}
	var violations violationRecorder
	var finished atomic.Int64
	newWorker := func(id int, cli *clientv3.Client) *EtcdWorker {
		rng := rand.New(rand.NewPCG(uint64(id), 7))
		emitted := int64(0)
		tick := 0
		reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
			st := s.(*mapState)
			tick++
			sum := int64(0)
			for a := range accounts {
				sum += st.int(fmt.Sprintf("/acct/%d", a))
			}
			if sum != accounts*start {
				violations.record(fmt.Errorf("worker %d tick %d: money adds up to %d", id, tick, sum))
			}
			if got := st.int(fmt.Sprintf("/w/%d", id)); got != emitted {
				violations.record(fmt.Errorf("worker %d tick %d: /w/%d = %d, emitted %d", id, tick, id, got, emitted))
			}
			if tick > ticks {
				finished.Add(1)
				return st, ErrReactorFinished
			}
			for g := range perTick {
				from := rng.IntN(accounts)
				to := (from + 1 + rng.IntN(accounts-1)) % accounts
				amount := int64(1 + rng.IntN(5))
				group := []DataPatch{
					incrPatch(st.key(fmt.Sprintf("/acct/%d", from)), -amount),
					incrPatch(st.key(fmt.Sprintf("/acct/%d", to)), amount),
					incrPatch(st.key(fmt.Sprintf("/w/%d", id)), 1),
				}
				if g%2 == 1 {
					k := st.key(fmt.Sprintf("/toggle/%d", id))
					group = append(group, SingleDataPatch{Key: k, Func: func(old []byte) ([]byte, bool, error) {
						if old == nil {
							return []byte("on"), true, nil
						}
						return nil, true, nil
					}})
				}
				st.patches = append(st.patches, group)
			}
			emitted += perTick
			return st, nil
		})
		return mustNewEtcdWorker(t, cli, prefix, reactor, newMapState(prefix),
			WithTxnLimits(6, DefaultTxnMaxBytes), WithPipelineDepth(8), WithRequestTimeout(faultRequestTimeout),
			WithLogger(faultLogger(t)), WithMetrics(env.reg))
	}
	g := newWorkerGroup(t, 80*time.Second)
	for id := range workers {
		cli := env.cli
		if id == 0 {
			cli = env.client(t)
		}
		w := newWorker(id, cli)
		g.run(fmt.Sprintf("bank-%d", id), func(ctx context.Context) error {
			return w.Run(ctx, nil, faultInterval, fmt.Sprintf("bank-%d", id))
		})
	}
	// Another client moves money between accounts 0 and 1.
	g.run("foreign", func(ctx context.Context) error {
		for i := 0; i < 30 && finished.Load() < workers; i++ {
			if err := casTransfer(ctx, env.cli, prefix+"/acct/0", prefix+"/acct/1", int64(i%3+1)); err != nil {
				return err
			}
			time.Sleep(5 * time.Millisecond)
		}
		return nil
	})
	// Cut worker 0's link now and then.
	g.run("cuts", func(ctx context.Context) error {
		for i := 0; i < 8 && finished.Load() < workers && ctx.Err() == nil; i++ {
			time.Sleep(150 * time.Millisecond)
			env.proxy.CutFor(50 * time.Millisecond)
		}
		return nil
	})
	g.requireAllNil(t, 85*time.Second)
	violations.requireNone(t)

	kvs, _ := userKVs(ctx, t, env.cli, prefix, 0)
	sum := int64(0)
	for a := range accounts {
		kv, ok := kvs[fmt.Sprintf("%s/acct/%d", prefix, a)]
		require.True(t, ok)
		sum += mustInt(t, []byte(kv.value))
	}
	require.EqualValues(t, accounts*start, sum, "money created or destroyed")
	for id := range workers {
		kv, ok := kvs[fmt.Sprintf("%s/w/%d", prefix, id)]
		require.True(t, ok)
		require.Equal(t, strconv.Itoa(ticks*perTick), kv.value, "worker %d: transfers landed", id)
	}
	t.Logf("unknown outcomes %v, conflicts %v, resends %v",
		metricSum(t, env.reg, "orchestrator_unknown_commit_outcomes_total"),
		metricSum(t, env.reg, "orchestrator_conflicts_total"),
		metricSum(t, env.reg, "orchestrator_commit_resends_total"))
}

// casTransfer moves amount from key a to key b in one CAS Txn.
func casTransfer(ctx context.Context, cli *clientv3.Client, a, b string, amount int64) error {
	for {
		resp, err := cli.Txn(ctx).Then(clientv3.OpGet(a), clientv3.OpGet(b)).Commit()
		if err != nil {
			return err
		}
		ka := resp.Responses[0].GetResponseRange().GetKvs()
		kb := resp.Responses[1].GetResponseRange().GetKvs()
		if len(ka) != 1 || len(kb) != 1 {
			return errors.New("casTransfer: an account is missing")
		}
		va, err := strconv.ParseInt(string(ka[0].Value), 10, 64)
		if err != nil {
			return err
		}
		vb, err := strconv.ParseInt(string(kb[0].Value), 10, 64)
		if err != nil {
			return err
		}
		txn, err := cli.Txn(ctx).If(
			clientv3.Compare(clientv3.ModRevision(a), "=", ka[0].ModRevision),
			clientv3.Compare(clientv3.ModRevision(b), "=", kb[0].ModRevision),
		).Then(
			clientv3.OpPut(a, strconv.FormatInt(va-amount, 10)),
			clientv3.OpPut(b, strconv.FormatInt(vb+amount, 10)),
		).Commit()
		if err != nil {
			return err
		}
		if txn.Succeeded {
			return nil
		}
	}
}
