package orchestrator

// The shared Source under faults, against a real embedded etcd: failed
// catch-ups and reloads, short-lived keys, dropped workers, workers that
// come and go, quotas, a closed client, late joins, compaction while stuck.

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"weak"

	"github.com/stretchr/testify/require"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/util"
)

// failSwitch makes a recordingState's Update fail on one relative key while
// armed.
type failSwitch struct {
	key   atomic.Pointer[string]
	fired atomic.Int32
}

var errRefusedUpdate = errors.New("test: update refused")

func (f *failSwitch) arm(rel string) { f.key.Store(&rel) }
func (f *failSwitch) disarm()        { f.key.Store(nil) }

func (f *failSwitch) onUpdate(rel string, _ []byte, _ bool) error {
	if k := f.key.Load(); k != nil && *k == rel {
		f.fired.Add(1)
		return errRefusedUpdate
	}
	return nil
}

func finishReactor() Reactor { return finishAtOnce }

// TestSourceDeleteOfAKeyCreatedInAFailedCatchUpReachesTheNextRun: one
// catch-up creates /a and changes /b (one Txn, one revision); Update(/a)
// succeeds, Update(/b) fails and ends Run. /a is then deleted. The next Run
// must tell the state that /a is gone: the state must end equal to etcd.
func TestSourceDeleteOfAKeyCreatedInAFailedCatchUpReachesTheNextRun(t *testing.T) {
	t.Parallel()
	for _, shared := range []bool{false, true} {
		t.Run(fmt.Sprintf("shared=%v", shared), func(t *testing.T) {
			cli := newTestEnv(t).cli
			ctx := testContext(t)
			prefix := "/src-del"
			mustPutKV(ctx, t, cli, prefix+"/x", "0")
			mustPutKV(ctx, t, cli, prefix+"/b", "0")
			var opts []Option
			if shared {
				src := mustNewSource(t, cli, prefix)
				opts = append(opts, WithSource(src))
				otherOnSource(ctx, t, cli, prefix, src) // keeps the Source running throughout
			}
			st := newRecordingState(prefix)
			var fs failSwitch
			st.onUpdate = fs.onUpdate
			w := mustNewEtcdWorker(t, cli, prefix, idleReactor(), st, opts...)
			done := runAsync(ctx, w, nil, behaviourTick, "w")
			require.NoError(t, w.WaitSynced(ctx))

			fs.arm("/b")
			_, err := cli.Txn(ctx).Then(clientv3.OpPut(prefix+"/a", "1"), clientv3.OpPut(prefix+"/b", "1")).Commit()
			require.NoError(t, err)
			require.ErrorIs(t, recvErr(ctx, t, done), errRefusedUpdate)
			require.Contains(t, st.values, "/a", "precondition: Update(/a) succeeded before Update(/b) failed")
			fs.disarm()

			_, err = cli.Delete(ctx, prefix+"/a")
			require.NoError(t, err)
			w.reactor = finishReactor()
			require.NoError(t, runWithin(t, w, 10*time.Second, "w-again"))
			require.Equal(t, etcdSnapshot(ctx, t, cli, prefix), stringValues(st.values),
				"the state ends equal to etcd: the delete of /a must reach it")
		})
	}
}

// TestSourceDeleteAfterTwoFailedFirstSnapshotsReachesTheState: a first
// snapshot fails at /k5 (resume there); /k7 is created; the second Run's
// snapshot tells /k7 and fails at /k9; /k7 is deleted; the third Run must
// tell the state that /k7 is gone.
func TestSourceDeleteAfterTwoFailedFirstSnapshotsReachesTheState(t *testing.T) {
	t.Parallel()
	cli := newTestEnv(t).cli
	ctx := testContext(t)
	const prefix = "/src-del2"
	src, other := followedSource(ctx, t, cli, prefix, "/k1", "/k5", "/k9")

	st := newRecordingState(prefix)
	var fs failSwitch
	st.onUpdate = fs.onUpdate
	w := mustNewEtcdWorker(t, cli, prefix, finishReactor(), st, WithSource(src))
	fs.arm("/k5")
	require.ErrorIs(t, runWithin(t, w, 10*time.Second, "first"), errRefusedUpdate)
	put, err := cli.Put(ctx, prefix+"/k7", "7")
	require.NoError(t, err)
	waitUntil(ctx, t, "the Source has /k7", func() bool { return other.Status().AppliedRevision >= put.Header.Revision })
	fs.arm("/k9")
	require.ErrorIs(t, runWithin(t, w, 10*time.Second, "second"), errRefusedUpdate)
	require.Contains(t, st.values, "/k7", "precondition: the second snapshot told /k7")
	fs.disarm()
	del, err := cli.Delete(ctx, prefix+"/k7")
	require.NoError(t, err)
	waitUntil(ctx, t, "the Source has the delete", func() bool { return other.Status().AppliedRevision >= del.Header.Revision })
	require.NoError(t, runWithin(t, w, 10*time.Second, "third"))
	require.Equal(t, etcdSnapshot(ctx, t, cli, prefix), stringValues(st.values),
		"the state ends equal to etcd: the delete of /k7 must reach it")
}

// TestSourceChangeLogOfAStuckWorkerIsBoundedByKeysWithShortLivedKeys: while
// one worker is stuck in Tick, 3,000 short-lived keys are created and
// deleted (at most one key is live at a time). What the Source holds for the
// stuck worker must be bounded by the keys, not by the events.
func TestSourceChangeLogOfAStuckWorkerIsBoundedByKeysWithShortLivedKeys(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, ownServer())
	cli := env.cli
	ctx := testContext(t)
	const prefix, n = "/src-ephemeral", 3000
	src := mustNewSource(t, cli, prefix)
	release := make(chan struct{})
	var stuckIn atomic.Bool
	var ticks atomic.Int32
	stuck := mustNewEtcdWorker(t, cli, prefix, ReactorFunc(func(ctx context.Context, s ReactorState) (ReactorState, error) {
		if ticks.Add(1) == 1 {
			stuckIn.Store(true)
			if err := blockUntil(ctx, release); err != nil {
				return nil, err
			}
		}
		return s, nil
	}), newMapState(prefix), WithSource(src))
	fast := mustNewEtcdWorker(t, cli, prefix, idleReactor(), newMapState(prefix), WithSource(src))
	g := startWorkerGroup(t, time.Minute, "eph", []*EtcdWorker{stuck, fast})
	waitUntil(ctx, t, "the stuck Tick", stuckIn.Load)
	maxRecords, maxLog := 0, 0
	for i := range n {
		key := fmt.Sprintf("%s/task/%d", prefix, i)
		mustPutKV(ctx, t, cli, key, "x")
		_, err := cli.Delete(ctx, key)
		require.NoError(t, err)
		if i%100 == 99 {
			src.mu.RLock()
			maxRecords, maxLog = max(maxRecords, len(src.changes.changes)), max(maxLog, len(src.changes.log))
			src.mu.RUnlock()
		}
	}
	waitUntil(ctx, t, "the fast worker is current", func() bool { return fast.Status().AppliedRevision >= env.srv.Revision() })
	src.mu.RLock()
	maxRecords, maxLog = max(maxRecords, len(src.changes.changes)), max(maxLog, len(src.changes.log))
	src.mu.RUnlock()
	t.Logf("change log: %d records, %d log entries for at most 1 live key after %d create+delete pairs", maxRecords, maxLog, n)
	// Garbage is swept in rounds of compactMinOver (records of dead keys, and
	// stale log entries), so the bound is a constant for one live key.
	require.LessOrEqual(t, maxRecords, compactMinOver+2, "records bounded by keys, not by events")
	require.LessOrEqual(t, maxLog, 2*(compactMinOver+2), "log bounded by keys, not by events")
	close(release)
	g.stop(t)
}

// TestSourceADroppedWorkerReleasesItsPosition: a worker that ran on a
// Source and was dropped must not be held by the Source ("held weakly: a
// worker that is dropped releases it"), nor keep the change log from being
// pruned.
func TestSourceADroppedWorkerReleasesItsPosition(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	ctx := testContext(t)
	const prefix = "/src-drop"
	src := mustNewSource(t, cli, prefix)
	var cur weak.Pointer[cursor]
	var wp weak.Pointer[EtcdWorker]
	func() {
		w := mustNewEtcdWorker(t, cli, prefix, finishReactor(), newMapState(prefix), WithSource(src))
		require.NoError(t, runWithin(t, w, 10*time.Second, "dropped"))
		cur, wp = weak.Make(w.cur), weak.Make(w)
	}()
	keep := otherOnSource(ctx, t, cli, prefix, src)
	var last int64
	for i := range 50 {
		put, err := cli.Put(ctx, fmt.Sprintf("%s/k%d", prefix, i), "v")
		require.NoError(t, err)
		last = put.Header.Revision
	}
	waitUntil(ctx, t, "keep is current", func() bool { return keep.Status().AppliedRevision >= last })
	waitWithin(t, 5*time.Second, "the dropped worker is collected", nil, func() bool {
		runtime.GC()
		return wp.Value() == nil
	})
	waitWithin(t, 5*time.Second, "the dropped worker's cursor is collected", nil, func() bool {
		runtime.GC()
		return cur.Value() == nil
	})
	mustPutKV(ctx, t, cli, prefix+"/last", "v")
	waitWithin(t, 5*time.Second, "the change log is pruned", nil, func() bool {
		src.mu.RLock()
		defer src.mu.RUnlock()
		return len(src.changes.changes) == 0
	})
}

// pageFailer makes a client answer RangeStream Unimplemented (so loads read
// pinned pages) and, while armed, fail every page of a load after the first
// with codes.Aborted (a transient error the Source retries; clientv3 itself would retry Unavailable and DeadlineExceeded).
type pageFailer struct {
	watchKey string
	armed    atomic.Bool
	failed   atomic.Int32
}

func (p *pageFailer) dialOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithChainStreamInterceptor(noRangeStream),
		grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn,
			invoker grpc.UnaryInvoker, opts ...grpc.CallOption,
		) error {
			if r, ok := req.(*pb.RangeRequest); ok && method == pb.KV_Range_FullMethodName &&
				p.armed.Load() && len(r.RangeEnd) > 0 && string(r.Key) != p.watchKey {
				p.failed.Add(1)
				return status.Error(codes.Aborted, "test: page aborted")
			}
			return invoker(ctx, method, req, reply, cc, opts...)
		}),
	}
}

// TestSourceAReloadThatFailsMidWayIsNeverSeenTorn: a compaction makes the
// Source reload; the reload's first page arrives, the next ones fail for a
// while (the Source retries). A worker must never see a state that mixes
// the reload's revision (the first page) with the old one (the rest): every
// Tick sees the bank's total.
func TestSourceAReloadThatFailsMidWayIsNeverSeenTorn(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, ownServer(), withProxy())
	ctx := testContext(t)
	const prefix, accounts, total = "/src-torn", 10, 1000
	for i := range accounts {
		mustPutKV(ctx, t, env.cli, fmt.Sprintf("%s/a%d", prefix, i), fmt.Sprint(total/accounts))
	}
	pf := &pageFailer{watchKey: prefix + "/"}
	cfg := env.clientConfig(pf.dialOptions()...)
	cfg.MaxCallRecvMsgSize = 256 // the whole prefix does not fit one response: pages
	src := mustNewSource(t, etcdtest.NewClientFromConfig(t, cfg), prefix, WithSourcePageSize(2),
		WithSourceRequestTimeout(faultRequestTimeout), WithSourceMetrics(env.reg), WithSourceLogger(faultLogger(t)))
	var ticks, torn atomic.Int64
	var tornSaw atomic.Pointer[map[string]string]
	w := mustNewEtcdWorker(t, env.cli, prefix, ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		sum := int64(0)
		for rel := range st.values {
			sum += st.int(rel)
		}
		ticks.Add(1)
		if sum != total {
			if torn.Add(1) == 1 {
				snap := map[string]string{}
				for k, v := range st.values {
					snap[k] = string(v)
				}
				tornSaw.Store(&snap)
			}
		}
		return st, nil
	}), newMapState(prefix), WithSource(src), WithLogger(faultLogger(t)))
	g := startSynced(ctx, t, "torn", w)
	waitGrown(t, g, &ticks, 2, "ticks before the outage")

	env.proxy.Pause()
	// A transfer from the first account (first page) to the last one.
	_, err := env.cli.Txn(ctx).Then(
		clientv3.OpPut(prefix+"/a0", fmt.Sprint(total/accounts-50)),
		clientv3.OpPut(prefix+"/a9", fmt.Sprint(total/accounts+50)),
	).Commit()
	require.NoError(t, err)
	mustPutKV(ctx, t, env.cli, "/src-torn-elsewhere", "x") // the compaction must pass the transfer
	_, err = etcdtest.Compact(ctx, env.cli)
	require.NoError(t, err)
	pf.armed.Store(true)
	env.proxy.Resume()
	waitWithin(t, 20*time.Second, "the reload's second page fails", g.failed, func() bool {
		return pf.failed.Load() >= 1
	})
	// Let the Source retry a few times with the first page applied.
	seen := ticks.Load()
	waitWithin(t, 10*time.Second, "the worker ticks while the reload retries", g.failed, func() bool {
		return ticks.Load() > seen+5 || torn.Load() > 0
	})
	pf.armed.Store(false)
	waitWithin(t, 20*time.Second, "the reload completes", g.failed, func() bool {
		return w.Status().AppliedRevision >= headRevision(ctx, t, env.cli)
	})
	g.stop(t)
	if snap := tornSaw.Load(); snap != nil {
		t.Logf("a Tick saw a torn state: %v", *snap)
	}
	require.Zero(t, torn.Load(), "Ticks that saw a state mixing two revisions")
}

// consistencyReactor checks, at every Tick of a mapState, the invariant of
// churnWrites: /x and /y hold the same i, and the /t keys are exactly
// /t/<i-2>../t/<i>. It finishes after ticks Ticks when ticks > 0.
func consistencyReactor(v *violationRecorder, ticks int) Reactor {
	n := 0
	return ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		if err := churnInvariant(st.values); err != nil {
			v.record(err)
		}
		n++
		if ticks > 0 && n >= ticks {
			n = 0
			return st, ErrReactorFinished
		}
		return st, nil
	})
}

func churnInvariant(values map[string][]byte) error {
	x, y := string(values["/x"]), string(values["/y"])
	if x != y {
		return fmt.Errorf("torn: /x=%q /y=%q", x, y)
	}
	if x == "" {
		return nil
	}
	var i int
	if _, err := fmt.Sscan(x, &i); err != nil {
		return err
	}
	want := map[string]bool{}
	for j := max(i-2, 0); j <= i; j++ {
		want[fmt.Sprintf("/t/%d", j)] = true
	}
	got := 0
	for k := range values {
		if len(k) > 3 && k[:3] == "/t/" {
			if !want[k] {
				return fmt.Errorf("at /x=%d: unexpected key %s (a missed delete)", i, k)
			}
			got++
		}
	}
	if got != len(want) {
		return fmt.Errorf("at /x=%d: %d /t keys, want %d", i, got, len(want))
	}
	return nil
}

// churnWrite is round i of churnWrites: one Txn puts /x and /y to i, creates
// /t/i and deletes /t/<i-3>.
func churnWrite(ctx context.Context, cli *clientv3.Client, prefix string, i int) error {
	ops := []clientv3.Op{
		clientv3.OpPut(prefix+"/x", fmt.Sprint(i)), clientv3.OpPut(prefix+"/y", fmt.Sprint(i)),
		clientv3.OpPut(fmt.Sprintf("%s/t/%d", prefix, i), "v"),
	}
	if i >= 3 {
		ops = append(ops, clientv3.OpDelete(fmt.Sprintf("%s/t/%d", prefix, i-3)))
	}
	_, err := cli.Txn(ctx).Then(ops...).Commit()
	return err
}

// TestSourceWorkersJoinAndLeaveWhileWritesFlow: eight workers on one
// Source run and return over and over (each keeps its state between Runs,
// some start fresh), with different intervals, while a writer changes the
// prefix and deletes keys. Every Tick sees a consistent snapshot with no
// missed delete; afterwards every state equals etcd, and once the last
// Run returned, no goroutine is left.
func TestSourceWorkersJoinAndLeaveWhileWritesFlow(t *testing.T) {
	// Not parallel: at its end no goroutine of the package may run.
	cli := sharedClient(t)
	ctx := testContext(t)
	const prefix, workers = "/src-churn", 8
	src := mustNewSource(t, cli, prefix)
	var v violationRecorder
	g := newWorkerGroup(t, time.Minute)
	stop := make(chan struct{})
	var round atomic.Int64
	g.run("writer", func(ctx context.Context) error {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			default:
			}
			if err := churnWrite(ctx, cli, prefix, i); err != nil {
				return err
			}
			round.Store(int64(i))
		}
	})
	states := make([]*mapState, workers)
	ws := make([]*EtcdWorker, workers)
	for i := range workers {
		states[i] = newMapState(prefix)
		ws[i] = mustNewEtcdWorker(t, cli, prefix, consistencyReactor(&v, 3+i), states[i], WithSource(src))
		w, id := ws[i], i
		g.run(fmt.Sprintf("churn-%d", i), func(ctx context.Context) error {
			interval := time.Duration(1+id) * time.Millisecond
			for ctx.Err() == nil {
				select {
				case <-stop:
					return nil
				default:
				}
				if err := w.Run(ctx, nil, interval, fmt.Sprintf("churn-%d", id)); err != nil && ctx.Err() == nil {
					return err
				}
			}
			return nil
		})
	}
	waitWithin(t, 30*time.Second, "rounds of writes", g.failed, func() bool { return round.Load() >= 1500 })
	close(stop)
	for name, err := range g.wait(t, 20*time.Second) {
		require.NoError(t, err, name)
	}
	v.requireNone(t)
	require.False(t, sourceFollowing(src), "the last worker stopped the Source")
	want := etcdSnapshot(ctx, t, cli, prefix)
	for i, w := range ws {
		w.reactor = finishReactor()
		require.NoError(t, runWithin(t, w, 10*time.Second, "final"))
		require.Equal(t, want, stringValues(states[i].values), "worker %d's state equals etcd", i)
	}
	require.False(t, sourceFollowing(src))
	requireNoPackageGoroutines(t)
}

// requireNoPackageGoroutines waits (bounded) until no goroutine but the
// caller's runs code of this package (the embedded server's and the
// clients' goroutines are not the package's).
func requireNoPackageGoroutines(t testing.TB) {
	t.Helper()
	var left []string
	deadline := time.Now().Add(5 * time.Second)
	for {
		buf := make([]byte, 1<<22)
		buf = buf[:runtime.Stack(buf, true)]
		left = left[:0]
		for i, g := range strings.Split(string(buf), "\n\n") {
			// Parallel tests paused until the sequential ones end are not
			// goroutines of the package's code.
			if i > 0 && strings.Contains(g, "github.com/etcdworker/orchestrator.") && !strings.Contains(g, "orchestrator.TestMain") &&
				!strings.Contains(g, "testing.(*T).Parallel(") {
				left = append(left, g)
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(pollInterval)
	}
	require.Empty(t, left, "goroutines of the package left after the last Run returned")
}

// grantPatch is a general DataPatch that takes one slot of a quota: it
// sums the integers under rangePrefix and, below limit, adds one to own.
// With scribble it first edits own's bytes in place (allowed: the values
// are the patch's copies), then decides.
func grantPatch(rangePrefix string, own util.EtcdKey, limit int64, scribble bool) DataPatch {
	return patchFunc(func(vm map[util.EtcdKey][]byte, cs map[util.EtcdKey]struct{}) error {
		var sum int64
		for k, v := range vm {
			if strings.HasPrefix(k.String(), rangePrefix) {
				n, err := strconv.ParseInt(string(v), 10, 64)
				if err != nil {
					return fmt.Errorf("grant: %s=%q: %w", k.String(), v, err)
				}
				sum += n
			}
		}
		n, _ := strconv.ParseInt(string(vm[own]), 10, 64)
		if scribble {
			if v := vm[own]; len(v) > 0 {
				cs[own] = struct{}{}
				for i := range v {
					v[i] = 'X'
				}
			}
		}
		if sum >= limit {
			return ErrEtcdIgnore
		}
		cs[own] = struct{}{}
		vm[own] = []byte(strconv.FormatInt(n+1, 10))
		return nil
	})
}

// TestSourceQuotaWithGeneralPatchesAndRangeDependencyOnOneSource: workers
// on one Source (on its prefix and on the sub-prefix of the quota) take
// slots of a quota of 60 with general DataPatches guarded by a
// ReadRangeDependency on the slots; intervals differ, one Tick is slow, one
// worker is fenced, some patches scribble on their values. Exactly 60 slots
// are taken, no Tick ever sees more, and every state ends equal to etcd.
func TestSourceQuotaWithGeneralPatchesAndRangeDependencyOnOneSource(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	admin := env.cli
	ctx := testContext(t)
	const prefix, limit, workers = "/src-quota", 60, 6
	slots := prefix + "/r/"
	src := mustNewSource(t, admin, prefix)
	fence, err := admin.Put(ctx, "/src-quota-fence", "x")
	require.NoError(t, err)
	var v violationRecorder
	ws := make([]*EtcdWorker, workers)
	states := make([]*mapState, workers)
	for i := range workers {
		wp := prefix
		if i%2 == 1 {
			wp = prefix + "/r" // a worker on the Source's sub-prefix
		}
		st := newMapState(wp)
		states[i] = st
		own := util.NewEtcdKey(fmt.Sprintf("%sw%d", slots, i))
		id := i
		reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
			st := s.(*mapState)
			var sum int64
			for k := range st.values {
				if strings.HasPrefix(st.prefix+k, slots) {
					sum += st.int(k)
				}
			}
			if sum > limit {
				v.record(fmt.Errorf("worker %d saw %d slots taken", id, sum))
			}
			if sum >= limit {
				return st, ErrReactorFinished
			}
			if id == 2 && sum%10 == 5 {
				time.Sleep(300 * time.Millisecond) // a slow Tick
			}
			st.patches = append(st.patches, []DataPatch{ReadRangeDependency{Prefix: slots}, grantPatch(slots, own, limit, id%3 == 0)})
			return st, nil
		})
		opts := []Option{WithSource(src)}
		if i == 4 {
			opts = append(opts, WithFencingKey("/src-quota-fence", fence.Header.Revision))
		}
		ws[i] = mustNewEtcdWorker(t, env.client(t), wp, reactor, st, opts...)
	}
	g := newWorkerGroup(t, time.Minute)
	for i, w := range ws {
		g.run(fmt.Sprintf("quota-%d", i), func(ctx context.Context) error {
			return w.Run(ctx, nil, time.Duration(1+3*i)*time.Millisecond, fmt.Sprintf("quota-%d", i))
		})
	}
	for name, err := range g.wait(t, 50*time.Second) {
		require.NoError(t, err, name)
	}
	v.requireNone(t)
	all := etcdSnapshot(ctx, t, admin, prefix)
	var total int64
	for k, val := range all {
		n, err := strconv.ParseInt(val, 10, 64)
		require.NoError(t, err, "%s=%q", k, val)
		total += n
	}
	require.EqualValues(t, limit, total, "slots taken: %v", all)
	for i, st := range states {
		require.Equal(t, etcdSnapshot(ctx, t, admin, st.prefix), stringValues(st.values), "worker %d's state", i)
	}
}

// strictState is a mapState that records a violation when it is told to
// delete a key it does not hold (a lone worker never does that: it only
// passes deletes of keys it told the state).
type strictState struct {
	*mapState
	v *violationRecorder
}

func (s *strictState) Update(key util.EtcdKey, value []byte, isInit bool) error {
	rel := strings.TrimPrefix(key.String(), s.prefix)
	if _, held := s.values[rel]; value == nil && !held {
		s.v.record(fmt.Errorf("delete of %s, which the state does not hold (isInit=%v)", rel, isInit))
	}
	return s.mapState.Update(key, value, isInit)
}

// TestSourceNoDeleteOfAKeyTheStateNeverHeld: /k is deleted (the worker is
// told), then, while the worker is busy in Tick, created again and deleted
// again. Its next catch-up must not tell it to delete /k, which it does not
// hold. Another worker on the Source is stuck, so the change log keeps it.
func TestSourceNoDeleteOfAKeyTheStateNeverHeld(t *testing.T) {
	t.Parallel()
	cli := newTestEnv(t).cli
	ctx := testContext(t)
	const prefix = "/src-spurious"
	mustPutKV(ctx, t, cli, prefix+"/k", "1")
	mustPutKV(ctx, t, cli, prefix+"/other", "1")
	src := mustNewSource(t, cli, prefix)
	release := make(chan struct{})
	var stuckIn atomic.Bool
	stuck := mustNewEtcdWorker(t, cli, prefix, ReactorFunc(func(ctx context.Context, s ReactorState) (ReactorState, error) {
		stuckIn.Store(true)
		if err := blockUntil(ctx, release); err != nil {
			return nil, err
		}
		return s, nil
	}), newMapState(prefix), WithSource(src))
	var v violationRecorder
	st := &strictState{mapState: newMapState(prefix), v: &v}
	var hold atomic.Bool
	var inTick atomic.Bool
	unhold := make(chan struct{})
	w := mustNewEtcdWorker(t, cli, prefix, ReactorFunc(func(ctx context.Context, s ReactorState) (ReactorState, error) {
		if hold.Load() {
			inTick.Store(true)
			if err := blockUntil(ctx, unhold); err != nil {
				return nil, err
			}
			hold.Store(false)
		}
		return s, nil
	}), st, WithSource(src))
	g := startWorkerGroup(t, time.Minute, "spurious", []*EtcdWorker{stuck, w})
	waitUntil(ctx, t, "the stuck Tick", stuckIn.Load)
	require.NoError(t, w.WaitSynced(ctx))
	del, err := cli.Delete(ctx, prefix+"/k")
	require.NoError(t, err)
	waitUntil(ctx, t, "the worker has the delete", func() bool { return w.Status().AppliedRevision >= del.Header.Revision })
	hold.Store(true)
	waitUntil(ctx, t, "the worker is in Tick", inTick.Load)
	mustPutKV(ctx, t, cli, prefix+"/k", "2")
	del, err = cli.Delete(ctx, prefix+"/k")
	require.NoError(t, err)
	waitUntil(ctx, t, "the Source has both", func() bool { return src.copyRev() >= del.Header.Revision })
	close(unhold)
	waitUntil(ctx, t, "the worker caught up", func() bool { return w.Status().AppliedRevision >= del.Header.Revision })
	close(release)
	g.stop(t)
	v.requireNone(t)
}

// TestSourceAClosedSourceClientEndsEveryWorker: the Source's own client is
// closed while workers (each committing through a client of its own) run
// on it: every Run ends with ErrEtcdRejected, the Source stops.
func TestSourceAClosedSourceClientEndsEveryWorker(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := testContext(t)
	const prefix = "/src-closed"
	srcCli := env.client(t)
	src := mustNewSource(t, srcCli, prefix)
	ws := make([]*EtcdWorker, 3)
	for i := range ws {
		var queued atomic.Int64
		ws[i] = mustNewEtcdWorker(t, env.client(t), prefix, counterReactor(&queued), newMapState(prefix), WithSource(src))
	}
	g := startSynced(ctx, t, "closed", ws...)
	require.NoError(t, srcCli.Close())
	for name, err := range g.wait(t, 10*time.Second) {
		require.ErrorIs(t, err, ErrEtcdRejected, name)
	}
	require.False(t, sourceFollowing(src))
}

// TestSourceLateJoinerStatusAndWaitSynced: a worker that joins a running
// Source is Synced after WaitSynced, at the copy's revision (which includes
// a write made just before it joined), and Ready.
func TestSourceLateJoinerStatusAndWaitSynced(t *testing.T) {
	t.Parallel()
	cli := newTestEnv(t).cli
	ctx := testContext(t)
	const prefix = "/src-latestatus"
	src := mustNewSource(t, cli, prefix)
	first := mustNewEtcdWorker(t, cli, prefix, idleReactor(), newMapState(prefix), WithSource(src))
	g := startSynced(ctx, t, "first", first)
	put, err := cli.Put(ctx, prefix+"/a", "1")
	require.NoError(t, err)
	rev := put.Header.Revision
	waitUntil(ctx, t, "the Source has the write", func() bool { return src.copyRev() >= rev })
	late := mustNewEtcdWorker(t, cli, prefix, idleReactor(), newMapState(prefix), WithSource(src))
	require.False(t, late.Status().Synced)
	lateCtx, stopLate := context.WithCancel(ctx)
	defer stopLate()
	done := runAsync(lateCtx, late, nil, behaviourTick, "late")
	require.NoError(t, late.WaitSynced(ctx))
	s := late.Status()
	require.True(t, s.Synced)
	require.GreaterOrEqual(t, s.AppliedRevision, rev)
	waitUntil(ctx, t, "the late worker is ready", func() bool { return late.Ready() == nil })
	g.stop(t)
	require.True(t, sourceFollowing(src), "the late worker still runs the Source")
	stopLate()
	require.ErrorIs(t, recvErr(ctx, t, done), context.Canceled)
	require.False(t, sourceFollowing(src))
}

// slowState is a mapState whose Update blocks while gate is closed.
type slowState struct {
	*mapState
	blocked atomic.Bool
	gate    chan struct{}
	ctx     context.Context
}

func (s *slowState) Update(key util.EtcdKey, value []byte, isInit bool) error {
	if s.blocked.Load() {
		s.blocked.Store(false)
		if err := blockUntil(s.ctx, s.gate); err != nil {
			return err
		}
	}
	return s.mapState.Update(key, value, isInit)
}

// TestSourceCompactionWhileAWorkerIsStuckInUpdate: one worker is stuck in
// Update while the Source reloads after a compaction (keys changed and
// deleted meanwhile) and another worker commits; the other ticks on, and
// the stuck one, released, ends equal to etcd.
func TestSourceCompactionWhileAWorkerIsStuckInUpdate(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, ownServer(), withProxy())
	ctx := testContext(t)
	const prefix = "/src-stuckupd"
	for i := range 20 {
		mustPutKV(ctx, t, env.cli, fmt.Sprintf("%s/k%02d", prefix, i), "0")
	}
	src := mustNewSource(t, env.client(t), prefix, WithSourceRequestTimeout(faultRequestTimeout), WithSourceMetrics(env.reg))
	slow := &slowState{mapState: newMapState(prefix), gate: make(chan struct{}), ctx: ctx}
	stuck := mustNewEtcdWorker(t, env.cli, prefix, idleReactor(), slow, WithSource(src))
	var queued atomic.Int64
	var stopBusy atomic.Bool
	var idleTick atomic.Int64 // ticks of the busy worker after it stopped queueing
	busyReactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		if stopBusy.Load() {
			idleTick.Add(1) // every patch it left before was committed: a Tick runs only then
			return st, nil
		}
		st.patches = append(st.patches, []DataPatch{incrPatch(st.key("/n"), 1)})
		queued.Add(1)
		return st, nil
	})
	busy := mustNewEtcdWorker(t, env.cli, prefix, busyReactor, newMapState(prefix), WithSource(src))
	g := startSynced(ctx, t, "stuckupd", stuck, busy)
	slow.blocked.Store(true)
	mustPutKV(ctx, t, env.cli, prefix+"/k00", "trigger")
	waitUntil(ctx, t, "the stuck Update", func() bool { return !slow.blocked.Load() })
	reloadByCompaction(ctx, t, env, func() {
		for i := 1; i < 10; i++ {
			_, err := env.cli.Delete(ctx, fmt.Sprintf("%s/k%02d", prefix, i))
			require.NoError(t, err)
		}
		mustPutKV(ctx, t, env.cli, prefix+"/k15", "changed")
		mustPutKV(ctx, t, env.cli, prefix+"/new", "1")
	})
	waitWithin(t, 20*time.Second, "the Source reloads", g.failed, func() bool {
		return metricSum(t, env.reg, "orchestrator_source_reloads_total") >= 1
	})
	waitGrown(t, g, &queued, 20, "the busy worker ticks and commits while the other is stuck")
	close(slow.gate)
	// Stop the busy worker's writes, so that etcd holds still while the
	// stuck worker catches up.
	stopBusy.Store(true)
	waitWithin(t, 20*time.Second, "the busy worker stops writing", g.failed, func() bool { return idleTick.Load() > 0 })
	last := headRevision(ctx, t, env.cli)
	waitWithin(t, 20*time.Second, "the stuck worker catches up", g.failed, func() bool {
		return stuck.Status().AppliedRevision >= last
	})
	g.stop(t)
	require.Equal(t, etcdSnapshot(ctx, t, env.cli, prefix), stringValues(slow.values))
}
