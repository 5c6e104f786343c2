package orchestrator

// How a worker follows etcd's watch through its Source: progress
// notifications, event de-duplication by ModRevision, and where a re-watch
// resumes (see docs/DESIGN.md, "Progress probe" and "Outages"). The tests
// drive the watch handling of one Source's follower by hand, with the run
// catching up after each step (unitWatchRun, receiveUntil), or run a worker
// end to end.

import (
	"context"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// watchRun is a run with its Source's follower driven by hand: every step
// of the follower is followed by the run's catch-up, as signals would.
type watchRun struct {
	*run
	f      *follower
	watch  *watchStream
	mirror *view   // the run's view (eventRev, completeRev)
	health *health // the follower's
}

// newWatchRun returns a watchRun of a worker on cli; the watch is not
// opened.
func newWatchRun(ctx context.Context, t testing.TB, cli *clientv3.Client, prefix string, st ReactorState) *watchRun {
	t.Helper()
	noop := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) { return s, nil })
	w, err := NewEtcdWorker(cli, prefix, noop, st)
	require.NoError(t, err)
	r := w.newRun(ctx, nil, behaviourTick, "unit")
	f := &follower{s: r.src, ctx: r.ctx, clock: clockwork.NewRealClock(), log: zap.NewNop(), kick: make(chan struct{}, 1)}
	f.configure(followerSettings{progressInterval: progressInterval(&w.opts)})
	f.watch = newWatchStream(r.ctx, f.watchConfig()) //nolint:contextcheck // the run's ctx bounds the watch
	r.src.lifeMu.Lock()
	r.src.moveCursor(r.cur, true) // as attach does, without a follower of its own
	r.src.lifeMu.Unlock()
	t.Cleanup(func() { //nolint:contextcheck // cleanup after the test's ctx
		f.watch.close()
		r.close()
	})
	return &watchRun{run: r, f: f, watch: f.watch, mirror: r.view, health: &f.health}
}

// unitWatchRun returns a watchRun on a real etcd, as if the Source's load
// had ended at revision loadedRev with nothing under the prefix.
func unitWatchRun(t testing.TB, prefix string, st ReactorState, loadedRev int64) *watchRun {
	t.Helper()
	r := newWatchRun(testContext(t), t, sharedClient(t), prefix, st)
	r.src.copy.loaded(loadedRev, nil)
	r.src.loaded = true
	r.caughtUp(t)
	return r
}

// caughtUp catches the run up with its Source.
func (r *watchRun) caughtUp(t testing.TB) {
	t.Helper()
	_, ok, err := r.catchUp(nil)
	require.NoError(t, err)
	require.True(t, ok)
}

// feedWatch hands one watch response to the follower as its loop would,
// then catches the run up.
func (r *watchRun) feedWatch(resp clientv3.WatchResponse) error {
	return r.onWatch(r.watch.handle(resp, true))
}

func (r *watchRun) onWatch(res watchResult) error {
	if err := r.f.onWatch(res); err != nil {
		return err
	}
	_, _, err := r.catchUp(nil)
	return err
}

func (r *watchRun) onProbe(p headProbe) error {
	if err := r.f.onProbe(p); err != nil {
		return err
	}
	_, _, err := r.catchUp(nil)
	return err
}

// load loads the Source and catches the run up.
func (r *watchRun) load() error {
	if err := r.f.load(); err != nil {
		return err
	}
	_, _, err := r.catchUp(nil)
	return err
}

// restartWatchIfDue opens a new watch as the follower's loop would.
func (r *watchRun) restartWatchIfDue(now time.Time) bool {
	return r.watch.startIfDue(now, r.f.eventRev()+1)
}

// putEvent is a PUT event of prefix+rel at modRev.
func putEvent(prefix, rel, value string, modRev int64) *clientv3.Event {
	return &clientv3.Event{Type: mvccpb.PUT, Kv: &mvccpb.KeyValue{
		Key: []byte(prefix + rel), Value: []byte(value), ModRevision: modRev, CreateRevision: modRev,
	}}
}

// deleteEvent is a DELETE event of prefix+rel at modRev.
func deleteEvent(prefix, rel string, modRev int64) *clientv3.Event {
	return &clientv3.Event{Type: mvccpb.DELETE, Kv: &mvccpb.KeyValue{Key: []byte(prefix + rel), ModRevision: modRev}}
}

// watchResp is a watch response with header revision header and events.
func watchResp(header int64, events ...*clientv3.Event) clientv3.WatchResponse {
	return clientv3.WatchResponse{Header: &etcdserverpb.ResponseHeader{Revision: header}, Events: events}
}

// TestProgressNotifyNeverSkipsEvents: a progress notification at
// revision 100 moves appliedRev (the barrier) but not eventRev, so events at
// revisions below 100 that arrive after it are still applied; appliedRev
// never goes backwards, and an older notification does not lower it.
func TestProgressNotifyNeverSkipsEvents(t *testing.T) {
	t.Parallel()
	const prefix = "/test/notify/unit"
	st := newRecordingState(prefix)
	r := unitWatchRun(t, prefix, st, 40)

	notify := watchResp(100)
	require.True(t, notify.IsProgressNotify(), "the test's notify must look like one to clientv3")
	require.NoError(t, r.feedWatch(notify))
	require.Equal(t, int64(100), r.mirror.completeRev, "a notify proves the state complete up to its revision")
	require.Equal(t, int64(40), r.mirror.eventRev, "a notify must not move the event dedup revision")
	require.Empty(t, st.log)

	// Events below the notify's revision, delivered after it.
	late := watchResp(100,
		putEvent(prefix, "/x", "41", 41),
		putEvent(prefix, "/y", "42", 42),
		deleteEvent(prefix, "/x", 99),
	)
	require.False(t, late.IsProgressNotify())
	r.gate.changed = false
	require.NoError(t, r.feedWatch(late))
	requireFolded(t, []updateRecord{
		{rel: "/x", value: []byte("41")},
		{rel: "/y", value: []byte("42")},
		{rel: "/x", value: nil},
	}, st.log, "events after a progress notify were dropped")
	require.True(t, r.gate.changed, "applied events must make the next Tick due")
	require.Equal(t, int64(99), r.mirror.eventRev)
	require.Equal(t, int64(100), r.mirror.completeRev, "appliedRev went backwards")

	// An older notify (say, requested before the events) changes nothing.
	require.NoError(t, r.feedWatch(watchResp(90)))
	require.Equal(t, int64(100), r.mirror.completeRev, "appliedRev went backwards")
	require.Equal(t, int64(99), r.mirror.eventRev)

	// Events past the notify apply and move both revisions.
	require.NoError(t, r.feedWatch(watchResp(101, putEvent(prefix, "/z", "101", 101))))
	require.Equal(t, updateRecord{rel: "/z", value: []byte("101")}, st.log[len(st.log)-1])
	require.Len(t, st.log, 3, "/x folded: its put and delete of one catch-up are one Update")
	require.Equal(t, int64(101), r.mirror.eventRev)
	require.Equal(t, int64(101), r.mirror.completeRev)
	require.Equal(t, map[string][]byte{"/y": []byte("42"), "/z": []byte("101")}, st.values)
}

// TestProgressNotifyWorkerSeesEveryPut: a worker asking etcd for progress
// notifications every 50ms (WithMaxStaleness(200ms)) while another client
// writes sees every put of the key, once, in order, and its Ticks never see
// the value go back.
func TestProgressNotifyWorkerSeesEveryPut(t *testing.T) {
	t.Parallel()
	everyPutSeen(t, newTestEnv(t))
}

// everyPutSeen runs TestProgressNotifyWorkerSeesEveryPut against env's server.
func everyPutSeen(t *testing.T, env *testEnv) {
	const (
		prefix = "/test/notify/e2e"
		puts   = 150
	)
	ctx := testContext(t)
	writer := env.cli
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
	w, err := NewEtcdWorker(env.client(t), prefix, reactor, st, WithMaxStaleness(200*time.Millisecond))
	require.NoError(t, err)
	// The premise: the worker asks for a progress notification every 50ms.
	require.Equal(t, 50*time.Millisecond, progressInterval(&w.opts))

	done := runAsync(ctx, w, nil, behaviourTick, "notify")
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
	// A worker that falls behind is caught up to the newest value (puts
	// folded), but no value is lost at the end, told twice or out of order.
	require.Equal(t, strconv.Itoa(puts), got[len(got)-1], "the newest put of /k reached the state")
	for i := 1; i < len(got); i++ {
		require.Less(t, mustInt(t, []byte(got[i-1])), mustInt(t, []byte(got[i])), "the state must see the puts of /k once each, in order")
	}
}

// requireFolded requires that got is want with changes of one key folded:
// for each key, the values got tells are a subsequence of those want
// tells, in order, ending with the last one (a catch-up tells a key once,
// with its newest value; nothing is lost, repeated or reordered).
func requireFolded(t testing.TB, want, got []updateRecord, msg string) {
	t.Helper()
	per := func(log []updateRecord) map[string][]string {
		m := map[string][]string{}
		for _, u := range log {
			v := "<deleted>"
			if u.value != nil {
				v = string(u.value)
			}
			m[u.rel] = append(m[u.rel], v)
		}
		return m
	}
	w, g := per(want), per(got)
	for key, wv := range w {
		gv := g[key]
		if len(gv) == 0 {
			// A key created and deleted within one catch-up is never told.
			require.Equal(t, "<deleted>", wv[len(wv)-1], "%s: %s never told", msg, key)
			continue
		}
		require.Equal(t, wv[len(wv)-1], gv[len(gv)-1], "%s: %s ends with another value", msg, key)
		i := 0
		for _, v := range gv {
			for i < len(wv) && wv[i] != v {
				i++
			}
			require.Less(t, i, len(wv), "%s: %s told %v, want a subsequence of %v", msg, key, gv, wv)
			i++
		}
	}
	require.Len(t, g, len(w)-keysNeverTold(w, g), "%s: keys told that did not change", msg)
}

// keysNeverTold counts the keys of want that got does not tell.
func keysNeverTold(want, got map[string][]string) int {
	n := 0
	for k := range want {
		if _, ok := got[k]; !ok {
			n++
		}
	}
	return n
}

// TestWatchDedupsByModRevisionNotHeader: responses are ordered and de-duplicated by
// each event's ModRevision, never by the header revision. Two responses with
// the same header revision both apply, in order; events at or below what was
// applied (a replay) are skipped, once each, while new events of the same
// response apply; several events of one revision (one Txn) all apply.
func TestWatchDedupsByModRevisionNotHeader(t *testing.T) {
	t.Parallel()
	const prefix = "/test/dedup"
	st := newRecordingState(prefix)
	r := unitWatchRun(t, prefix, st, 9)

	// A backlog delivered in chunks, all with the header revision 20.
	require.NoError(t, r.feedWatch(watchResp(20, putEvent(prefix, "/a", "a10", 10))))
	require.NoError(t, r.feedWatch(watchResp(20, putEvent(prefix, "/b", "b11", 11))))
	require.Equal(t, []updateRecord{
		{rel: "/a", value: []byte("a10")},
		{rel: "/b", value: []byte("b11")},
	}, st.log, "a response with the same header revision as the previous one was dropped")
	require.Equal(t, int64(11), r.mirror.eventRev)

	// A replay of 11 followed by a Txn at 12 writing two keys.
	require.NoError(t, r.feedWatch(watchResp(20,
		putEvent(prefix, "/b", "b11", 11),
		putEvent(prefix, "/c", "c12", 12),
		putEvent(prefix, "/d", "d12", 12),
	)))
	// A whole replayed response, including a delete.
	require.NoError(t, r.feedWatch(watchResp(20, deleteEvent(prefix, "/c", 13))))
	require.NoError(t, r.feedWatch(watchResp(21,
		putEvent(prefix, "/a", "a10", 10),
		putEvent(prefix, "/b", "b11", 11),
		putEvent(prefix, "/c", "c12", 12),
		deleteEvent(prefix, "/c", 13),
	)))
	require.Equal(t, []updateRecord{
		{rel: "/a", value: []byte("a10")},
		{rel: "/b", value: []byte("b11")},
		{rel: "/c", value: []byte("c12")},
		{rel: "/d", value: []byte("d12")},
		{rel: "/c", value: nil},
	}, st.log, "each event must be applied exactly once, in revision order")
	require.Equal(t, int64(13), r.mirror.eventRev)
	require.Equal(t, int64(13), r.mirror.completeRev)
	require.Equal(t, map[string][]byte{"/a": []byte("a10"), "/b": []byte("b11"), "/d": []byte("d12")}, st.values)
}

// receiveUntil hands r's watch to handle as run.wait does (the opened
// channel to established, each response to handle) until done, asked after
// each handled response, returns true. A closed watch channel fails the test;
// the run's context (the test's, through newRun) bounds the wait.
func receiveUntil(t testing.TB, r *watchRun, what string, done func(clientv3.WatchResponse) bool) {
	t.Helper()
	for {
		select {
		case <-r.ctx.Done():
			t.Fatalf("timed out waiting for %s (eventRev %d): %v", what, r.mirror.eventRev, r.ctx.Err())
		case ch := <-r.watch.opened:
			r.watch.established(ch)
		case resp, ok := <-r.watch.ch:
			require.True(t, ok, "the watch closed while waiting for %s", what)
			require.NoError(t, r.feedWatch(resp))
			if done(resp) {
				return
			}
		}
	}
}

// TestWatchResumesAfterLastAppliedRevision: the worker's watch closes after it
// applied a put at revision A; three puts land at A+1..A+3 while no watch is
// open, and a head probe tells the run that etcd is at A+3. The restart that
// run.loop makes (restartWatchIfDue, once the back-off has passed) must
// resume at the last applied revision + 1: the state gets A+1..A+3 once each,
// in order, then a put made after the restart. A restart past what was
// applied (from the probed head, say) would lose some of them. Then a watch
// started one revision too early (at the last applied revision, as a re-watch
// from the last header revision would) replays that revision's event, and the
// worker skips it: no Update, eventRev unchanged, no Tick made due.
func TestWatchResumesAfterLastAppliedRevision(t *testing.T) {
	t.Parallel()
	const prefix = "/test/resume"
	env := newTestEnv(t, ownServer()) // counts revisions: no other writer
	ctx := testContext(t)
	writer := env.cli
	put := func(rel, value string) int64 {
		t.Helper()
		resp, err := writer.Put(ctx, prefix+rel, value)
		require.NoError(t, err)
		return resp.Header.Revision
	}
	put("/k", "loaded")

	st := newRecordingState(prefix)
	r := newWatchRun(ctx, t, env.client(t), prefix, st)
	require.NoError(t, r.load())
	require.Equal(t, []updateRecord{{rel: "/k", value: []byte("loaded"), isInit: true}}, st.log)

	// The first watch, opened as run.loop opens it, applies a put at A.
	r.watch.start(r.mirror.eventRev + 1)
	revA := put("/k", "A")
	receiveUntil(t, r, "the put at A", appliedAtLeast(r, revA))
	require.Equal(t, revA, r.mirror.eventRev)
	require.Equal(t, updateRecord{rel: "/k", value: []byte("A")}, st.log[len(st.log)-1])

	// The watch channel closes: the run schedules a new watch after a
	// back-off. Three puts land while no watch is open.
	require.NoError(t, r.onWatch(r.watch.handle(clientv3.WatchResponse{}, false)))
	require.True(t, r.watch.idle(), "a closed watch must leave the stream idle")
	gap := []int64{put("/k", "gap1"), put("/j", "gap2"), put("/k", "gap3")}
	require.Equal(t, []int64{revA + 1, revA + 2, revA + 3}, gap)
	// A head probe (as probeHead sends while the watch is silent) reports
	// etcd at A+3: headRev moves, the applied revisions must not.
	head, err := writer.Get(ctx, prefix+"/k", clientv3.WithCountOnly())
	require.NoError(t, err)
	require.NoError(t, r.onProbe(headProbe{rev: head.Header.Revision, sent: r.now()}))
	require.Equal(t, revA+3, r.health.headRev)
	require.Equal(t, revA, r.mirror.eventRev, "a head probe must not move the revision the watch resumes after")
	require.Equal(t, revA, r.mirror.completeRev, "a head probe must not prove revisions the state has not applied")

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
	receiveUntil(t, r, "the puts made while no watch was open", appliedAtLeast(r, revAfter))
	requireFolded(t, []updateRecord{
		{rel: "/k", value: []byte("gap1")},
		{rel: "/j", value: []byte("gap2")},
		{rel: "/k", value: []byte("gap3")},
		{rel: "/s", value: []byte("after")},
	}, st.log[before:], "every put made while no watch was open must reach the state, once, in order")
	require.Equal(t, revAfter, r.mirror.eventRev)
	require.Equal(t, revAfter, r.mirror.completeRev)

	requireReplaySkipped(ctx, t, r, st, put, revAfter, writer, prefix)
}

// appliedAtLeast is a receiveUntil condition: r applied the events up to
// rev.
func appliedAtLeast(r *watchRun, rev int64) func(clientv3.WatchResponse) bool {
	return func(clientv3.WatchResponse) bool { return r.mirror.eventRev >= rev }
}

// requireReplaySkipped is the last phase of
// TestWatchResumesAfterLastAppliedRevision: a watch started one revision too
// early replays the last applied event (revAfter), which the worker skips,
// then goes on with new events, each applied once.
func requireReplaySkipped(ctx context.Context, t *testing.T, r *watchRun, st *recordingState,
	put func(rel, value string) int64, revAfter int64, writer *clientv3.Client, prefix string,
) {
	t.Helper()
	r.gate.changed = false
	before := len(st.log)
	r.watch.start(r.mirror.eventRev) //nolint:contextcheck // the watch runs on the run's ctx
	//nolint:contextcheck // the watch runs on the run's ctx
	receiveUntil(t, r, "the replay of the last applied revision", func(resp clientv3.WatchResponse) bool {
		for _, ev := range resp.Events {
			if ev.Kv.ModRevision == revAfter {
				return true
			}
		}
		return false
	})
	require.Len(t, st.log, before, "a replayed event reached the state again")
	require.False(t, r.gate.changed, "a replayed event made a Tick due")
	require.Equal(t, revAfter, r.mirror.eventRev)
	// The watch that replayed goes on with new events, each applied once.
	revLast := put("/k", "last")
	receiveUntil(t, r, "a put after the replay", appliedAtLeast(r, revLast)) //nolint:contextcheck // the run's ctx
	require.Equal(t, []updateRecord{{rel: "/k", value: []byte("last")}}, st.log[before:])
	require.Equal(t, etcdSnapshot(ctx, t, writer, prefix), stringValues(st.values))
}
