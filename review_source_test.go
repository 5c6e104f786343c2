package orchestrator

// Review of the shared Source: tests against a real embedded etcd.

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
	"weak"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// failSwitch makes a recordingState's Update fail on one relative key while
// armed.
type failSwitch struct {
	key   atomic.Pointer[string]
	fired atomic.Int32
}

var errReviewUpdate = errors.New("review: update refused")

func (f *failSwitch) arm(rel string) { f.key.Store(&rel) }
func (f *failSwitch) disarm()        { f.key.Store(nil) }

func (f *failSwitch) onUpdate(rel string, _ []byte, _ bool) error {
	if k := f.key.Load(); k != nil && *k == rel {
		f.fired.Add(1)
		return errReviewUpdate
	}
	return nil
}

func finishReactor() Reactor {
	return ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		return s, ErrReactorFinished
	})
}

func idleReactor() Reactor {
	return ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) { return s, nil })
}

// TestReviewDeleteOfAKeyCreatedInAFailedCatchUpReachesTheNextRun: one
// catch-up creates /a and changes /b (one Txn, one revision); Update(/a)
// succeeds, Update(/b) fails and ends Run. /a is then deleted. The next Run
// must tell the state that /a is gone: the state must end equal to etcd.
func TestReviewDeleteOfAKeyCreatedInAFailedCatchUpReachesTheNextRun(t *testing.T) {
	for _, shared := range []bool{false, true} {
		t.Run(fmt.Sprintf("shared=%v", shared), func(t *testing.T) {
			srv := etcdtest.NewServer(t)
			cli := srv.Client(t)
			ctx := testContext(t)
			prefix := "/rv-del"
			mustPutKV(ctx, t, cli, prefix+"/x", "0")
			mustPutKV(ctx, t, cli, prefix+"/b", "0")
			var opts []Option
			if shared {
				src := mustNewSource(t, cli, prefix)
				opts = append(opts, WithSource(src))
				// Another worker keeps the Source running throughout.
				other := mustNewEtcdWorker(t, cli, prefix, idleReactor(), newMapState(prefix), WithSource(src))
				g := startWorkerGroup(t, time.Minute, "other", []*EtcdWorker{other})
				require.NoError(t, other.WaitSynced(ctx))
				t.Cleanup(func() { g.cancel(); g.wait(t, 10*time.Second) })
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
			require.ErrorIs(t, recvErr(ctx, t, done), errReviewUpdate)
			require.Contains(t, st.values, "/a", "precondition: Update(/a) succeeded before Update(/b) failed")
			fs.disarm()

			_, err = cli.Delete(ctx, prefix+"/a")
			require.NoError(t, err)
			w.reactor = finishReactor()
			require.NoError(t, runWithin(t, w, 10*time.Second, "w-again"))
			require.Equal(t, etcdSnapshot(ctx, t, cli, prefix), stateSnapshot(st),
				"the state ends equal to etcd: the delete of /a must reach it")
		})
	}
}

// TestReviewDeleteAfterTwoFailedFirstSnapshotsReachesTheState: a first
// snapshot fails at /k5 (resume there); /k7 is created; the second Run's
// snapshot tells /k7 and fails at /k9; /k7 is deleted; the third Run must
// tell the state that /k7 is gone.
func TestReviewDeleteAfterTwoFailedFirstSnapshotsReachesTheState(t *testing.T) {
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
	ctx := testContext(t)
	const prefix = "/rv-del2"
	for _, k := range []string{"/k1", "/k5", "/k9"} {
		mustPutKV(ctx, t, cli, prefix+k, "0")
	}
	src := mustNewSource(t, cli, prefix)
	other := mustNewEtcdWorker(t, cli, prefix, idleReactor(), newMapState(prefix), WithSource(src))
	g := startWorkerGroup(t, time.Minute, "other", []*EtcdWorker{other})
	require.NoError(t, other.WaitSynced(ctx))

	st := newRecordingState(prefix)
	var fs failSwitch
	st.onUpdate = fs.onUpdate
	w := mustNewEtcdWorker(t, cli, prefix, finishReactor(), st, WithSource(src))
	fs.arm("/k5")
	require.ErrorIs(t, runWithin(t, w, 10*time.Second, "first"), errReviewUpdate)
	mustPutKV(ctx, t, cli, prefix+"/k7", "7")
	waitUntil(ctx, t, "the Source has /k7", func() bool { return other.Status().AppliedRevision >= srv.Revision() })
	fs.arm("/k9")
	require.ErrorIs(t, runWithin(t, w, 10*time.Second, "second"), errReviewUpdate)
	require.Contains(t, st.values, "/k7", "precondition: the second snapshot told /k7")
	fs.disarm()
	_, err := cli.Delete(ctx, prefix+"/k7")
	require.NoError(t, err)
	waitUntil(ctx, t, "the Source has the delete", func() bool { return other.Status().AppliedRevision >= srv.Revision() })
	require.NoError(t, runWithin(t, w, 10*time.Second, "third"))
	require.Equal(t, etcdSnapshot(ctx, t, cli, prefix), stateSnapshot(st),
		"the state ends equal to etcd: the delete of /k7 must reach it")
	g.cancel()
	g.wait(t, 10*time.Second)
}

// TestReviewChangeLogOfAStuckWorkerIsBoundedByKeysWithShortLivedKeys: while
// one worker is stuck in Tick, 3,000 short-lived keys are created and
// deleted (at most one key is live at a time). What the Source holds for the
// stuck worker must be bounded by the keys, not by the events.
func TestReviewChangeLogOfAStuckWorkerIsBoundedByKeysWithShortLivedKeys(t *testing.T) {
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
	ctx := testContext(t)
	const prefix, n = "/rv-ephemeral", 3000
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
	waitUntil(ctx, t, "the fast worker is current", func() bool { return fast.Status().AppliedRevision >= srv.Revision() })
	src.mu.RLock()
	maxRecords, maxLog = max(maxRecords, len(src.changes.changes)), max(maxLog, len(src.changes.log))
	src.mu.RUnlock()
	t.Logf("change log: %d records, %d log entries for at most 1 live key after %d create+delete pairs", maxRecords, maxLog, n)
	require.LessOrEqual(t, maxRecords, compactMinOver+2, "records bounded by keys, not by events")
	require.LessOrEqual(t, maxLog, 2*2+compactMinOver+1, "log bounded by keys, not by events")
	close(release)
	g.cancel()
	g.wait(t, 10*time.Second)
}

// TestReviewADroppedWorkerReleasesItsPosition: a worker that ran on a
// Source and was dropped must not be held by the Source ("held weakly: a
// worker that is dropped releases it"), nor keep the change log from being
// pruned.
func TestReviewADroppedWorkerReleasesItsPosition(t *testing.T) {
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
	ctx := testContext(t)
	const prefix = "/rv-drop"
	src := mustNewSource(t, cli, prefix)
	var cur weak.Pointer[cursor]
	var wp weak.Pointer[EtcdWorker]
	func() {
		w := mustNewEtcdWorker(t, cli, prefix, finishReactor(), newMapState(prefix), WithSource(src))
		require.NoError(t, runWithin(t, w, 10*time.Second, "dropped"))
		cur, wp = weak.Make(w.cur), weak.Make(w)
	}()
	keep := mustNewEtcdWorker(t, cli, prefix, idleReactor(), newMapState(prefix), WithSource(src))
	g := startWorkerGroup(t, time.Minute, "keep", []*EtcdWorker{keep})
	require.NoError(t, keep.WaitSynced(ctx))
	for i := range 50 {
		mustPutKV(ctx, t, cli, fmt.Sprintf("%s/k%d", prefix, i), "v")
	}
	waitUntil(ctx, t, "keep is current", func() bool { return keep.Status().AppliedRevision >= srv.Revision() })
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
	g.cancel()
	g.wait(t, 10*time.Second)
}
