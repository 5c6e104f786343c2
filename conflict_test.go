package orchestrator

// How the worker handles CAS conflicts: the patches re-run once on a newer
// state, and the worker waits for that state instead of retrying at once
// on the state that conflicted.

import (
	"context"
	"fmt"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// countedIncrement returns a patch adding one to the integer at rel (absent =
// 0). Each run counts in calls and is recorded in seen (worker goroutine
// only); the first run calls first, if set, before it returns. A run beyond
// maxCalls() fails the patch, so that a worker retrying without new state
// ends Run at once with a clear error instead of spinning until the test's
// deadline.
func countedIncrement(st *recordingState, rel string, calls *atomic.Int64, seen *[]string,
	first func() error, maxCalls func() int64,
) DataPatch {
	return SingleDataPatch{Key: st.key(rel), Func: func(old []byte) ([]byte, bool, error) {
		if seen != nil {
			*seen = append(*seen, string(old))
		}
		n := calls.Add(1)
		if limit := maxCalls(); n > limit {
			return nil, false, fmt.Errorf("patch run %d, at most %d possible: the worker retried a conflict without new state", n, limit)
		}
		if n == 1 && first != nil {
			if err := first(); err != nil {
				return nil, false, err
			}
		}
		var v int64
		if old != nil {
			var err error
			if v, err = strconv.ParseInt(string(old), 10, 64); err != nil {
				return nil, false, err
			}
		}
		return []byte(strconv.FormatInt(v+1, 10)), true, nil
	}}
}

// casIncrement adds delta to the integer at key with a
// compare-and-swap loop on its mod revision, as another writer would.
func casIncrement(ctx context.Context, cli *clientv3.Client, key string, delta int64) error {
	for {
		resp, err := cli.Get(ctx, key)
		if err != nil {
			return err
		}
		var n, rev int64
		if len(resp.Kvs) == 1 {
			rev = resp.Kvs[0].ModRevision
			if n, err = strconv.ParseInt(string(resp.Kvs[0].Value), 10, 64); err != nil {
				return err
			}
		}
		txn, err := cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).
			Then(clientv3.OpPut(key, strconv.FormatInt(n+delta, 10))).Commit()
		if err != nil {
			return err
		}
		if txn.Succeeded {
			return nil
		}
	}
}

// TestConflictRerunsPatchOnNewerState: another client changes the key after the
// worker's patch read it and before the worker's Txn. The Txn conflicts
// exactly once; the patch re-runs once, on the other client's value (so the
// worker waited for its state to pass the conflicting revision), and the
// final value holds both writes.
func TestConflictRerunsPatchOnNewerState(t *testing.T) {
	t.Parallel()
	const (
		prefix = "/test/conflict/once"
		role   = "conflict-once"
	)
	srv := etcdtest.Shared(t)
	ctx := testContext(t)
	cli := srv.Client(t)
	mustPutKV(ctx, t, cli, prefix+"/n", "0")

	var calls atomic.Int64
	var seen []string
	entered, release := make(chan struct{}), make(chan struct{})
	reactor := newStepReactor(
		when(func(st *recordingState) bool { return st.has("/n", "0") }, func(_ context.Context, st *recordingState) error {
			st.group(countedIncrement(st, "/n", &calls, &seen, func() error {
				close(entered)
				return blockUntil(ctx, release)
			}, func() int64 { return 2 }))
			return nil
		}),
		when(func(st *recordingState) bool { return st.has("/n", "11") }, nil),
	)
	reg := prometheus.NewRegistry()
	w, err := NewEtcdWorker(cli, prefix, reactor, newRecordingState(prefix), WithMetrics(reg))
	require.NoError(t, err)
	done := runAsync(ctx, w, nil, behaviourTick, role)

	awaitSignal(ctx, t, entered, "the worker never ran its patch")
	// The patch has read "0"; another client adds 10 before the worker's Txn.
	mustPutKV(ctx, t, srv.Client(t), prefix+"/n", "10")
	close(release)
	require.NoError(t, recvErr(ctx, t, done))

	require.Equal(t, map[string]string{"/n": "11"}, etcdSnapshot(ctx, t, cli, prefix))
	require.Equal(t, float64(1), testutil.ToFloat64(w.metrics.conflicts.WithLabelValues(role)), "conflicts")
	require.Equal(t, float64(1), testutil.ToFloat64(w.metrics.commits.WithLabelValues(role)), "landed Txns")
	require.Equal(t, int64(2), calls.Load(), "patch runs")
	require.Equal(t, []string{"0", "10"}, seen, "the re-run must see the conflicting write")
}

// TestConflictsBoundedByExternalWrites: while another client increments the
// key externalWrites times, a few ms apart, the worker increments it once
// per Tick. A conflict is only possible when an external write landed after
// the revision of the worker's state, and after a conflict the worker waits
// for its state to pass the failed Txn's revision, so each external write
// causes at most one conflict: conflicts <= externalWrites. A worker that
// retried without waiting would conflict over and over on the same state.
// Every increment lands exactly once.
func TestConflictsBoundedByExternalWrites(t *testing.T) {
	t.Parallel()
	const (
		prefix         = "/test/conflict/stream"
		role           = "conflict-stream"
		externalWrites = 40
		spacing        = 3 * time.Millisecond
	)
	srv := etcdtest.Shared(t)
	ctx := testContext(t)
	cli := srv.Client(t)
	mustPutKV(ctx, t, cli, prefix+"/n", "0")

	var calls atomic.Int64
	var writerDone atomic.Bool
	entered, firstExternal := make(chan struct{}), make(chan struct{})
	queued := int64(0) // increments queued (worker goroutine; read after Run)
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*recordingState)
		// A Tick runs only when no patches are pending, so every increment
		// queued so far has landed and the state includes it.
		if writerDone.Load() {
			if st.has("/n", strconv.FormatInt(externalWrites+queued, 10)) {
				return st, ErrReactorFinished
			}
			return st, nil
		}
		var first func() error
		if queued == 0 {
			// The first run waits for an external write: at least one
			// conflict.
			first = func() error {
				close(entered)
				return blockUntil(ctx, firstExternal)
			}
		}
		queued++
		// Runs so far: one landed per earlier increment, at most one
		// conflict per external write, and this one's own landing run.
		st.group(countedIncrement(st, "/n", &calls, nil, first, func() int64 { return queued + externalWrites }))
		return st, nil
	})
	reg := prometheus.NewRegistry()
	w, err := NewEtcdWorker(cli, prefix, reactor, newRecordingState(prefix), WithMetrics(reg))
	require.NoError(t, err)
	done := runAsync(ctx, w, nil, behaviourTick, role)

	awaitSignal(ctx, t, entered, "the worker never ran its patch")
	ext := srv.Client(t)
	ticker := time.NewTicker(spacing)
	for i := 0; i < externalWrites; i++ {
		require.NoError(t, casIncrement(ctx, ext, prefix+"/n", 1))
		if i == 0 {
			close(firstExternal)
		}
		select {
		case <-ticker.C:
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		}
	}
	ticker.Stop()
	writerDone.Store(true)
	require.NoError(t, recvErr(ctx, t, done))

	conflicts := testutil.ToFloat64(w.metrics.conflicts.WithLabelValues(role))
	commits := testutil.ToFloat64(w.metrics.commits.WithLabelValues(role))
	t.Logf("%d external writes, %d worker increments, %d patch runs, %v conflicts",
		externalWrites, queued, calls.Load(), conflicts)
	require.Equal(t, map[string]string{"/n": strconv.FormatInt(externalWrites+queued, 10)},
		etcdSnapshot(ctx, t, cli, prefix), "every increment must land exactly once")
	require.Equal(t, float64(queued), commits, "one landed Txn per increment")
	require.Equal(t, float64(calls.Load()), commits+conflicts, "each patch run is one Txn: landed or conflicted")
	require.GreaterOrEqual(t, conflicts, float64(1))
	require.LessOrEqual(t, conflicts, float64(externalWrites), "more conflicts than external writes: the worker retried without new state")
}
