package orchestrator

// Coverage of /work/shared/design/PITFALLS.md, item by item. "(new)" marks
// the tests of this file.
//
// Watch and revisions
//
//  1. Progress notifications never make the worker drop events:
//     TestPitfall1ProgressNotifyNeverDropsEvents (new, unit: a notify at
//     revision 100, then events at 41..99 are applied and appliedRev never
//     goes back), TestPitfall1ProgressNotifyEndToEnd (new, real etcd: every
//     put is seen, in order, while the worker requests progress every 50ms).
//  2. No stale-response check on the header revision; dedup by ModRevision:
//     TestPitfall2SameHeaderRevision (new, unit: two responses with one
//     header revision both apply; replays are skipped; two keys of one
//     revision both apply).
//  3. Re-watch from the last applied revision + 1:
//     TestPitfall3ResumeAfterLastApplied (new, real etcd: the watch closes,
//     three puts land while none is open and a head probe reports them, and
//     the restart run.loop makes (restartWatchIfDue) delivers each of them
//     once, in order; a watch started one revision too early replays the last
//     applied event and the worker skips it). Also covered indirectly by the
//     fault suite, whose invariants break on a lost event:
//     TestFaultBankLeaderRestart (WithRequireLeader watch fails, the worker
//     re-watches), TestFaultBankProxyCuts, TestFaultIdleWorkerStaysFresh
//     (clientv3 resumes the watch), TestLinearizableCounter; the unit test of
//     the dedup is TestPitfall2SameHeaderRevision.
//  4. An empty value arrives as nil; a PUT must reach Update as []byte{}:
//     TestEtcdWorkerEmptyOrNil (load and watch), and
//     TestFaultCompactionReloadMatchesEtcd (empty values after a reload).
//  5. Compaction and lost connections are normal: reload, diff, resume:
//     TestFaultBankCompactionDuringOutage, TestFaultCompactionReloadMatchesEtcd,
//     TestFaultCompactionBetweenLoadPages, TestFaultBankProxyCuts,
//     TestFaultBankLeaderRestart, TestFaultIdleWorkerStaysFresh,
//     TestMetricsReloadAfterCompaction, TestLinearizableCounter (compaction
//     during an outage), TestEtcdWorkerRunTwice (reload diff with deletions),
//     TestSoak (opt-in, $ORCHESTRATOR_SOAK).
//
// Batching and commits
//
//  6. A group is applied to the working copy once, before packing:
//     TestEtcdWorkerMultiTxnFlush (every patch of a multi-Txn flush runs
//     exactly once), TestPackTxns, TestPackTxnsManyTinyGroups,
//     TestPackTxnsMergedRewrites (packing never splits or repeats a group).
//  7. Exact limits (own ops counted, at-limit accepted, limit+1 a prompt
//     error): TestBatchCheckGroupFits, TestEtcdWorkerTxnLimits,
//     TestLimitsServerDefaultsAreTheLimits, TestLimitsOpsDefaultServer,
//     TestLimitsBytesDefaultServer, TestLimitsMatchingServer,
//     TestLimitsServerLowerThanWorker.
//  8. Later Txns of a flush compare against the earlier Txns' revisions:
//     TestEtcdWorkerMultiTxnFlush, TestLimitsMatchingServer.
//  9. Unknown outcome resolved, never re-run blindly nor dropped:
//     TestExactlyOnceCommitCuts, TestExactlyOnceScriptedUnknownOutcomes,
//     TestLinearizableCounter, TestFaultShutdownDuringCommit,
//     TestFaultPatchPanicAfterUnknownOutcome, TestSoak (opt-in).
//  10. Conflicts wait for newer state, no spin: TestPitfall10ConflictWaits
//     (new: exactly one conflict, exactly two runs of the patch, the second
//     on the external value), TestPitfall10NoSpinUnderContention (new:
//     conflicts bounded by the number of external writes), plus
//     TestEtcdWorkerCover/concurrent_writer, TestEtcdWorkerDeleteCounter and
//     TestMetricsTwoWorkersShareRegistry (conflicts counted per role).
//  11. Keys outside the prefix (and the reserved area) rejected:
//     TestEtcdWorkerKeyOutsidePrefix.
//  12. Final patches land before Run returns nil; a failed final commit is an
//     error: TestEtcdWorkerFinished (lands), TestEtcdWorkerKeyOutsidePrefix
//     (final commit fails -> error), TestLimitsOpsDefaultServer,
//     TestLimitsBytesDefaultServer, TestLimitsMatchingServer,
//     TestLimitsServerLowerThanWorker (limReactor's groups are final).
//
// Ticking
//
//  13. rate.Every(timerInterval), intervals above 1s keep ticking:
//     TestEtcdWorkerLongTimerInterval.
//  14. Barrier (own last commit visible, no torn Txn): TestEtcdWorkerFinished
//     (Tick 2 sees Tick 1's commit), TestEtcdWorkerMultiTxnFlush (the Tick
//     after a flush sees all of it), TestEtcdWorkerRetryableError (no Tick in
//     between), TestSum, TestEtcdWorkerBank, TestEtcdWorkerLinearizability
//     (read-your-writes), TestLinearizableCounter, the fault bank tests.
//  15. A worker run twice resets its counters and revisions:
//     TestEtcdWorkerRunTwice.

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
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// pitfallUnitRun returns a run of a worker on a real etcd client, with its
// watch stream, as if its load had ended at revision loadedRev. The test
// drives the watch handling by hand; the real watch is never opened.
func pitfallUnitRun(t testing.TB, prefix string, st ReactorState, loadedRev int64) *run {
	t.Helper()
	srv := etcdtest.NewServer(t)
	noop := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) { return s, nil })
	w, err := NewEtcdWorker(srv.Client(t), prefix, noop, st)
	require.NoError(t, err)
	r := w.newRun(testContext(t), nil, behaviourTick, "pitfall")
	r.watch = newWatchStream(r)
	t.Cleanup(r.close)
	r.eventRev = loadedRev
	r.appliedRev = loadedRev
	return r
}

// pitfallPut is a PUT event of prefix+rel at modRev.
func pitfallPut(prefix, rel, value string, modRev int64) *clientv3.Event {
	return &clientv3.Event{Type: mvccpb.PUT, Kv: &mvccpb.KeyValue{
		Key: []byte(prefix + rel), Value: []byte(value), ModRevision: modRev, CreateRevision: modRev,
	}}
}

// pitfallDelete is a DELETE event of prefix+rel at modRev.
func pitfallDelete(prefix, rel string, modRev int64) *clientv3.Event {
	return &clientv3.Event{Type: mvccpb.DELETE, Kv: &mvccpb.KeyValue{Key: []byte(prefix + rel), ModRevision: modRev}}
}

// pitfallResp is a watch response with header revision header and events.
func pitfallResp(header int64, events ...*clientv3.Event) clientv3.WatchResponse {
	return clientv3.WatchResponse{Header: &etcdserverpb.ResponseHeader{Revision: header}, Events: events}
}

// TestPitfall1ProgressNotifyNeverDropsEvents: a progress notification at
// revision 100 moves appliedRev (the barrier) but not eventRev, so events at
// revisions below 100 that arrive after it are still applied; appliedRev
// never goes backwards, and an older notification does not lower it.
func TestPitfall1ProgressNotifyNeverDropsEvents(t *testing.T) {
	const prefix = "/test/pitfall1/unit"
	st := newRecordingState(prefix)
	r := pitfallUnitRun(t, prefix, st, 40)

	notify := pitfallResp(100)
	require.True(t, notify.IsProgressNotify(), "the test's notify must look like one to clientv3")
	require.NoError(t, r.watch.handle(notify, true))
	require.Equal(t, int64(100), r.appliedRev, "a notify proves the state complete up to its revision")
	require.Equal(t, int64(40), r.eventRev, "a notify must not move the event dedup revision")
	require.Empty(t, st.log)

	// Events below the notify's revision, delivered after it.
	late := pitfallResp(100,
		pitfallPut(prefix, "/x", "41", 41),
		pitfallPut(prefix, "/y", "42", 42),
		pitfallDelete(prefix, "/x", 99),
	)
	require.False(t, late.IsProgressNotify())
	r.changed = false
	require.NoError(t, r.watch.handle(late, true))
	require.Equal(t, []updateRecord{
		{rel: "/x", value: []byte("41")},
		{rel: "/y", value: []byte("42")},
		{rel: "/x", value: nil},
	}, st.log, "events after a progress notify were dropped")
	require.True(t, r.changed, "applied events must make the next Tick due")
	require.Equal(t, int64(99), r.eventRev)
	require.Equal(t, int64(100), r.appliedRev, "appliedRev went backwards")

	// An older notify (say, requested before the events) changes nothing.
	require.NoError(t, r.watch.handle(pitfallResp(90), true))
	require.Equal(t, int64(100), r.appliedRev, "appliedRev went backwards")
	require.Equal(t, int64(99), r.eventRev)

	// Events past the notify apply and move both revisions.
	require.NoError(t, r.watch.handle(pitfallResp(101, pitfallPut(prefix, "/z", "101", 101)), true))
	require.Equal(t, updateRecord{rel: "/z", value: []byte("101")}, st.log[len(st.log)-1])
	require.Len(t, st.log, 4)
	require.Equal(t, int64(101), r.eventRev)
	require.Equal(t, int64(101), r.appliedRev)
	require.Equal(t, map[string][]byte{"/y": []byte("42"), "/z": []byte("101")}, st.values)
}

// TestPitfall1ProgressNotifyEndToEnd: a worker asking etcd for progress
// notifications every 50ms (WithMaxStaleness(200ms)) while another client
// writes sees every put of the key, once, in order, and its Ticks never see
// the value go back.
func TestPitfall1ProgressNotifyEndToEnd(t *testing.T) {
	const (
		prefix = "/test/pitfall1/e2e"
		puts   = 150
	)
	srv := etcdtest.NewServer(t)
	ctx := testContext(t)
	writer := srv.Client(t)
	mustPutKV(ctx, t, writer, prefix+"/k", "0")

	st := newRecordingState(prefix)
	last := int64(-1)
	loaded := make(chan struct{})
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		rs := s.(*recordingState)
		if last < 0 {
			close(loaded) // the first Tick: the load is done
		}
		v, ok := rs.values["/k"]
		if !ok {
			return rs, fmt.Errorf("/k missing from the state")
		}
		n, err := strconv.ParseInt(string(v), 10, 64)
		if err != nil {
			return rs, err
		}
		if n < last {
			return rs, fmt.Errorf("/k went back from %d to %d", last, n)
		}
		last = n
		if n == puts {
			return rs, ErrReactorFinished
		}
		return rs, nil
	})
	w, err := NewEtcdWorker(srv.Client(t), prefix, reactor, st, WithMaxStaleness(200*time.Millisecond))
	require.NoError(t, err)
	// The premise: the worker asks for a progress notification every 50ms.
	require.Equal(t, 50*time.Millisecond, (&watchStream{r: &run{w: w}}).progressInterval())

	done := runAsync(ctx, w, nil, behaviourTick, "pitfall1")
	select {
	case <-loaded:
	case err := <-done:
		t.Fatalf("Run returned before its first Tick: %v", err)
	case <-ctx.Done():
		t.Fatal("the worker never ticked")
	}
	for i := 1; i <= puts; i++ {
		mustPutKV(ctx, t, writer, prefix+"/k", strconv.Itoa(i))
		if i%10 == 0 {
			// Unrelated keys in between, so responses mix keys.
			mustPutKV(ctx, t, writer, prefix+"/other", strconv.Itoa(i))
		}
	}
	require.NoError(t, recvErr(ctx, t, done))

	var got []string
	for _, u := range st.updatesOf("/k") {
		got = append(got, string(u.value))
	}
	want := make([]string, 0, puts+1)
	for i := 0; i <= puts; i++ {
		want = append(want, strconv.Itoa(i))
	}
	require.Equal(t, want, got, "the state must see every put of /k exactly once, in order")
}

// TestPitfall2SameHeaderRevision: responses are ordered and de-duplicated by
// each event's ModRevision, never by the header revision. Two responses with
// the same header revision both apply, in order; events at or below what was
// applied (a replay) are skipped, once each, while new events of the same
// response apply; several events of one revision (one Txn) all apply.
func TestPitfall2SameHeaderRevision(t *testing.T) {
	const prefix = "/test/pitfall2"
	st := newRecordingState(prefix)
	r := pitfallUnitRun(t, prefix, st, 9)

	// A backlog delivered in chunks, all with the header revision 20.
	require.NoError(t, r.watch.handle(pitfallResp(20, pitfallPut(prefix, "/a", "a10", 10)), true))
	require.NoError(t, r.watch.handle(pitfallResp(20, pitfallPut(prefix, "/b", "b11", 11)), true))
	require.Equal(t, []updateRecord{
		{rel: "/a", value: []byte("a10")},
		{rel: "/b", value: []byte("b11")},
	}, st.log, "a response with the same header revision as the previous one was dropped")
	require.Equal(t, int64(11), r.eventRev)

	// A replay of 11 followed by a Txn at 12 writing two keys.
	require.NoError(t, r.watch.handle(pitfallResp(20,
		pitfallPut(prefix, "/b", "b11", 11),
		pitfallPut(prefix, "/c", "c12", 12),
		pitfallPut(prefix, "/d", "d12", 12),
	), true))
	// A whole replayed response, including a delete.
	require.NoError(t, r.watch.handle(pitfallResp(20, pitfallDelete(prefix, "/c", 13)), true))
	require.NoError(t, r.watch.handle(pitfallResp(21,
		pitfallPut(prefix, "/a", "a10", 10),
		pitfallPut(prefix, "/b", "b11", 11),
		pitfallPut(prefix, "/c", "c12", 12),
		pitfallDelete(prefix, "/c", 13),
	), true))
	require.Equal(t, []updateRecord{
		{rel: "/a", value: []byte("a10")},
		{rel: "/b", value: []byte("b11")},
		{rel: "/c", value: []byte("c12")},
		{rel: "/d", value: []byte("d12")},
		{rel: "/c", value: nil},
	}, st.log, "each event must be applied exactly once, in revision order")
	require.Equal(t, int64(13), r.eventRev)
	require.Equal(t, int64(13), r.appliedRev)
	require.Equal(t, map[string][]byte{"/a": []byte("a10"), "/b": []byte("b11"), "/d": []byte("d12")}, st.values)
}

// pitfallIncrement returns a patch adding one to the integer at rel (absent =
// 0). Each run counts in calls and is recorded in seen (worker goroutine
// only); the first run calls first, if set, before it returns. A run beyond
// maxCalls() fails the patch, so that a worker retrying without new state
// ends Run at once with a clear error instead of spinning until the test's
// deadline.
func pitfallIncrement(st *recordingState, rel string, calls *atomic.Int64, seen *[]string,
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

// pitfallCASIncrement adds delta to the integer at key with a
// compare-and-swap loop on its mod revision, as another writer would.
func pitfallCASIncrement(ctx context.Context, cli *clientv3.Client, key string, delta int64) error {
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

// TestPitfall10ConflictWaits: another client changes the key after the
// worker's patch read it and before the worker's Txn. The Txn conflicts
// exactly once; the patch re-runs once, on the other client's value (so the
// worker waited for its state to pass the conflicting revision), and the
// final value holds both writes.
func TestPitfall10ConflictWaits(t *testing.T) {
	const (
		prefix = "/test/pitfall10/once"
		role   = "pitfall10-once"
	)
	srv := etcdtest.NewServer(t)
	ctx := testContext(t)
	cli := srv.Client(t)
	mustPutKV(ctx, t, cli, prefix+"/n", "0")

	var calls atomic.Int64
	var seen []string
	entered, release := make(chan struct{}), make(chan struct{})
	reactor := newStepReactor(
		when(func(st *recordingState) bool { return st.has("/n", "0") }, func(_ context.Context, st *recordingState) error {
			st.group(pitfallIncrement(st, "/n", &calls, &seen, func() error {
				close(entered)
				select {
				case <-release:
					return nil
				case <-ctx.Done():
					return ctx.Err()
				}
			}, func() int64 { return 2 }))
			return nil
		}),
		when(func(st *recordingState) bool { return st.has("/n", "11") }, nil),
	)
	reg := prometheus.NewRegistry()
	w, err := NewEtcdWorker(cli, prefix, reactor, newRecordingState(prefix), WithMetrics(reg))
	require.NoError(t, err)
	done := runAsync(ctx, w, nil, behaviourTick, role)

	select {
	case <-entered:
	case <-ctx.Done():
		t.Fatal("the worker never ran its patch")
	}
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

// TestPitfall10NoSpinUnderContention: while another client increments the
// key externalWrites times, a few ms apart, the worker increments it once
// per Tick. A conflict is only possible when an external write landed after
// the revision of the worker's state, and after a conflict the worker waits
// for its state to pass the failed Txn's revision, so each external write
// causes at most one conflict: conflicts <= externalWrites. A worker that
// retried without waiting would conflict over and over on the same state.
// Every increment lands exactly once.
func TestPitfall10NoSpinUnderContention(t *testing.T) {
	const (
		prefix         = "/test/pitfall10/stream"
		role           = "pitfall10-stream"
		externalWrites = 40
		spacing        = 3 * time.Millisecond
	)
	srv := etcdtest.NewServer(t)
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
				select {
				case <-firstExternal:
					return nil
				case <-ctx.Done():
					return ctx.Err()
				}
			}
		}
		queued++
		// Runs so far: one landed per earlier increment, at most one
		// conflict per external write, and this one's own landing run.
		st.group(pitfallIncrement(st, "/n", &calls, nil, first, func() int64 { return queued + externalWrites }))
		return st, nil
	})
	reg := prometheus.NewRegistry()
	w, err := NewEtcdWorker(cli, prefix, reactor, newRecordingState(prefix), WithMetrics(reg))
	require.NoError(t, err)
	done := runAsync(ctx, w, nil, behaviourTick, role)

	select {
	case <-entered:
	case <-ctx.Done():
		t.Fatal("the worker never ran its patch")
	}
	ext := srv.Client(t)
	ticker := time.NewTicker(spacing)
	for i := 0; i < externalWrites; i++ {
		require.NoError(t, pitfallCASIncrement(ctx, ext, prefix+"/n", 1))
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

// pitfall3Receive hands r's watch to handle as run.wait does (the opened
// channel to established, each response to handle) until done, asked after
// each handled response, returns true. A closed watch channel fails the test;
// the run's context (the test's, through newRun) bounds the wait.
func pitfall3Receive(t testing.TB, r *run, what string, done func(clientv3.WatchResponse) bool) {
	t.Helper()
	for {
		select {
		case <-r.ctx.Done():
			t.Fatalf("timed out waiting for %s (eventRev %d): %v", what, r.eventRev, r.ctx.Err())
		case ch := <-r.watch.opened:
			r.watch.established(ch)
		case resp, ok := <-r.watch.ch:
			require.True(t, ok, "the watch closed while waiting for %s", what)
			require.NoError(t, r.watch.handle(resp, true))
			if done(resp) {
				return
			}
		}
	}
}

// TestPitfall3ResumeAfterLastApplied: the worker's watch closes after it
// applied a put at revision A; three puts land at A+1..A+3 while no watch is
// open, and a head probe tells the run that etcd is at A+3. The restart that
// run.loop makes (restartWatchIfDue, once the back-off has passed) must
// resume at the last applied revision + 1: the state gets A+1..A+3 once each,
// in order, then a put made after the restart. A restart past what was
// applied (from the probed head, say) would lose some of them. Then a watch
// started one revision too early (at the last applied revision, as a re-watch
// from the last header revision would) replays that revision's event, and the
// worker skips it: no Update, eventRev unchanged, no Tick made due.
func TestPitfall3ResumeAfterLastApplied(t *testing.T) {
	const prefix = "/test/pitfall3"
	srv := etcdtest.NewServer(t)
	ctx := testContext(t)
	writer := srv.Client(t)
	put := func(rel, value string) int64 {
		t.Helper()
		resp, err := writer.Put(ctx, prefix+rel, value)
		require.NoError(t, err)
		return resp.Header.Revision
	}
	put("/k", "loaded")

	st := newRecordingState(prefix)
	noop := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) { return s, nil })
	w, err := NewEtcdWorker(srv.Client(t), prefix, noop, st)
	require.NoError(t, err)
	r := w.newRun(ctx, nil, behaviourTick, "pitfall3")
	r.watch = newWatchStream(r)
	t.Cleanup(r.close)
	require.NoError(t, r.load())
	require.Equal(t, []updateRecord{{rel: "/k", value: []byte("loaded"), isInit: true}}, st.log)
	applied := func(rev int64) func(clientv3.WatchResponse) bool {
		return func(clientv3.WatchResponse) bool { return r.eventRev >= rev }
	}

	// The first watch, opened as run.loop opens it, applies a put at A.
	r.watch.start(r.eventRev + 1)
	revA := put("/k", "A")
	pitfall3Receive(t, r, "the put at A", applied(revA))
	require.Equal(t, revA, r.eventRev)
	require.Equal(t, updateRecord{rel: "/k", value: []byte("A")}, st.log[len(st.log)-1])

	// The watch channel closes: the run schedules a new watch after a
	// back-off. Three puts land while no watch is open.
	require.NoError(t, r.watch.handle(clientv3.WatchResponse{}, false))
	require.True(t, r.watch.idle(), "a closed watch must leave the stream idle")
	gap := []int64{put("/k", "gap1"), put("/j", "gap2"), put("/k", "gap3")}
	require.Equal(t, []int64{revA + 1, revA + 2, revA + 3}, gap)
	// A head probe (as probeHead sends while the watch is silent) reports
	// etcd at A+3: headRev moves, the applied revisions must not.
	head, err := writer.Get(ctx, prefix+"/k", clientv3.WithCountOnly())
	require.NoError(t, err)
	r.handleProbe(headProbe{rev: head.Header.Revision, sent: r.now()})
	require.Equal(t, revA+3, r.headRev)
	require.Equal(t, revA, r.eventRev, "a head probe must not move the revision the watch resumes after")
	require.Equal(t, revA, r.appliedRev, "a head probe must not prove revisions the state has not applied")

	// run.loop's restart: not before the back-off, then from eventRev + 1.
	retryAt := r.watch.retryAt
	require.False(t, r.restartWatchIfDue(retryAt.Add(-time.Nanosecond)), "the watch restarted before its back-off")
	require.True(t, r.watch.idle())
	require.True(t, r.restartWatchIfDue(retryAt), "the watch did not restart once its back-off passed")
	require.False(t, r.watch.idle())
	require.False(t, r.restartWatchIfDue(retryAt), "a second watch was opened over the first")
	// A put after the restart: the restarted watch delivers it whatever
	// revision it resumed at (up to A+4), so a restart past the gap fails the
	// assertion below at once instead of waiting for the deadline.
	revAfter := put("/s", "after")
	require.Equal(t, revA+4, revAfter)
	before := len(st.log)
	pitfall3Receive(t, r, "the puts made while no watch was open", applied(revAfter))
	require.Equal(t, []updateRecord{
		{rel: "/k", value: []byte("gap1")},
		{rel: "/j", value: []byte("gap2")},
		{rel: "/k", value: []byte("gap3")},
		{rel: "/s", value: []byte("after")},
	}, st.log[before:], "every put made while no watch was open must reach the state once, in order")
	require.Equal(t, revAfter, r.eventRev)
	require.Equal(t, revAfter, r.appliedRev)

	// A watch one revision too early replays the last applied event (A+4);
	// the worker skips it.
	r.changed = false
	before = len(st.log)
	r.watch.start(r.eventRev)
	pitfall3Receive(t, r, "the replay of the last applied revision", func(resp clientv3.WatchResponse) bool {
		for _, ev := range resp.Events {
			if ev.Kv.ModRevision == revAfter {
				return true
			}
		}
		return false
	})
	require.Len(t, st.log, before, "a replayed event reached the state again")
	require.False(t, r.changed, "a replayed event made a Tick due")
	require.Equal(t, revAfter, r.eventRev)
	// The watch that replayed goes on with new events, each applied once.
	revLast := put("/k", "last")
	pitfall3Receive(t, r, "a put after the replay", applied(revLast))
	require.Equal(t, []updateRecord{{rel: "/k", value: []byte("last")}}, st.log[before:])
	require.Equal(t, etcdSnapshot(ctx, t, writer, prefix), stateSnapshot(st))
}
