package orchestrator

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/util"
)

// Micro-benchmarks of the worker's CPU paths, without etcd. The end-to-end
// comparison with etcd STM and raw Txns is BenchmarkScenarios.

const microPrefix = "/orchestrator/bench/default/meta"

func microKey(i int) util.EtcdKey { return util.NewEtcdKey(fmt.Sprintf("%s/k%07d", microPrefix, i)) }

// newMicroRun returns a run of a worker that never talks to etcd (the client
// is a placeholder), with state as its ReactorState and n keys already
// applied, key i with value(i).
func newMicroRun(tb testing.TB, state ReactorState, n int, value func(int) []byte) *run {
	tb.Helper()
	noop := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) { return s, nil })
	w, err := NewEtcdWorker(&clientv3.Client{}, microPrefix, noop, state)
	if err != nil {
		tb.Fatal(err)
	}
	r := w.newRun(context.Background(), nil, time.Second, "micro")
	src := r.src
	for i := 0; i < n; i++ {
		c := keyChange{key: microKey(i), value: value(i), modRev: int64(i + 1), created: true}
		src.copy.set(c)
		src.changes.record(c.key, changeCreate, true)
	}
	src.copy.loaded(int64(n), nil)
	src.loaded = true
	if _, _, err := r.catchUp(nil); err != nil {
		tb.Fatal(err)
	}
	return r
}

// BenchmarkWatchApplyEvents applies one watch response of 100 puts of
// 100-byte values to existing keys of a state held by a mapState: the watch
// -> Update path, at 1k keys and at ORCHESTRATOR_SCALE_KEYS keys (default
// 1,000,000), to show the cost per event does not depend on the state size.
// ns/event is the cost per event.
func BenchmarkWatchApplyEvents(b *testing.B) {
	large := 1_000_000
	if n, err := strconv.Atoi(os.Getenv("ORCHESTRATOR_SCALE_KEYS")); err == nil && n > 1000 {
		large = n
	}
	for _, keys := range []int{1000, large} {
		b.Run(fmt.Sprintf("keys=%d", keys), func(b *testing.B) { benchWatchApply(b, keys) })
	}
}

func benchWatchApply(b *testing.B, keys int) {
	const perResponse = 100
	r := newMicroRun(b, newMapState(microPrefix), keys, benchValue)
	events := make([]*clientv3.Event, perResponse)
	for i := range events {
		// Each event carries its own key and value slices, as decoded
		// from the wire.
		events[i] = &clientv3.Event{Type: mvccpb.PUT, Kv: &mvccpb.KeyValue{
			Key:   microKey(i * (keys / perResponse)).Bytes(),
			Value: benchValue(i),
		}}
	}
	s := r.src
	rev := s.copy.eventRev
	b.ReportAllocs()
	for b.Loop() {
		for _, ev := range events {
			rev++
			ev.Kv.ModRevision = rev
		}
		s.mu.Lock()
		s.applyEvents(events)
		s.prune()
		s.mu.Unlock()
		if _, _, err := r.catchUp(nil); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*perResponse), "ns/event")
}

// BenchmarkPatchViewFlush applies benchGroupsPerTick single-key increment
// groups, each on its own key, to a 100k-key state and resets the view: the
// CPU part of one flush of the independent-updates scenario.
func BenchmarkPatchViewFlush(b *testing.B) {
	r := newMicroRun(b, newMapState(microPrefix), benchLoadKeys, func(i int) []byte { return strconv.AppendInt(nil, int64(i), 10) })
	groups := make([][]DataPatch, benchGroupsPerTick)
	for i := range groups {
		groups[i] = []DataPatch{SingleDataPatch{Key: microKey(i * 7), Func: benchIncr}}
	}
	b.ReportAllocs()
	for b.Loop() {
		cv, ok, err := r.commitView(groups, nil)
		if err != nil || !ok {
			b.Fatal(err, ok)
		}
		view := newPatchView(cv)
		for _, g := range groups {
			writes, err := view.applyGroup(g)
			if err != nil || len(writes) != 1 {
				b.Fatalf("applyGroup: %v, %d writes", err, len(writes))
			}
		}
		view.reset()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*benchGroupsPerTick), "ns/group")
}

// BenchmarkBatchPackTick packs one tick's worth of groups with the default
// limits: benchGroupsPerTick groups, every tenth of them a two-key group that
// also rewrites a shared key.
func BenchmarkBatchPackTick(b *testing.B) {
	shared := microKey(999_999)
	groups := make([]groupWrites, benchGroupsPerTick)
	for i := range groups {
		g := groupWrites{{key: microKey(i), value: benchValue(i)}}
		if i%10 == 0 {
			g = append(g, keyWrite{key: shared, value: benchValue(i)})
		}
		groups[i] = g
	}
	r := newMicroRun(b, newMapState(microPrefix), 0, benchValue)
	l := r.w.limits
	for i, g := range groups {
		if err := checkGroupFits(g, groupDeps{}, l); err != nil {
			b.Fatalf("group %d: %v", i, err)
		}
	}
	b.ReportAllocs()
	for b.Loop() {
		if out := packTxns(groups, nil, l); len(out) < 4 {
			b.Fatalf("%d txns", len(out))
		}
	}
}
