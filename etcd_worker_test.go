package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	pingcaperrors "github.com/pingcap/errors"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/util"
)

// TestEtcdWorkerEmptyOrNil: an empty value and a deleted key are different
// things, both ways. A put of []byte{} (by etcd clients and by patches)
// reaches Update as a non-nil zero-length slice, at the initial load and on
// the watch; a delete reaches it as nil. A patch returning []byte{} writes an
// empty value; nil with changed = true deletes.
func TestEtcdWorkerEmptyOrNil(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	ctx := testContext(t)
	const prefix = "/test/emptyornil"
	mustPutKV(ctx, t, cli, prefix+"/init", "")

	isEmpty := func(st *recordingState, rel string) bool {
		v, ok := st.values[rel]
		return ok && v != nil && len(v) == 0
	}
	st := newRecordingState(prefix)
	reactor := newStepReactor(
		when(func(st *recordingState) bool { return isEmpty(st, "/init") }, func(_ context.Context, st *recordingState) error {
			st.group(setPatch(st.key("/k1"), []byte{}), setPatch(st.key("/k2"), []byte("x")))
			return nil
		}),
		when(func(st *recordingState) bool { return isEmpty(st, "/k1") && st.has("/k2", "x") }, func(ctx context.Context, st *recordingState) error {
			st.group(deletePatch(st.key("/k2")))
			if _, err := cli.Put(ctx, prefix+"/ext", ""); err != nil {
				return err
			}
			_, err := cli.Delete(ctx, prefix+"/init")
			return err
		}),
		when(func(st *recordingState) bool {
			return st.absent("/k2") && st.absent("/init") && isEmpty(st, "/ext")
		}, func(_ context.Context, st *recordingState) error {
			// Flip them: the empty key is deleted, the deleted one emptied.
			st.group(deletePatch(st.key("/k1")), setPatch(st.key("/k2"), []byte{}))
			return nil
		}),
		when(func(st *recordingState) bool { return st.absent("/k1") && isEmpty(st, "/k2") }, nil),
	)
	require.NoError(t, runWorker(ctx, t, cli, prefix, reactor, st))

	type seen struct {
		isNil  bool
		len    int
		isInit bool
	}
	summarize := func(rel string) []seen {
		var out []seen
		for _, u := range st.updatesOf(rel) {
			out = append(out, seen{isNil: u.value == nil, len: len(u.value), isInit: u.isInit})
		}
		return out
	}
	require.Equal(t, []seen{{isInit: true}, {isNil: true}}, summarize("/init"))
	require.Equal(t, []seen{{}}, summarize("/ext"))
	require.Equal(t, []seen{{}, {isNil: true}}, summarize("/k1"))
	require.Equal(t, []seen{{len: 1}, {isNil: true}, {}}, summarize("/k2"))

	resp, err := cli.Get(ctx, prefix+"/k2")
	require.NoError(t, err)
	require.Len(t, resp.Kvs, 1, "a patch returning []byte{} must write the key")
	require.Empty(t, resp.Kvs[0].Value)
	require.Equal(t, map[string]string{"/k2": "", "/ext": ""}, etcdSnapshot(ctx, t, cli, prefix))
}

// TestEtcdWorkerModifyAfterDelete: a key deleted and recreated, by patches
// and by another client, is tracked by the state through every step, and a
// patch on the recreated key sees the new value.
func TestEtcdWorkerModifyAfterDelete(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	ctx := testContext(t)
	const prefix = "/test/modafterdel"
	mustPutKV(ctx, t, cli, prefix+"/k", "orig")

	st := newRecordingState(prefix)
	reactor := newStepReactor(
		when(func(st *recordingState) bool { return st.has("/k", "orig") }, func(_ context.Context, st *recordingState) error {
			st.group(deletePatch(st.key("/k")))
			return nil
		}),
		when(func(st *recordingState) bool { return st.absent("/k") }, func(_ context.Context, st *recordingState) error {
			st.group(SingleDataPatch{Key: st.key("/k"), Func: func(old []byte) ([]byte, bool, error) {
				if old != nil {
					return nil, false, fmt.Errorf("recreate: deleted key has value %q", old)
				}
				return []byte("re1"), true, nil
			}})
			return nil
		}),
		when(func(st *recordingState) bool { return st.has("/k", "re1") }, func(ctx context.Context, _ *recordingState) error {
			_, err := cli.Delete(ctx, prefix+"/k")
			return err
		}),
		when(func(st *recordingState) bool { return st.absent("/k") }, func(ctx context.Context, _ *recordingState) error {
			_, err := cli.Put(ctx, prefix+"/k", "re2")
			return err
		}),
		when(func(st *recordingState) bool { return st.has("/k", "re2") }, func(_ context.Context, st *recordingState) error {
			st.group(st.appendTo("/k", "+w"))
			return nil
		}),
		when(func(st *recordingState) bool { return st.has("/k", "re2+w") }, nil),
	)
	require.NoError(t, runWorker(ctx, t, cli, prefix, reactor, st))

	var got []string
	for _, u := range st.updatesOf("/k") {
		if u.value == nil {
			got = append(got, "<deleted>")
		} else {
			got = append(got, string(u.value))
		}
	}
	require.Equal(t, []string{"orig", "<deleted>", "re1", "<deleted>", "re2", "re2+w"}, got)
	require.Equal(t, map[string]string{"/k": "re2+w"}, etcdSnapshot(ctx, t, cli, prefix))
}

// runTwiceReactor is the reactor of TestEtcdWorkerRunTwice. In phase 0 it
// commits /a=10 and /d=4, then closes ticked and keeps ticking; in phase 1 it
// checks the reloaded snapshot, rewrites /a and finishes.
func runTwiceReactor(phase *atomic.Int64, ticked chan struct{}) Reactor {
	var tickedOnce atomic.Bool
	return ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*recordingState)
		switch phase.Load() {
		case 0:
			if st.has("/a", "10") && st.has("/d", "4") {
				if tickedOnce.CompareAndSwap(false, true) {
					close(ticked)
				}
				return st, nil
			}
			if st.has("/a", "1") {
				st.group(setPatch(st.key("/a"), []byte("10")), setPatch(st.key("/d"), []byte("4")))
			}
			return st, nil
		default:
			want := map[string]string{"/a": "10", "/c": "30", "/d": "4", "/e": "5"}
			got := stringValues(st.values)
			if st.has("/a", "11") {
				return st, ErrReactorFinished
			}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				return st, fmt.Errorf("second run's first snapshot %v, want %v", got, want)
			}
			// Rewrite a key the first run wrote: compares must use the
			// revisions of the reload, not stale ones.
			st.group(SingleDataPatch{Key: st.key("/a"), Func: func(old []byte) ([]byte, bool, error) {
				if string(old) != "10" {
					return nil, false, fmt.Errorf("second run patch saw /a = %q", old)
				}
				return []byte("11"), true, nil
			}})
			return st, nil
		}
	})
}

// TestEtcdWorkerRunTwice: Run on a worker that is running returns
// ErrWorkerRunning at once; after it returned, the same worker runs again,
// reloads what changed in between (also deletions, with isInit = true),
// ends up with the same state as a fresh worker and commits normally.
func TestEtcdWorkerRunTwice(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	ctx := testContext(t)
	const prefix = "/test/runtwice"
	for k, v := range map[string]string{"/a": "1", "/b": "2", "/c": "3"} {
		mustPutKV(ctx, t, cli, prefix+k, v)
	}

	// First run: commits, then keeps ticking until cancelled.
	ticked := make(chan struct{})
	var phase atomic.Int64
	reactor := runTwiceReactor(&phase, ticked)
	st := newRecordingState(prefix)
	w := mustNewEtcdWorker(t, cli, prefix, reactor, st)

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	first := runAsync(runCtx, w, nil, behaviourTick, "first")
	awaitSignal(ctx, t, ticked, "first run never committed")
	// A short deadline, so that a worker that wrongly starts a second run
	// fails the test quickly instead of running until the test's deadline.
	concCtx, concCancel := context.WithTimeout(ctx, 5*time.Second)
	defer concCancel()
	require.ErrorIs(t, w.Run(concCtx, nil, behaviourTick, "concurrent"), ErrWorkerRunning)
	cancel()
	require.ErrorIs(t, recvErr(ctx, t, first), context.Canceled)

	// Changes while the worker is stopped.
	_, err := cli.Delete(ctx, prefix+"/b")
	require.NoError(t, err)
	mustPutKV(ctx, t, cli, prefix+"/c", "30")
	mustPutKV(ctx, t, cli, prefix+"/e", "5")

	phase.Store(1)
	logStart := len(st.log)
	require.NoError(t, w.Run(ctx, nil, behaviourTick, "second"))
	require.Contains(t, st.log[logStart:], updateRecord{rel: "/b", value: nil, isInit: true},
		"the reload did not report the key deleted while the worker was stopped")
	want := map[string]string{"/a": "11", "/c": "30", "/d": "4", "/e": "5"}
	require.Equal(t, want, etcdSnapshot(ctx, t, cli, prefix))
	require.Equal(t, want, stringValues(st.values))

	// A fresh worker sees the same.
	fresh := newRecordingState(prefix)
	require.NoError(t, runWorker(ctx, t, cli, prefix, newStepReactor(when(always, nil)), fresh))
	require.Equal(t, want, stringValues(fresh.values))
}

// TestEtcdWorkerLongTimerInterval: with a timerInterval above one second
// the worker keeps ticking on the timer (the original computed the tick
// rate with integer Duration division and ticked once, never again).
func TestEtcdWorkerLongTimerInterval(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	ctx, cancel := context.WithTimeout(testContext(t), 15*time.Second)
	defer cancel()
	const interval = 2 * time.Second
	var times []time.Time
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		times = append(times, time.Now())
		if len(times) == 3 {
			return s, ErrReactorFinished
		}
		return s, nil
	})
	w := mustNewEtcdWorker(t, cli, "/test/longinterval", reactor, newRecordingState("/test/longinterval"))
	require.NoError(t, w.Run(ctx, nil, interval, "long"))
	require.Len(t, times, 3)
	for i := 1; i < len(times); i++ {
		// Timer ticks, not a burst: each one an interval after the last
		// (with slack for timer granularity).
		require.GreaterOrEqual(t, times[i].Sub(times[i-1]), interval-100*time.Millisecond)
	}
}

// TestEtcdWorkerReservedKeysInvisible: the worker's own keys (commit token,
// delete counter) never reach the state, at the initial load of a second
// worker nor on the watch of the writing one. recordingState fails Update for
// them; this test makes sure both kinds exist while workers watch.
func TestEtcdWorkerReservedKeysInvisible(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	ctx := testContext(t)
	const prefix = "/test/reserved"
	mustPutKV(ctx, t, cli, prefix+"/x", "1")

	// Worker 1 deletes (creating the delete counter) and writes; it stays
	// running so that its token exists when worker 2 loads.
	loaded := make(chan struct{})
	st1 := newRecordingState(prefix)
	r1 := newStepReactor(
		when(always, func(_ context.Context, st *recordingState) error {
			st.group(deletePatch(st.key("/x")), setPatch(st.key("/y"), []byte("1")))
			return nil
		}),
		// After its own commit x is gone; y may already be gone too when
		// worker 2's commit arrives in the same watch response, so only x
		// is waited for.
		when(func(st *recordingState) bool { return st.absent("/x") }, func(ctx context.Context, _ *recordingState) error {
			return blockUntil(ctx, loaded)
		}),
	)
	w1 := mustNewEtcdWorker(t, cli, prefix, r1, st1)
	done1 := runAsync(ctx, w1, nil, behaviourTick, "w1")

	waitUntil(ctx, t, "worker 1's commit", func() bool {
		resp, err := cli.Get(ctx, prefix+reservedDir, clientv3.WithPrefix(), clientv3.WithCountOnly())
		return err == nil && resp.Count >= 2 // token and delete counter
	})

	st2 := newRecordingState(prefix)
	r2 := newStepReactor(
		when(func(st *recordingState) bool { return st.has("/y", "1") }, func(_ context.Context, st *recordingState) error {
			close(loaded)
			st.group(setPatch(st.key("/z"), []byte("1")), deletePatch(st.key("/y")))
			return nil
		}),
		when(func(st *recordingState) bool { return st.has("/z", "1") && st.absent("/y") }, nil),
	)
	require.NoError(t, runWorker(ctx, t, cli, prefix, r2, st2))
	require.NoError(t, recvErr(ctx, t, done1))
	for _, st := range []*recordingState{st1, st2} {
		for _, u := range st.log {
			require.NotContains(t, u.rel, "__orchestrator")
		}
	}
}

// TestNewEtcdWorkerInvalidArgument: nil client, reactor or state (also a
// typed nil) is an error matching ErrInvalidArgument, never a panic.
func TestNewEtcdWorkerInvalidArgument(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	okReactor := idleReactor()
	okState := newRecordingState("/p")
	cases := []struct {
		name    string
		cli     *clientv3.Client
		reactor Reactor
		state   ReactorState
	}{
		{"nil client", nil, okReactor, okState},
		{"nil reactor", cli, nil, okState},
		{"nil ReactorFunc", cli, ReactorFunc(nil), okState},
		{"typed nil reactor", cli, (*stepReactor)(nil), okState},
		{"nil state", cli, okReactor, nil},
		{"typed nil state", cli, okReactor, (*recordingState)(nil)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w, err := NewEtcdWorker(tc.cli, "/p", tc.reactor, tc.state)
			require.ErrorIs(t, err, ErrInvalidArgument)
			require.Nil(t, w)
		})
	}
}

// stopsWorker returns a worker for one case of TestEtcdWorkerRunStops.
type stopsWorker func(t *testing.T, reactor Reactor) *EtcdWorker

// stopsForever ticks and writes a counter until stopped; started (if not
// nil) is closed at the first Tick that saw its own first commit.
func stopsForever(started chan struct{}) Reactor {
	var once atomic.Bool
	return ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*recordingState)
		if _, ok := st.values["/n"]; ok && once.CompareAndSwap(false, true) && started != nil {
			close(started)
		}
		st.group(st.appendTo("/n", "."))
		return st, nil
	})
}

// waitStarted waits for a stopsForever reactor to see its own commit.
func waitStarted(ctx context.Context, t *testing.T, started chan struct{}) {
	t.Helper()
	awaitSignal(ctx, t, started, "worker never ticked on its own commit")
}

// TestEtcdWorkerRunStops covers the ways Run ends that are not user errors:
// bad timerInterval, ctx cancelled (before and during Run), ctx deadline, and
// a session whose lease is revoked.
func TestEtcdWorkerRunStops(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	newWorker := func(t *testing.T, reactor Reactor) *EtcdWorker {
		w := mustNewEtcdWorker(t, cli, "/test/stops/"+t.Name(), reactor, newRecordingState("/test/stops/"+t.Name()))
		return w
	}
	t.Run("non-positive timerInterval", func(t *testing.T) {
		ctx := testContext(t)
		w := newWorker(t, stopsForever(nil))
		for _, d := range []time.Duration{0, -time.Second} {
			require.ErrorIs(t, w.Run(ctx, nil, d, "bad"), ErrInvalidArgument)
		}
		// The rejected calls did not leave the worker marked as running.
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		require.ErrorIs(t, w.Run(cctx, nil, behaviourTick, "ok"), context.Canceled)
	})

	runStopsOnContext(t, newWorker)
	runStopsOnSession(t, cli, newWorker)
}

// runStopsOnContext: Run ends with ctx's error, cause included.
func runStopsOnContext(t *testing.T, newWorker stopsWorker) {
	t.Run("ctx cancelled before Run", func(t *testing.T) {
		ctx, cancel := context.WithCancel(testContext(t))
		cancel()
		err := newWorker(t, stopsForever(nil)).Run(ctx, nil, behaviourTick, "cancelled")
		require.ErrorIs(t, err, context.Canceled)
		require.ErrorIs(t, err, ctx.Err())
	})

	t.Run("ctx cancelled while running", func(t *testing.T) {
		ctx, cancel := context.WithCancel(testContext(t))
		defer cancel()
		started := make(chan struct{})
		w := newWorker(t, stopsForever(started))
		done := runAsync(ctx, w, nil, behaviourTick, "cancel")
		waitStarted(ctx, t, started)
		cancel()
		require.ErrorIs(t, recvErr(testContext(t), t, done), context.Canceled)
	})

	t.Run("deadline", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(testContext(t), 300*time.Millisecond)
		defer cancel()
		err := newWorker(t, stopsForever(nil)).Run(ctx, nil, behaviourTick, "deadline")
		require.ErrorIs(t, err, context.DeadlineExceeded)
		require.ErrorIs(t, err, ctx.Err())
	})

	t.Run("ctx cancelled with a cause", func(t *testing.T) {
		// errors.Is(err, ctx.Err()) must hold also when the caller gave a
		// cause (context.WithCancelCause / WithTimeoutCause); the cause is
		// reported too.
		errShutdown := errors.New("shutting down")
		ctx, cancel := context.WithCancelCause(testContext(t))
		started := make(chan struct{})
		w := newWorker(t, stopsForever(started))
		done := runAsync(ctx, w, nil, behaviourTick, "cause")
		waitStarted(ctx, t, started)
		cancel(errShutdown)
		err := recvErr(testContext(t), t, done)
		require.ErrorIs(t, err, context.Canceled)
		require.ErrorIs(t, err, ctx.Err())
		require.ErrorIs(t, err, errShutdown)
	})

	t.Run("deadline with a cause", func(t *testing.T) {
		errTooSlow := errors.New("too slow")
		ctx, cancel := context.WithTimeoutCause(testContext(t), 300*time.Millisecond, errTooSlow)
		defer cancel()
		err := newWorker(t, stopsForever(nil)).Run(ctx, nil, behaviourTick, "deadline-cause")
		require.ErrorIs(t, err, context.DeadlineExceeded)
		require.ErrorIs(t, err, ctx.Err())
		require.ErrorIs(t, err, errTooSlow)
	})

}

// runStopsOnSession: Run ends with ErrEtcdSessionDone when the session's
// lease is revoked, busy or idle.
func runStopsOnSession(t *testing.T, cli *clientv3.Client, newWorker stopsWorker) {
	t.Run("session lease revoked", func(t *testing.T) {
		ctx := testContext(t)
		sess, err := concurrency.NewSession(sharedClient(t), concurrency.WithTTL(5))
		require.NoError(t, err)
		defer func() { _ = sess.Close() }()
		started := make(chan struct{})
		w := newWorker(t, stopsForever(started))
		done := runAsync(ctx, w, sess, behaviourTick, "session")
		waitStarted(ctx, t, started)
		require.NoError(t, etcdtest.RevokeLease(ctx, cli, sess.Lease()))
		require.ErrorIs(t, recvErr(ctx, t, done), ErrEtcdSessionDone)
	})

	t.Run("session lease revoked while idle", func(t *testing.T) {
		// No commit after the revoke: the worker must notice the session
		// itself, not through a failing commit.
		ctx := testContext(t)
		sess, err := concurrency.NewSession(sharedClient(t), concurrency.WithTTL(2))
		require.NoError(t, err)
		defer func() { _ = sess.Close() }()
		started := make(chan struct{})
		idle := newStepReactor(
			when(always, func(_ context.Context, st *recordingState) error {
				st.group(setPatch(st.key("/n"), []byte("1")))
				return nil
			}),
			func(context.Context, *recordingState) (bool, error) {
				select {
				case <-started:
				default:
					close(started)
				}
				return false, nil
			},
		)
		w := newWorker(t, idle)
		done := runAsync(ctx, w, sess, behaviourTick, "idle-session")
		waitStarted(ctx, t, started)
		require.NoError(t, etcdtest.RevokeLease(ctx, cli, sess.Lease()))
		require.ErrorIs(t, recvErr(ctx, t, done), ErrEtcdSessionDone)
	})
}

// errUserBoom is the error the user callbacks return in the error tests.
var errUserBoom = errors.New("user callback failed")

// userFailureSites are the places a user callback can fail, each as a
// reactor and a state whose callback at that place calls fail. pre puts keys
// before Run.
type userFailureSite struct {
	name    string
	pre     map[string]string
	reactor func(fail func() error) Reactor
	state   func(prefix string, fail func() error) ReactorState
}

func userFailureSites() []userFailureSite {
	plainState := func(prefix string, _ func() error) ReactorState { return newRecordingState(prefix) }
	failOn := func(rel string, init bool) func(prefix string, fail func() error) ReactorState {
		return func(prefix string, fail func() error) ReactorState {
			st := newRecordingState(prefix)
			st.onUpdate = func(r string, _ []byte, isInit bool) error {
				if r == rel && isInit == init {
					return fail()
				}
				return nil
			}
			return st
		}
	}
	emitting := func(patch func(st *recordingState, fail func() error) DataPatch) func(fail func() error) Reactor {
		return func(fail func() error) Reactor {
			return ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
				st := s.(*recordingState)
				st.group(setPatch(st.key("/ok"), []byte("1")), patch(st, fail))
				return st, nil
			})
		}
	}
	putBoom := func(st *recordingState, _ func() error) DataPatch { return setPatch(st.key("/boom"), []byte("1")) }
	return []userFailureSite{
		{
			name: "Tick",
			reactor: func(fail func() error) Reactor {
				return ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) { return s, fail() })
			},
			state: plainState,
		},
		{name: "Update at load", pre: map[string]string{"/boom": "1"}, reactor: emitting(putBoom), state: failOn("/boom", true)},
		{name: "Update on watch", reactor: emitting(putBoom), state: failOn("/boom", false)},
		{
			name: "SingleDataPatch Func",
			reactor: emitting(func(st *recordingState, fail func() error) DataPatch {
				return SingleDataPatch{Key: st.key("/p"), Func: func([]byte) ([]byte, bool, error) { return []byte("x"), true, fail() }}
			}),
			state: plainState,
		},
		{
			name: "DataPatch",
			reactor: emitting(func(_ *recordingState, fail func() error) DataPatch {
				return patchFunc(func(map[util.EtcdKey][]byte, map[util.EtcdKey]struct{}) error { return fail() })
			}),
			state: plainState,
		},
		{
			name: "GetPatches",
			reactor: func(func() error) Reactor {
				return idleReactor()
			},
			state: func(prefix string, fail func() error) ReactorState {
				return &panickyPatchesState{recordingState: newRecordingState(prefix), fail: fail}
			},
		},
	}
}

// TestEtcdWorkerUserError: an error from Tick, Update (at load and on the
// watch) or Patch ends Run with that error, wrapped: errors.Is finds it,
// also when the user wrapped it with github.com/pingcap/errors. Nothing of a
// commit whose patch failed is written.
func TestEtcdWorkerUserError(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	wraps := map[string]func(error) error{
		"plain":             func(err error) error { return err },
		"fmt wrapped":       func(err error) error { return fmt.Errorf("in callback: %w", err) },
		"pingcap Trace":     pingcaperrors.Trace,
		"pingcap Annotate":  func(err error) error { return pingcaperrors.Annotate(err, "in callback") },
		"pingcap WithStack": pingcaperrors.WithStack,
	}
	n := 0
	for _, site := range userFailureSites() {
		if site.name == "GetPatches" {
			continue // no error return; see TestEtcdWorkerPanic
		}
		for wname, wrap := range wraps {
			n++
			prefix := fmt.Sprintf("/test/usererr/%d", n)
			t.Run(site.name+"/"+wname, func(t *testing.T) {
				ctx := testContext(t)
				for k, v := range site.pre {
					mustPutKV(ctx, t, cli, prefix+k, v)
				}
				fail := func() error { return wrap(errUserBoom) }
				before := headRevision(ctx, t, cli)
				err := runWorker(ctx, t, cli, prefix, site.reactor(fail), site.state(prefix, fail))
				require.ErrorIs(t, err, errUserBoom)
				require.NotErrorIs(t, err, ErrPanic)
				if site.name != "Update on watch" {
					require.Empty(t, writesSince(ctx, t, cli, before, prefix), "the failed commit wrote something")
				}
			})
		}
	}
}

// TestEtcdWorkerPanic: a panic in Tick, Update, Patch or GetPatches ends Run
// with an error matching ErrPanic; the process survives (the test goes on).
func TestEtcdWorkerPanic(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	for i, site := range userFailureSites() {
		for j, value := range []any{"a string", errUserBoom, 42} {
			prefix := fmt.Sprintf("/test/panic/%d-%d", i, j)
			t.Run(fmt.Sprintf("%s/%T", site.name, value), func(t *testing.T) {
				ctx := testContext(t)
				for k, v := range site.pre {
					mustPutKV(ctx, t, cli, prefix+k, v)
				}
				fail := func() error { panic(value) }
				err := runWorker(ctx, t, cli, prefix, site.reactor(fail), site.state(prefix, fail))
				require.ErrorIs(t, err, ErrPanic)
				require.ErrorContains(t, err, fmt.Sprint(value))
			})
		}
	}
}

// A role that is not valid UTF-8 must not panic inside Run (prometheus label
// validation in metrics.forRole, called from newRun outside any recover).
func TestRunRoleInvalidUTF8(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(testContext(t), 5*time.Second)
	defer cancel()
	st := newMapState("/test/role")
	w, err := NewEtcdWorker(sharedClient(t), "/test/role", finishAtOnce, st)
	require.NoError(t, err)
	var panicked any
	func() {
		defer func() { panicked = recover() }()
		err = w.Run(ctx, nil, 10*time.Millisecond, "bad\xffrole")
	}()
	require.Nil(t, panicked, "Run panicked on a user-supplied role: %v", panicked)
	require.NoError(t, err)
}

// A patch that panics after writing valueMap (before recording the key in
// changedSet) must not leave its value behind for a second Run of the same
// worker: the live value map is rebuilt from what etcd has.
func TestRunAfterPanickingPatchUsesCommittedValues(t *testing.T) {
	t.Parallel()
	const prefix = "/test/phantom"
	ctx := testContext(t)
	cli := sharedClient(t)
	_, err := cli.Put(ctx, prefix+"/k", "5")
	require.NoError(t, err)

	st := newMapState(prefix)
	run := 0
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		ms := s.(*mapState)
		switch run {
		case 1:
			bad := patchFunc(func(vm map[util.EtcdKey][]byte, _ map[util.EtcdKey]struct{}) error {
				vm[ms.key("/k")] = []byte("100")
				panic("boom")
			})
			ms.patches = append(ms.patches, []DataPatch{bad})
			return ms, nil
		default:
			ms.patches = append(ms.patches, []DataPatch{incrPatch(ms.key("/k"), 1)})
			return ms, ErrReactorFinished
		}
	})
	w := mustNewEtcdWorker(t, cli, prefix, reactor, st)
	run = 1
	err = w.Run(ctx, nil, 10*time.Millisecond, "phantom")
	require.ErrorIs(t, err, ErrPanic)
	run = 2
	require.NoError(t, w.Run(ctx, nil, 10*time.Millisecond, "phantom"))
	resp, err := cli.Get(ctx, prefix+"/k")
	require.NoError(t, err)
	require.Equal(t, "6", string(resp.Kvs[0].Value), "5 + 1 expected")
}

// An Update error ends Run; a second Run of the same worker must pass that
// key to the state again (the load does not skip it as already known).
func TestRunAfterUpdateErrorResendsKey(t *testing.T) {
	t.Parallel()
	const prefix = "/test/upderr"
	ctx := testContext(t)
	cli := sharedClient(t)
	st := &failingState{mapState: newMapState(prefix), failKey: prefix + "/x"}
	ticks := 0
	var sawX bool
	run := 1
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		ticks++
		if run == 1 && ticks == 1 {
			if _, err := cli.Put(ctx, prefix+"/x", "1"); err != nil {
				return nil, err
			}
		}
		if run == 2 {
			_, sawX = st.values["/x"]
			return s, ErrReactorFinished
		}
		return s, nil
	})
	w := mustNewEtcdWorker(t, cli, prefix, reactor, st)
	err := w.Run(ctx, nil, 10*time.Millisecond, "upderr")
	require.ErrorContains(t, err, "transient update failure")
	run = 2
	require.NoError(t, w.Run(ctx, nil, 10*time.Millisecond, "upderr"))
	require.True(t, sawX, "state never learned /x after the re-run")
}

// Tick returning (nil, ErrReactorFinished): Run returns nil after committing
// the returned patches (there are none).
func TestRunFinishedWithNilState(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	w, err := NewEtcdWorker(sharedClient(t), "/test/nilstate", ReactorFunc(func(context.Context, ReactorState) (ReactorState, error) {
		return nil, ErrReactorFinished
	}), newMapState("/test/nilstate"))
	require.NoError(t, err)
	require.NoError(t, w.Run(ctx, nil, 10*time.Millisecond, "nil"))
}
