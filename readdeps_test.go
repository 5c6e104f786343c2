package orchestrator

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"golang.org/x/sync/errgroup"

	"github.com/etcdworker/orchestrator/util"
)

// rdPatch adapts a function to DataPatch.
type rdPatch func(values map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error

func (f rdPatch) Patch(values map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
	return f(values, changed)
}

// rdBarrier lets n patches pass only once all n have arrived, so that they
// all read the same state before any of them commits.
type rdBarrier struct {
	mu      sync.Mutex
	arrived int
	n       int
	all     chan struct{}
}

func newRDBarrier(n int) *rdBarrier { return &rdBarrier{n: n, all: make(chan struct{})} }

func (b *rdBarrier) wait(ctx context.Context) error {
	b.mu.Lock()
	b.arrived++
	if b.arrived == b.n {
		close(b.all)
	}
	b.mu.Unlock()
	select {
	case <-b.all:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// rdReserve is the group of one reservation by worker id, number n: reserve
// one unit at prefix/res/<id>/<n> if the reservations under prefix/res/ leave
// room under prefix/capacity, else skip the group. The first run of each
// worker's first reservation waits at the barrier.
func rdReserve(ctx context.Context, prefix string, id, n int, withDeps bool, b *rdBarrier, first *bool) []DataPatch {
	resDir := prefix + "/res/"
	capKey := util.NewEtcdKey(prefix + "/capacity")
	key := util.NewEtcdKey(fmt.Sprintf("%s%d/%d", resDir, id, n))
	reserve := rdPatch(func(values map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
		capacity, err := strconv.Atoi(string(values[capKey]))
		if err != nil {
			return err
		}
		used := 0
		for k := range values {
			if strings.HasPrefix(k.String(), resDir) {
				used++
			}
		}
		if *first {
			*first = false
			if err := b.wait(ctx); err != nil {
				return err
			}
		}
		if used+1 > capacity {
			return ErrEtcdSkipGroup
		}
		values[key] = []byte("1")
		changed[key] = struct{}{}
		return nil
	})
	if !withDeps {
		return []DataPatch{reserve}
	}
	return []DataPatch{ReadRangeDependency{Prefix: resDir}, ReadDependency{Key: capKey}, reserve}
}

// rdRunReservations runs workers that each try attempts reservations of one
// unit against capacity and returns how many reservations etcd holds.
func rdRunReservations(t *testing.T, prefix string, withDeps bool) int {
	const (
		workers  = 4
		attempts = 3
		capacity = 2
	)
	env := newTestEnv(t)
	ctx := testContext(t)
	cli := env.cli
	_, err := cli.Put(ctx, prefix+"/capacity", strconv.Itoa(capacity))
	require.NoError(t, err)
	b := newRDBarrier(workers)
	g, gctx := errgroup.WithContext(ctx)
	for id := range workers {
		done, first := 0, true
		reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
			st := s.(*rdState)
			if done == attempts {
				return st, ErrReactorFinished
			}
			st.patches = append(st.patches, rdReserve(gctx, prefix, id, done, withDeps, b, &first))
			done++
			return st, nil
		})
		w := mustNewEtcdWorker(t, env.client(t), prefix, reactor, &rdState{})
		g.Go(func() error { return w.Run(gctx, nil, 5*time.Millisecond, "reserve") })
	}
	require.NoError(t, g.Wait())
	resp, err := cli.Get(ctx, prefix+"/res/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	require.NoError(t, err)
	t.Logf("deps=%v: %d workers x %d attempts, capacity %d: %d reservations, oversold by %d",
		withDeps, workers, attempts, capacity, resp.Count, max(0, int(resp.Count)-capacity))
	return int(resp.Count)
}

// TestRangeDependencyPreventsOversell: four workers read the same empty
// reservation range (a barrier holds each worker's first patch until all
// have read it) and each reserves a unit under a capacity of 2. Without a
// dependency on the range every write is to a fresh key, no compare fails
// and all four land: oversold. With ReadRangeDependency the first commit
// makes the others' range compare fail; they re-run on the new state and
// exactly the capacity is reserved.
func TestRangeDependencyPreventsOversell(t *testing.T) {
	t.Parallel()
	t.Run("without dependency oversells", func(t *testing.T) {
		require.Greater(t, rdRunReservations(t, "/test/rd-unsafe", false), 2)
	})
	t.Run("with range dependency never oversells", func(t *testing.T) {
		require.Equal(t, 2, rdRunReservations(t, "/test/rd-safe", true))
	})
}

// TestKeyDependencyReRunsOnChange: a group copies key A into key B and
// depends on A. While the patch runs for the first time another client
// changes A; the commit must not land with the stale copy: the group re-runs
// and B ends with A's new value. Without the dependency B keeps the stale
// value (a key only read is not compared).
func TestKeyDependencyReRunsOnChange(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name     string
		withDeps bool
		wantB    string
		wantRuns int32
	}{
		{"with dependency the group re-runs", true, "2", 2},
		{"without dependency the stale copy lands", false, "1", 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			const prefix = "/test/rd-key"
			env := newTestEnv(t)
			ctx := testContext(t)
			cli := env.cli
			clearPrefix(ctx, t, cli, prefix)
			_, err := cli.Put(ctx, prefix+"/a", "1")
			require.NoError(t, err)
			keyA, keyB := util.NewEtcdKey(prefix+"/a"), util.NewEtcdKey(prefix+"/b")
			var runs atomic.Int32
			copyA := rdPatch(func(values map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
				a := values[keyA]
				if runs.Add(1) == 1 {
					if _, err := cli.Put(ctx, prefix+"/a", "2"); err != nil {
						return err
					}
				}
				values[keyB] = a
				changed[keyB] = struct{}{}
				return nil
			})
			group := []DataPatch{copyA}
			if tt.withDeps {
				group = append(group, ReadDependency{Key: keyA})
			}
			require.NoError(t, rdRunOnce(ctx, t, env.client(t), prefix, group))
			resp, err := cli.Get(ctx, prefix+"/b")
			require.NoError(t, err)
			require.Len(t, resp.Kvs, 1)
			require.Equal(t, tt.wantB, string(resp.Kvs[0].Value))
			require.Equal(t, tt.wantRuns, runs.Load())
		})
	}
}

// rdRunOnce runs a worker that queues group on its first Tick and finishes
// once it is committed; it returns Run's error.
func rdRunOnce(ctx context.Context, t *testing.T, cli *clientv3.Client, prefix string, group []DataPatch,
	opts ...Option) error {
	t.Helper()
	return rdOnceWorker(t, cli, prefix, group, opts...).Run(ctx, nil, 10*time.Millisecond, "rd")
}

// rdOnceWorker returns a worker that queues group on its first Tick and
// finishes once it is committed.
func rdOnceWorker(t *testing.T, cli *clientv3.Client, prefix string, group []DataPatch, opts ...Option) *EtcdWorker {
	t.Helper()
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*rdState)
		st.patches = append(st.patches, group)
		return st, ErrReactorFinished
	})
	w := mustNewEtcdWorker(t, cli, prefix, reactor, &rdState{}, opts...)
	return w
}

// TestDependenciesCountAgainstTheOpLimit: with an op limit of 8 the worker
// leaves 6 compares to a group (2 are its own). Dependency compares count: a
// group at exactly 6 lands, one more dependency fails the whole group with
// ErrEtcdTxnOpsExceed and writes nothing. A key both written and depended on,
// or a dependency declared twice, takes one compare.
func TestDependenciesCountAgainstTheOpLimit(t *testing.T) {
	t.Parallel()
	const prefix = "/test/rd-limit"
	k := func(name string) util.EtcdKey { return util.NewEtcdKey(prefix + "/" + name) }
	put := func(name string) DataPatch {
		return SingleDataPatch{Key: k(name), Func: func([]byte) ([]byte, bool, error) { return []byte("v"), true, nil }}
	}
	dep := func(name string) DataPatch { return ReadDependency{Key: k(name)} }
	rng := ReadRangeDependency{Prefix: prefix + "/r/"}
	for _, tt := range []struct {
		name    string
		group   []DataPatch
		wantErr error
	}{
		{"exactly at the limit", []DataPatch{put("w1"), put("w2"), dep("d1"), dep("d2"), dep("d3"), rng}, nil},
		{"written and depended-on key counts once",
			[]DataPatch{dep("w1"), put("w1"), put("w2"), dep("d1"), dep("d2"), dep("d3"), rng, dep("w2")}, nil},
		{"repeated dependencies count once",
			[]DataPatch{put("w1"), put("w2"), dep("d1"), dep("d2"), dep("d3"), rng, dep("d1"), rng}, nil},
		{"one dependency over the limit",
			[]DataPatch{put("w1"), put("w2"), dep("d1"), dep("d2"), dep("d3"), dep("d4"), rng}, ErrEtcdTxnOpsExceed},
		{"one range over the limit",
			[]DataPatch{put("w1"), put("w2"), dep("d1"), dep("d2"), dep("d3"), rng,
				ReadRangeDependency{Prefix: prefix + "/s/"}}, ErrEtcdTxnOpsExceed},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ctx := testContext(t)
			clearPrefix(ctx, t, sharedClient(t), prefix)
			err := rdRunOnce(ctx, t, sharedClient(t), prefix, tt.group, WithTxnLimits(8, DefaultTxnMaxBytes))
			resp, gerr := sharedClient(t).Get(ctx, prefix+"/w", clientv3.WithPrefix(), clientv3.WithCountOnly())
			require.NoError(t, gerr)
			if tt.wantErr != nil {
				require.ErrorIs(t, err, tt.wantErr)
				require.Zero(t, resp.Count, "nothing of the group may be written")
				return
			}
			require.NoError(t, err)
			require.EqualValues(t, 2, resp.Count)
		})
	}
}

// TestDependencyOutsidePrefixIsRejected: a dependency on a key or range
// outside the prefix or in the reserved area ends Run with
// ErrKeyOutsidePrefix before anything is written.
func TestDependencyOutsidePrefixIsRejected(t *testing.T) {
	t.Parallel()
	const prefix = "/test/rd-outside"
	put := SingleDataPatch{Key: util.NewEtcdKey(prefix + "/w"),
		Func: func([]byte) ([]byte, bool, error) { return []byte("v"), true, nil }}
	for _, d := range []DataPatch{
		ReadDependency{Key: util.NewEtcdKey("/elsewhere/a")},
		ReadDependency{Key: util.NewEtcdKey(keysOf(prefix).counterKey)},
		ReadRangeDependency{Prefix: prefix},
		ReadRangeDependency{Prefix: prefix + reservedDir},
		&ReadRangeDependency{Prefix: "/elsewhere/"},
	} {
		ctx := testContext(t)
		err := rdRunOnce(ctx, t, sharedClient(t), prefix, []DataPatch{d, put})
		require.ErrorIs(t, err, ErrKeyOutsidePrefix, "%#v", d)
		resp, gerr := sharedClient(t).Get(ctx, prefix+"/w")
		require.NoError(t, gerr)
		require.Empty(t, resp.Kvs)
	}
}

// TestPackTxnsCountsDependencies checks the packing of groups with
// dependencies: shared dependencies take one compare, a dependency on a key
// the batch writes takes none, dependencies of a group that writes nothing
// are dropped, a batch splits exactly when the compares exceed the limit,
// and the byte count is exactly what the batch's compares and ops cost.
func TestPackTxnsCountsDependencies(t *testing.T) {
	t.Parallel()
	l := txnLimits{maxOps: 8, maxBytes: 1 << 20, overheadOps: 2} // 6 compares per Txn
	w := func(i int) groupWrites { return groupWrites{{key: rdKey(i), value: []byte("v")}} }
	d := func(prefixes []string, keys ...int) groupDeps {
		gd := groupDeps{prefixes: prefixes}
		for _, k := range keys {
			gd.keys = append(gd.keys, rdKey(k))
		}
		return gd
	}
	for _, tt := range []struct {
		name      string
		groups    []groupWrites
		deps      []groupDeps
		spans     [][2]int
		firstDeps []util.EtcdKey
	}{
		{"shared dependency compared once", []groupWrites{w(0), w(3)}, []groupDeps{d(nil, 1, 2), d(nil, 1, 4)},
			[][2]int{{0, 2}}, []util.EtcdKey{rdKey(1), rdKey(2), rdKey(4)}},
		{"dependency written by a later group", []groupWrites{w(0), w(1)}, []groupDeps{d(nil, 1, 2, 3), d(nil, 4)},
			[][2]int{{0, 2}}, []util.EtcdKey{rdKey(2), rdKey(3), rdKey(4)}},
		{"exactly six compares", []groupWrites{w(0), w(5)}, []groupDeps{d(nil, 1, 2, 3, 4)},
			[][2]int{{0, 2}}, []util.EtcdKey{rdKey(1), rdKey(2), rdKey(3), rdKey(4)}},
		{"seven compares split", []groupWrites{w(0), w(5)}, []groupDeps{d(nil, 1, 2, 3, 4), d(nil, 6)},
			[][2]int{{0, 1}, {1, 2}}, []util.EtcdKey{rdKey(1), rdKey(2), rdKey(3), rdKey(4)}},
		{"range compared once", []groupWrites{w(0), w(1)}, []groupDeps{d([]string{"/b/"}), d([]string{"/b/"}, 2)},
			[][2]int{{0, 2}}, []util.EtcdKey{rdKey(2)}},
		{"no writes, no dependencies", []groupWrites{{}, w(0)}, []groupDeps{d([]string{"/b/"}, 1, 2, 3, 4, 5, 6), {}},
			[][2]int{{0, 2}}, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			for i, g := range tt.groups {
				var gd groupDeps
				if i < len(tt.deps) {
					gd = tt.deps[i]
				}
				require.NoError(t, checkGroupFits(g, gd.without(g), l))
			}
			out := packTxns(tt.groups, tt.deps, l)
			spans := make([][2]int, 0, len(out))
			for _, b := range out {
				spans = append(spans, [2]int{b.start, b.end})
			}
			require.Equal(t, tt.spans, spans)
			require.Equal(t, tt.firstDeps, out[0].depKeys)
			for _, b := range out {
				ops := len(b.writes) + len(b.depKeys) + len(b.prefixes) + l.overheadOps
				require.LessOrEqual(t, ops, l.maxOps)
				require.Equal(t, ops, b.cost.ops(l))
				want := 0
				for _, kw := range b.writes {
					want += writeSize(kw)
				}
				for _, k := range b.depKeys {
					want += depKeySize(k)
				}
				for _, p := range b.prefixes {
					want += depRangeSize(p)
				}
				require.Equal(t, want, b.cost.bytes)
			}
		})
	}
}

// rdKey is the test key number i.
func rdKey(i int) util.EtcdKey { return util.NewEtcdKey(fmt.Sprintf("/b/k%02d", i)) }

// TestSkipGroupUndoesTheWholeGroup: ErrEtcdSkipGroup from any patch drops
// what the group's earlier patches changed (on the single-key fast path and
// on the value map alike); the next group sees the committed values.
func TestSkipGroupUndoesTheWholeGroup(t *testing.T) {
	t.Parallel()
	single := func(key string, value string, err error) DataPatch {
		return SingleDataPatch{Key: util.NewEtcdKey(key), Func: func([]byte) ([]byte, bool, error) {
			return []byte(value), err == nil, err
		}}
	}
	general := func(key string, value string, err error) DataPatch {
		return rdPatch(func(values map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
			values[util.NewEtcdKey(key)] = []byte(value)
			changed[util.NewEtcdKey(key)] = struct{}{}
			return err
		})
	}
	for _, tt := range []struct {
		name  string
		group []DataPatch
	}{
		{"single patches", []DataPatch{single("/p/a", "x", nil), single("/p/b", "x", nil), single("/p/a", "", ErrEtcdSkipGroup)}},
		{"single then general", []DataPatch{single("/p/a", "x", nil), general("/p/b", "x", nil), single("/p/c", "", ErrEtcdSkipGroup)}},
		{"general fails after a change", []DataPatch{general("/p/a", "x", nil), general("/p/b", "x", ErrEtcdSkipGroup)}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			state := &rdState{}
			tester := NewReactorStateTester(t, state, map[string]string{"/p/a": "0"})
			var seen string
			next := SingleDataPatch{Key: util.NewEtcdKey("/p/a"), Func: func(old []byte) ([]byte, bool, error) {
				seen = string(old)
				return []byte(seen + "+1"), true, nil
			}}
			state.patches = [][]DataPatch{tt.group, {next}}
			tester.MustApplyPatches()
			require.Equal(t, "0", seen)
			require.Equal(t, map[string]string{"/p/a": "0+1"}, tester.KVEntries())
		})
	}
}

// TestDependenciesOnEarlierTxnsOfOneFlush: with room for two compares per
// Txn, one Tick's two groups go out as two Txns of one flush, the second
// depending on what the first wrote. A key dependency compares the revision
// the first Txn wrote and lands at once; a range dependency over keys the
// first Txn wrote is held back until the state has the first commit (a
// bound above the snapshot would let through keys others put in between),
// then lands. Neither is a conflict.
func TestDependenciesOnEarlierTxnsOfOneFlush(t *testing.T) {
	t.Parallel()
	const prefix = "/test/rd-flush"
	put := func(name string) DataPatch {
		return SingleDataPatch{Key: util.NewEtcdKey(prefix + name),
			Func: func([]byte) ([]byte, bool, error) { return []byte("v"), true, nil }}
	}
	for _, tt := range []struct {
		name string
		dep  DataPatch
	}{
		{"key dependency", ReadDependency{Key: util.NewEtcdKey(prefix + "/r/a")}},
		{"range dependency", ReadRangeDependency{Prefix: prefix + "/r/"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ctx := testContext(t)
			clearPrefix(ctx, t, sharedClient(t), prefix)
			reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
				st := s.(*rdState)
				st.patches = append(st.patches, []DataPatch{put("/r/a"), put("/r/b")}, []DataPatch{put("/x"), tt.dep})
				return st, ErrReactorFinished
			})
			w := mustNewEtcdWorker(t, sharedClient(t), prefix, reactor, &rdState{}, WithTxnLimits(4, DefaultTxnMaxBytes))
			require.NoError(t, w.Run(ctx, nil, 10*time.Millisecond, "rd-flush"))
			resp, err := sharedClient(t).Get(ctx, prefix+"/x")
			require.NoError(t, err)
			require.Len(t, resp.Kvs, 1)
			require.Zero(t, testutil.ToFloat64(w.metrics.conflicts.WithLabelValues("rd-flush")), "conflicts")
			require.Equal(t, float64(2), testutil.ToFloat64(w.metrics.commits.WithLabelValues("rd-flush")), "Txns")
		})
	}
}

// TestRangeDependencyMissesForeignDeletes pins the documented limit: a key
// deleted inside a depended-on range by a client that is not a worker on the
// prefix leaves nothing for a ModRevision compare to see, so the group lands
// on what it read. A key dependency on the same key does notice the delete.
func TestRangeDependencyMissesForeignDeletes(t *testing.T) {
	t.Parallel()
	const prefix = "/test/rd-delete"
	for _, tt := range []struct {
		name     string
		dep      DataPatch
		wantX    string
		wantRuns int32
	}{
		{"range dependency misses it", ReadRangeDependency{Prefix: prefix + "/r/"}, "1", 1},
		{"key dependency sees it", ReadDependency{Key: util.NewEtcdKey(prefix + "/r/a")}, "0", 2},
	} {
		t.Run(tt.name, func(t *testing.T) {
			env := newTestEnv(t)
			ctx := testContext(t)
			cli := env.cli
			clearPrefix(ctx, t, cli, prefix)
			_, err := cli.Put(ctx, prefix+"/r/a", "1")
			require.NoError(t, err)
			var runs atomic.Int32
			count := rdPatch(func(values map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
				n := 0
				for k := range values {
					if strings.HasPrefix(k.String(), prefix+"/r/") {
						n++
					}
				}
				if runs.Add(1) == 1 {
					if _, err := cli.Delete(ctx, prefix+"/r/a"); err != nil {
						return err
					}
				}
				x := util.NewEtcdKey(prefix + "/x")
				values[x] = []byte(strconv.Itoa(n))
				changed[x] = struct{}{}
				return nil
			})
			require.NoError(t, rdRunOnce(ctx, t, env.client(t), prefix, []DataPatch{tt.dep, count}))
			resp, err := cli.Get(ctx, prefix+"/x")
			require.NoError(t, err)
			require.Len(t, resp.Kvs, 1)
			require.Equal(t, tt.wantX, string(resp.Kvs[0].Value))
			require.Equal(t, tt.wantRuns, runs.Load())
		})
	}
}

func rdPut(key string) DataPatch {
	return SingleDataPatch{Key: util.NewEtcdKey(key), Func: func([]byte) ([]byte, bool, error) { return []byte("v"), true, nil }}
}

// TestAbsentKeyDependencyCatchesACreate: a group depends on a key
// that is absent when its patch runs; another client creates it before the
// commit. The commit must fail and the group re-run and see the key.
func TestAbsentKeyDependencyCatchesACreate(t *testing.T) {
	t.Parallel()
	const prefix = "/test/rd-absent"
	ctx := testContext(t)
	cli := sharedClient(t)
	var runs atomic.Int32
	dep := util.NewEtcdKey(prefix + "/flag")
	decide := rdPatch(func(values map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
		if runs.Add(1) == 1 {
			if _, err := cli.Put(ctx, dep.String(), "on"); err != nil {
				return err
			}
		}
		if _, ok := values[dep]; ok {
			return ErrEtcdSkipGroup // the flag exists: do nothing
		}
		x := util.NewEtcdKey(prefix + "/x")
		values[x], changed[x] = []byte("written without flag"), struct{}{}
		return nil
	})
	require.NoError(t, rdRunOnce(ctx, t, cli, prefix, []DataPatch{ReadDependency{Key: dep}, decide}))
	resp, err := cli.Get(ctx, prefix+"/x")
	require.NoError(t, err)
	require.Empty(t, resp.Kvs, "the group must not land on a state without the flag")
	require.Equal(t, int32(2), runs.Load())
}

// TestDependencyOnlyGroupsWriteNothing: groups made of dependencies
// only (key, range, both) send no Txn and do not fail Run.
func TestDependencyOnlyGroupsWriteNothing(t *testing.T) {
	t.Parallel()
	const prefix = "/test/rd-deponly"
	ctx := testContext(t)
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*rdState)
		st.patches = append(st.patches,
			[]DataPatch{ReadDependency{Key: util.NewEtcdKey(prefix + "/a")}},
			[]DataPatch{ReadRangeDependency{Prefix: prefix + "/r/"}},
			[]DataPatch{&ReadDependency{Key: util.NewEtcdKey(prefix + "/a")}, &ReadRangeDependency{Prefix: prefix + "/"}})
		return st, ErrReactorFinished
	})
	w := mustNewEtcdWorker(t, sharedClient(t), prefix, reactor, &rdState{})
	require.NoError(t, w.Run(ctx, nil, 10*time.Millisecond, "deponly"))
	require.Zero(t, testutil.ToFloat64(w.metrics.commits.WithLabelValues("deponly")))
}

// TestRangeOverTheWholePrefixLands: a range dependency on the worker
// prefix + "/" itself covers the reserved area (the worker's own token and
// delete counter). Repeated commits of one worker, with and without a session,
// must land without livelock, deletes included.
func TestRangeOverTheWholePrefixLands(t *testing.T) {
	t.Parallel()
	const prefix = "/test/rd-whole"
	ctx := testContext(t)
	cli := sharedClient(t)
	for _, withSession := range []bool{false, true} {
		t.Run(fmt.Sprintf("session=%v", withSession), func(t *testing.T) {
			cycles := 0
			reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
				st := s.(*rdState)
				if cycles == 6 {
					return st, ErrReactorFinished
				}
				k := fmt.Sprintf("%s/k%d", prefix, cycles%2)
				p := rdPut(k)
				if cycles%3 == 2 {
					p = deletePatch(util.NewEtcdKey(k))
				}
				st.patches = append(st.patches, []DataPatch{ReadRangeDependency{Prefix: prefix + "/"}, p})
				cycles++
				return st, nil
			})
			w, err := NewEtcdWorker(cli, prefix, reactor, &rdState{})
			require.NoError(t, err)
			var session *concurrency.Session
			if withSession {
				session, err = concurrency.NewSession(cli, concurrency.WithTTL(5))
				require.NoError(t, err)
				defer session.Close()
			}
			rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			require.NoError(t, w.Run(rctx, session, 5*time.Millisecond, "whole"))
		})
	}
}

// TestOpEstimateMatchesTheServer: with the server's --max-txn-ops
// equal to the worker's op limit, a fenced worker bound to a session commits
// groups with writes, deletes and growing numbers of dependencies. Each
// either lands or fails with ErrEtcdTxnOpsExceed before sending: never does
// etcd reject the Txn as too large.
func TestOpEstimateMatchesTheServer(t *testing.T) {
	t.Parallel()
	const prefix, limit = "/test/rd-ops", 8
	env := newTestEnv(t, withMaxTxnOps(limit))
	ctx := testContext(t)
	cli := env.cli
	fence, err := cli.Put(ctx, "/test/rd-ops-fence", "x")
	require.NoError(t, err)
	session, err := concurrency.NewSession(cli, concurrency.WithTTL(5))
	require.NoError(t, err)
	defer session.Close()
	for n := 0; n <= limit; n++ {
		mustPutKV(ctx, t, cli, prefix+"/gone", "1") // the group deletes it: the delete counter is written too
		group := []DataPatch{rdPut(fmt.Sprintf("%s/w%d", prefix, n)), deletePatch(util.NewEtcdKey(prefix + "/gone")),
			ReadRangeDependency{Prefix: prefix + "/r/"}}
		for i := range n {
			group = append(group, ReadDependency{Key: util.NewEtcdKey(fmt.Sprintf("%s/d%d", prefix, i))})
		}
		err := rdRunOnceSession(ctx, t, cli, prefix, session, group,
			WithTxnLimits(limit, DefaultTxnMaxBytes), WithFencingKey("/test/rd-ops-fence", fence.Header.Revision))
		if err != nil {
			require.ErrorIs(t, err, ErrEtcdTxnOpsExceed, "n=%d", n)
			require.NotContains(t, err.Error(), "too many operations", "n=%d", n)
		}
		t.Logf("n=%d deps: %v", n, err)
	}
}

func rdRunOnceSession(ctx context.Context, t *testing.T, cli *clientv3.Client, prefix string,
	session *concurrency.Session, group []DataPatch, opts ...Option) error {
	t.Helper()
	w := rdOnceWorker(t, cli, prefix, group, opts...)
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return w.Run(rctx, session, 10*time.Millisecond, "rd")
}

// TestRangeDependencyRacesAForeignCreator: while another client keeps
// creating keys in the range, a group that counts the range and writes the
// count must only land with the count of the snapshot it ran on: at the
// commit's revision the range holds exactly count keys. The creator pauses
// between keys: a writer that creates keys in the range back to back can
// starve a range dependency for as long as it writes (optimistic
// concurrency; see "Read dependencies" in docs/DESIGN.md).
func TestRangeDependencyRacesAForeignCreator(t *testing.T) {
	t.Parallel()
	const prefix = "/test/rd-race"
	env := newTestEnv(t)
	ctx := testContext(t)
	cli := env.cli
	stop, started := make(chan struct{}), make(chan struct{})
	creator := make(chan error, 1)
	go func() {
		for i := 0; ; i++ {
			if i == 1 {
				close(started)
			}
			select {
			case <-stop:
				creator <- nil
				return
			default:
			}
			if _, err := cli.Put(ctx, fmt.Sprintf("%s/r/%04d", prefix, i), "x"); err != nil {
				creator <- err
				return
			}
			time.Sleep(5 * time.Millisecond) // fault timing: a steady, not saturating, writer
		}
	}()
	count := rdPatch(func(values map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
		n := 0
		for k := range values {
			if strings.HasPrefix(k.String(), prefix+"/r/") {
				n++
			}
		}
		x := util.NewEtcdKey(prefix + "/count")
		values[x], changed[x] = []byte(fmt.Sprint(n)), struct{}{}
		return nil
	})
	awaitSignal(ctx, t, started, "the creator's first key")
	err := rdRunOnce(ctx, t, env.client(t), prefix, []DataPatch{ReadRangeDependency{Prefix: prefix + "/r/"}, count})
	close(stop)
	require.NoError(t, <-creator)
	require.NoError(t, err)
	resp, err := cli.Get(ctx, prefix+"/count")
	require.NoError(t, err)
	require.Len(t, resp.Kvs, 1)
	at := resp.Kvs[0].ModRevision
	rng, err := cli.Get(ctx, prefix+"/r/", clientv3.WithPrefix(), clientv3.WithCountOnly(), clientv3.WithRev(at))
	require.NoError(t, err)
	require.Equal(t, fmt.Sprint(rng.Count), string(resp.Kvs[0].Value), "count written at revision %d", at)
}

// TestTesterHonoursSkipAndDependencies: the ReactorStateTester
// applies a group with dependencies (writing nothing for them) and drops a
// group whose patch returns ErrEtcdSkipGroup.
func TestTesterHonoursSkipAndDependencies(t *testing.T) {
	t.Parallel()
	const prefix = "/test/rd-tester"
	st := &rdState{}
	tester := NewReactorStateTester(t, st, map[string]string{prefix + "/cap": "1"})
	skip := rdPatch(func(map[util.EtcdKey][]byte, map[util.EtcdKey]struct{}) error { return ErrEtcdSkipGroup })
	st.patches = [][]DataPatch{
		{ReadDependency{Key: util.NewEtcdKey(prefix + "/cap")}, ReadRangeDependency{Prefix: prefix + "/r/"}, rdPut(prefix + "/a")},
		{rdPut(prefix + "/b"), ReadDependency{Key: util.NewEtcdKey(prefix + "/cap")}, skip},
		{ReadDependency{Key: util.NewEtcdKey(prefix + "/none")}},
	}
	_, err := tester.ApplyPatches()
	require.NoError(t, err)
	require.Equal(t, map[string]string{prefix + "/cap": "1", prefix + "/a": "v"}, tester.KVEntries())
}

// TestARangeOverTheTokenOnTheFirstCommit: a lone worker's first commit
// depends on a range holding its own reserved area. The commit token is put
// just before that first Txn, after the revision the range is compared at,
// so the Txn failed on the worker's own token (a conflict and a second run
// of the group with nobody else writing). The groups now wait for the state
// to hold the token first: no conflict, and the group runs once.
func TestARangeOverTheTokenOnTheFirstCommit(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	ctx := contextWithin(t, 20*time.Second)
	const prefix = "/test/range-over-token"
	var runs atomic.Int64
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		st.patches = append(st.patches, []DataPatch{ReadRangeDependency{Prefix: prefix + "/"}, SingleDataPatch{
			Key: st.key("/a"), Func: func([]byte) ([]byte, bool, error) { runs.Add(1); return []byte("a"), true, nil }}})
		return st, ErrReactorFinished
	})
	reg := prometheus.NewRegistry()
	w := mustNewEtcdWorker(t, cli, prefix, reactor, newMapState(prefix), WithMetrics(reg))
	require.NoError(t, w.Run(ctx, nil, behaviourTick, "range-over-token"))
	require.Equal(t, map[string]string{"/a": "a"}, etcdSnapshot(ctx, t, cli, prefix))
	require.Zero(t, metricValue(t, reg, "orchestrator_conflicts_total", "range-over-token"))
	require.EqualValues(t, 1, runs.Load())
}
