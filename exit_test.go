package orchestrator

// Every way Run can end, against real embedded etcd: for each exit cause,
// what README's "How Run returns" table, Run's doc comment and
// IsCleanStop's doc promise — the sentinels errors.Is finds, errors.Is(err,
// ctx.Err()) once ctx ended, IsCleanStop's verdict, nothing of a refused
// group written, a prompt return and no goroutine of the worker left.

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/etcdworker/orchestrator/util"
)

// ---------------------------------------------------------------------------
// Helpers.

var errExitUser = errors.New("exit: user code failed")

// exitState is a mapState whose Update calls onUpdate first (if set) for
// the key ending in "/trigger".
type exitState struct {
	*mapState
	onUpdate func() error
}

func newExitState(prefix string) *exitState { return &exitState{mapState: newMapState(prefix)} }

func (s *exitState) Update(key util.EtcdKey, value []byte, isInit bool) error {
	if s.onUpdate != nil && strings.HasSuffix(key.String(), "/trigger") && value != nil {
		if err := s.onUpdate(); err != nil {
			return err
		}
	}
	return s.mapState.Update(key, value, isInit)
}

// manualDeadline is a context that ends with context.DeadlineExceeded when
// expire is called: a deadline that passes at a moment the test chooses.
type manualDeadline struct {
	done chan struct{}
	once sync.Once
}

func newManualDeadline() *manualDeadline { return &manualDeadline{done: make(chan struct{})} }

func (d *manualDeadline) expire()                     { d.once.Do(func() { close(d.done) }) }
func (d *manualDeadline) Deadline() (time.Time, bool) { return time.Time{}, false }
func (d *manualDeadline) Done() <-chan struct{}       { return d.done }
func (d *manualDeadline) Value(any) any               { return nil }
func (d *manualDeadline) Err() error {
	select {
	case <-d.done:
		return context.DeadlineExceeded
	default:
		return nil
	}
}

// hookLogger is faultLogger calling fn for every entry it logs (warnings and
// errors).
func hookLogger(t testing.TB, fn func(e zapcore.Entry)) *zap.Logger {
	return faultLogger(t).WithOptions(zap.Hooks(func(e zapcore.Entry) error { fn(e); return nil }))
}

// exitDir is the directory of the package's sources.
func exitDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(file) + string(filepath.Separator)
}

// workerGoroutines returns the stacks of goroutines running (or started by)
// the package's non-test code, test servers and proxies left out.
// goroutinesLeftBy waits up to a second for the worker goroutines that
// were not there before (by goroutine id; other tests' Runs may still be
// shutting down meanwhile) to end, and returns those still there.
func goroutinesLeftBy(before []string) []string {
	had := map[string]bool{}
	for _, g := range before {
		had[goroutineID(g)] = true
	}
	var left []string
	for deadline := time.Now().Add(time.Second); ; {
		left = left[:0]
		for _, g := range workerGoroutines() {
			if !had[goroutineID(g)] {
				left = append(left, g)
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(time.Millisecond)
	}
}

// goroutineID returns the "goroutine N" header of a goroutine's stack.
func goroutineID(stack string) string {
	id, _, _ := strings.Cut(stack, " [")
	return id
}

func workerGoroutines() []string {
	buf := make([]byte, 8<<20)
	buf = buf[:runtime.Stack(buf, true)]
	dir := exitDir()
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		for _, line := range strings.Split(g, "\n") {
			line = strings.TrimSpace(line)
			if !strings.HasPrefix(line, dir) {
				continue
			}
			file := line[:strings.LastIndex(line, ":")]
			if strings.HasSuffix(file, "_test.go") || strings.Contains(file, "/internal/etcdtest/") ||
				strings.Contains(file, "/internal/embedetcd/") {
				continue
			}
			out = append(out, g)
			break
		}
	}
	return out
}

// exitWant is what a case expects of Run's error.
type exitWant struct {
	is     []error // errors.Is must find each
	not    []error // and none of these
	nilErr bool
	clean  bool
	within time.Duration // from the trigger (0: 3s)
}

// exitGot is how Run ended.
type exitGot struct {
	err  error
	ctx  runContext    // Run's ctx
	took time.Duration // from the trigger to Run's return
}

// runContext is what awaitExit needs of Run's ctx: whether it ended.
type runContext interface{ Err() error }

// awaitExit waits for Run's result and checks right away that no goroutine
// of the worker is left.
func awaitExit(t *testing.T, runCtx runContext, done <-chan error, trigger time.Time) exitGot {
	t.Helper()
	err := recvErr(contextWithin(t, 20*time.Second), t, done)
	// Goroutines left behind are TestExitNoGoroutineAtReturn's (the cases
	// here run in parallel with other tests, whose goroutines are alive).
	got := exitGot{err: err, ctx: runCtx, took: time.Since(trigger)}
	t.Logf("Run returned after %v: %v", got.took, err)
	return got
}

func checkExit(t *testing.T, got exitGot, want exitWant) {
	t.Helper()
	err := got.err
	if want.nilErr {
		require.NoError(t, err)
	} else {
		require.Error(t, err)
	}
	for _, e := range want.is {
		require.ErrorIs(t, err, e)
	}
	for _, e := range want.not {
		require.NotErrorIs(t, err, e)
	}
	if got.ctx != nil && got.ctx.Err() != nil && err != nil {
		require.ErrorIs(t, err, got.ctx.Err(), "Run's ctx ended: errors.Is(err, ctx.Err()) must hold")
	}
	require.Equal(t, want.clean, IsCleanStop(err), "IsCleanStop(%v)", err)
	within := want.within
	if within == 0 {
		within = 3 * time.Second
	}
	require.Less(t, got.took, within, "Run returned late")
}

// visibleWritesSince is writesSince without the worker's reserved keys (its
// token, removed when Run returns).
func visibleWritesSince(ctx context.Context, t *testing.T, cli *clientv3.Client, rev int64, prefix string) []string {
	t.Helper()
	ks := keysOf(prefix)
	var out []string
	for _, k := range writesSince(ctx, t, cli, rev, prefix) {
		if ks.visible(k) {
			out = append(out, k)
		}
	}
	return out
}

func exitPrefix(t *testing.T) string {
	return "/test/exit/" + strings.NewReplacer(" ", "-", "/", "_", "(", "", ")", "", ",", "").Replace(t.Name())
}

// ---------------------------------------------------------------------------
// The exit causes that need no fault: the shared server.

func TestExitCauses(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := contextWithin(t, 90*time.Second)
	userErr := errExitUser

	// run starts w and returns Run's ctx, its cancel and the result channel.
	run := func(t *testing.T, w *EtcdWorker, s *concurrency.Session) (context.Context, context.CancelFunc, <-chan error) {
		runCtx, cancel := context.WithCancel(contextWithin(t, 25*time.Second))
		t.Cleanup(cancel)
		return runCtx, cancel, runAsync(runCtx, w, s, behaviourTick, "exit")
	}
	ticksAtLeast := func(t *testing.T, n *atomic.Int64, k int64) {
		waitWithin(t, 10*time.Second, "ticks", nil, func() bool { return n.Load() >= k })
	}
	// once makes a reactor that queues groups() on its first Tick and
	// returns ret (its other Ticks return nil, queueing nothing).
	once := func(groups func(st *mapState) [][]DataPatch, ret error) Reactor {
		var done atomic.Bool
		return ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
			st := s.(*mapState)
			if done.Swap(true) {
				return st, nil
			}
			if groups != nil {
				st.patches = append(st.patches, groups(st)...)
			}
			return st, ret
		})
	}
	refused := func(name string, opts []Option, groups func(st *mapState) [][]DataPatch, want exitWant, msg string) {
		t.Run(name, func(t *testing.T) {
			prefix := exitPrefix(t)
			clearPrefix(ctx, t, env.cli, prefix)
			mustPutKV(ctx, t, env.cli, prefix+"/existing", "old")
			before := headRevision(ctx, t, env.cli)
			w := mustNewEtcdWorker(t, env.cli, prefix, once(groups, nil), newMapState(prefix), opts...)
			runCtx, _, done := run(t, w, nil)
			got := awaitExit(t, runCtx, done, time.Now())
			checkExit(t, got, want)
			if msg != "" {
				require.ErrorContains(t, got.err, msg)
			}
			require.Empty(t, visibleWritesSince(ctx, t, env.cli, before, prefix), "a refused commit wrote")
		})
	}

	t.Run("reactor finished, no patches", func(t *testing.T) {
		prefix := exitPrefix(t)
		w := mustNewEtcdWorker(t, env.cli, prefix, once(nil, ErrReactorFinished), newMapState(prefix))
		runCtx, _, done := run(t, w, nil)
		checkExit(t, awaitExit(t, runCtx, done, time.Now()), exitWant{nilErr: true, clean: true})
	})
	t.Run("reactor finished, nil state", func(t *testing.T) {
		prefix := exitPrefix(t)
		r := ReactorFunc(func(context.Context, ReactorState) (ReactorState, error) { return nil, ErrReactorFinished })
		w := mustNewEtcdWorker(t, env.cli, prefix, r, newMapState(prefix))
		runCtx, _, done := run(t, w, nil)
		checkExit(t, awaitExit(t, runCtx, done, time.Now()), exitWant{nilErr: true, clean: true})
	})
	t.Run("reactor finished with final patches", func(t *testing.T) {
		prefix := exitPrefix(t)
		clearPrefix(ctx, t, env.cli, prefix)
		w := mustNewEtcdWorker(t, env.cli, prefix, once(func(st *mapState) [][]DataPatch {
			var gs [][]DataPatch
			for i := range 300 { // several Txns
				gs = append(gs, []DataPatch{setPatch(st.key(fmt.Sprintf("/f%03d", i)), []byte("v"))})
			}
			return gs
		}, ErrReactorFinished), newMapState(prefix))
		runCtx, _, done := run(t, w, nil)
		checkExit(t, awaitExit(t, runCtx, done, time.Now()), exitWant{nilErr: true, clean: true})
		require.Len(t, etcdSnapshot(ctx, t, env.cli, prefix), 300, "the final patches were committed")
	})

	t.Run("cancel idle", func(t *testing.T) {
		prefix := exitPrefix(t)
		var ticks atomic.Int64
		w := mustNewEtcdWorker(t, env.cli, prefix, countingReactor(&ticks), newMapState(prefix))
		runCtx, cancel, done := run(t, w, nil)
		ticksAtLeast(t, &ticks, 3)
		start := time.Now()
		cancel()
		checkExit(t, awaitExit(t, runCtx, done, start), exitWant{is: []error{context.Canceled}, clean: true, within: time.Second})
	})
	t.Run("deadline idle", func(t *testing.T) {
		prefix := exitPrefix(t)
		var ticks atomic.Int64
		w := mustNewEtcdWorker(t, env.cli, prefix, countingReactor(&ticks), newMapState(prefix))
		runCtx, cancel := context.WithTimeout(ctx, 700*time.Millisecond)
		defer cancel()
		done := runAsync(runCtx, w, nil, behaviourTick, "exit")
		got := awaitExit(t, runCtx, done, time.Now())
		require.Positive(t, ticks.Load())
		checkExit(t, got, exitWant{is: []error{context.DeadlineExceeded}, clean: true, within: 2 * time.Second})
	})
	t.Run("cancel with cause", func(t *testing.T) {
		prefix := exitPrefix(t)
		var ticks atomic.Int64
		w := mustNewEtcdWorker(t, env.cli, prefix, countingReactor(&ticks), newMapState(prefix))
		runCtx, cancel := context.WithCancelCause(ctx)
		defer cancel(nil)
		done := runAsync(runCtx, w, nil, behaviourTick, "exit")
		ticksAtLeast(t, &ticks, 3)
		start := time.Now()
		cause := errors.New("shutting down")
		cancel(cause)
		got := awaitExit(t, runCtx, done, start)
		checkExit(t, got, exitWant{is: []error{context.Canceled, cause}, clean: true, within: time.Second})
	})
	t.Run("cancel in Tick, Tick returns ctx error", func(t *testing.T) {
		prefix := exitPrefix(t)
		entered := make(chan struct{})
		var o sync.Once
		r := ReactorFunc(func(c context.Context, s ReactorState) (ReactorState, error) {
			o.Do(func() { close(entered) })
			<-c.Done()
			return s, fmt.Errorf("backend: %w", c.Err())
		})
		w := mustNewEtcdWorker(t, env.cli, prefix, r, newMapState(prefix))
		runCtx, cancel, done := run(t, w, nil)
		awaitSignal(ctx, t, entered, "Tick")
		start := time.Now()
		cancel()
		checkExit(t, awaitExit(t, runCtx, done, start), exitWant{is: []error{context.Canceled}, clean: true, within: time.Second})
	})
	t.Run("cancel in Update, Update fails of its own", func(t *testing.T) {
		prefix := exitPrefix(t)
		clearPrefix(ctx, t, env.cli, prefix)
		st := newExitState(prefix)
		entered := make(chan struct{})
		runCtx, cancel := context.WithCancel(ctx)
		defer cancel()
		st.onUpdate = func() error {
			close(entered)
			<-runCtx.Done()
			return userErr // user code failing on the way out
		}
		w := mustNewEtcdWorker(t, env.cli, prefix, idleReactor(), st)
		done := runAsync(runCtx, w, nil, behaviourTick, "exit")
		require.NoError(t, w.WaitSynced(ctx))
		mustPutKV(ctx, t, env.cli, prefix+"/trigger", "x")
		awaitSignal(ctx, t, entered, "Update")
		start := time.Now()
		cancel()
		checkExit(t, awaitExit(t, runCtx, done, start), exitWant{is: []error{context.Canceled, userErr}, clean: true, within: time.Second})
	})
	t.Run("cancel in Patch, Patch fails of its own", func(t *testing.T) {
		prefix := exitPrefix(t)
		clearPrefix(ctx, t, env.cli, prefix)
		entered := make(chan struct{})
		runCtx, cancel := context.WithCancel(ctx)
		defer cancel()
		w := mustNewEtcdWorker(t, env.cli, prefix, once(func(st *mapState) [][]DataPatch {
			return [][]DataPatch{{setPatch(st.key("/a"), []byte("1"))}, {patchFunc(func(map[util.EtcdKey][]byte, map[util.EtcdKey]struct{}) error {
				close(entered)
				<-runCtx.Done()
				return userErr
			})}}
		}, nil), newMapState(prefix))
		before := headRevision(ctx, t, env.cli)
		done := runAsync(runCtx, w, nil, behaviourTick, "exit")
		awaitSignal(ctx, t, entered, "Patch")
		start := time.Now()
		cancel()
		checkExit(t, awaitExit(t, runCtx, done, start), exitWant{is: []error{context.Canceled, userErr}, clean: true, within: time.Second})
		require.Empty(t, visibleWritesSince(ctx, t, env.cli, before, prefix))
	})

	// Refused groups: nothing of the commit written.
	refused("group too large for ops", nil, func(st *mapState) [][]DataPatch {
		big := []DataPatch{}
		for i := range 127 {
			big = append(big, setPatch(st.key(fmt.Sprintf("/big%03d", i)), []byte("v")))
		}
		return [][]DataPatch{{setPatch(st.key("/small"), []byte("1"))}, big}
	}, exitWant{is: []error{ErrEtcdTxnOpsExceed}}, "")
	refused("group too large for bytes", []Option{WithTxnLimits(128, 64<<10)}, func(st *mapState) [][]DataPatch {
		return [][]DataPatch{{setPatch(st.key("/small"), []byte("1"))},
			{setPatch(st.key("/huge"), make([]byte, 100<<10))}}
	}, exitWant{is: []error{ErrEtcdTxnSizeExceed}}, "")
	refused("key outside the prefix", nil, func(st *mapState) [][]DataPatch {
		return [][]DataPatch{{setPatch(st.key("/small"), []byte("1"))}, {setKey("/test/exit-elsewhere/x", []byte("1"))}}
	}, exitWant{is: []error{ErrKeyOutsidePrefix}}, "/test/exit-elsewhere/x")
	refused("key in the reserved area", nil, func(st *mapState) [][]DataPatch {
		return [][]DataPatch{{setPatch(st.key("/small"), []byte("1"))}, {setPatch(st.key("/__orchestrator/x"), []byte("1"))}}
	}, exitWant{is: []error{ErrKeyOutsidePrefix}}, "__orchestrator/x")
	refused("Patch error", nil, func(st *mapState) [][]DataPatch {
		return [][]DataPatch{{setPatch(st.key("/small"), []byte("1"))}, {patchFunc(func(map[util.EtcdKey][]byte, map[util.EtcdKey]struct{}) error {
			return userErr
		})}}
	}, exitWant{is: []error{userErr}}, "")
	refused("Patch panic", nil, func(st *mapState) [][]DataPatch {
		return [][]DataPatch{{setPatch(st.key("/small"), []byte("1"))}, {SingleDataPatch{Key: st.key("/p"), Func: func([]byte) ([]byte, bool, error) {
			panic("exit: patch")
		}}}}
	}, exitWant{is: []error{ErrPanic}}, "")

	t.Run("Tick error", func(t *testing.T) {
		prefix := exitPrefix(t)
		w := mustNewEtcdWorker(t, env.cli, prefix, once(nil, userErr), newMapState(prefix))
		runCtx, _, done := run(t, w, nil)
		checkExit(t, awaitExit(t, runCtx, done, time.Now()), exitWant{is: []error{userErr}})
	})
	t.Run("Tick returns a ctx error of its own", func(t *testing.T) {
		prefix := exitPrefix(t)
		w := mustNewEtcdWorker(t, env.cli, prefix, once(nil, fmt.Errorf("backend: %w", context.Canceled)), newMapState(prefix))
		runCtx, _, done := run(t, w, nil)
		checkExit(t, awaitExit(t, runCtx, done, time.Now()), exitWant{is: []error{context.Canceled}})
	})
	t.Run("Tick panic", func(t *testing.T) {
		prefix := exitPrefix(t)
		r := ReactorFunc(func(context.Context, ReactorState) (ReactorState, error) { panic("exit: tick") })
		w := mustNewEtcdWorker(t, env.cli, prefix, r, newMapState(prefix))
		runCtx, _, done := run(t, w, nil)
		checkExit(t, awaitExit(t, runCtx, done, time.Now()), exitWant{is: []error{ErrPanic}})
	})
	t.Run("Tick nil state", func(t *testing.T) {
		prefix := exitPrefix(t)
		r := ReactorFunc(func(context.Context, ReactorState) (ReactorState, error) { return nil, nil })
		w := mustNewEtcdWorker(t, env.cli, prefix, r, newMapState(prefix))
		runCtx, _, done := run(t, w, nil)
		checkExit(t, awaitExit(t, runCtx, done, time.Now()), exitWant{is: []error{ErrInvalidArgument}})
	})
	for _, panics := range []bool{false, true} {
		t.Run(fmt.Sprintf("Update fails, panic=%v", panics), func(t *testing.T) {
			prefix := exitPrefix(t)
			clearPrefix(ctx, t, env.cli, prefix)
			st := newExitState(prefix)
			st.onUpdate = func() error {
				if panics {
					panic("exit: update")
				}
				return userErr
			}
			w := mustNewEtcdWorker(t, env.cli, prefix, idleReactor(), st)
			runCtx, _, done := run(t, w, nil)
			require.NoError(t, w.WaitSynced(ctx))
			mustPutKV(ctx, t, env.cli, prefix+"/trigger", "x")
			want := exitWant{is: []error{userErr}}
			if panics {
				want = exitWant{is: []error{ErrPanic}}
			}
			checkExit(t, awaitExit(t, runCtx, done, time.Now()), want)
		})
	}
	t.Run("GetPatches panic", func(t *testing.T) {
		prefix := exitPrefix(t)
		st := &panickyPatchesState{recordingState: newRecordingState(prefix), fail: func() error { return errExitUser }}
		w := mustNewEtcdWorker(t, env.cli, prefix, idleReactor(), st)
		runCtx, _, done := run(t, w, nil)
		checkExit(t, awaitExit(t, runCtx, done, time.Now()), exitWant{is: []error{ErrPanic}})
	})

	t.Run("session lost idle", func(t *testing.T) {
		prefix := exitPrefix(t)
		cli := env.client(t)
		s, err := concurrency.NewSession(cli, concurrency.WithTTL(2))
		require.NoError(t, err)
		defer s.Close()
		var ticks atomic.Int64
		w := mustNewEtcdWorker(t, cli, prefix, countingReactor(&ticks), newMapState(prefix))
		runCtx, _, done := run(t, w, s)
		ticksAtLeast(t, &ticks, 3)
		start := time.Now()
		_, err = env.cli.Revoke(ctx, s.Lease())
		require.NoError(t, err)
		checkExit(t, awaitExit(t, runCtx, done, start), exitWant{is: []error{ErrEtcdSessionDone}, within: 4 * time.Second})
	})
	t.Run("session lost with a commit answer lost", func(t *testing.T) {
		prefix := exitPrefix(t)
		clearPrefix(ctx, t, env.cli, prefix)
		cli := env.client(t)
		s, err := concurrency.NewSession(cli, concurrency.WithTTL(30))
		require.NoError(t, err)
		defer s.Close()
		hook := &answerHook{fn: func(_ context.Context, _ *etcdserverpb.TxnRequest, invoke func() error) error {
			if err := invoke(); err != nil {
				return err
			}
			if _, err := env.cli.Revoke(ctx, s.Lease()); err != nil {
				return err
			}
			return status.Error(codes.Unavailable, "exit: the answer was lost")
		}}
		var emitted atomic.Int64
		w := mustNewEtcdWorker(t, env.client(t, hook.dialOption()), prefix, counterReactor(&emitted), newMapState(prefix))
		runCtx, _, done := run(t, w, s)
		ticksAtLeast(t, &emitted, 3)
		start := time.Now()
		hook.armed.Store(true)
		checkExit(t, awaitExit(t, runCtx, done, start), exitWant{is: []error{ErrEtcdSessionDone, ErrCommitUnresolved}})
	})
	t.Run("fencing key lost, seen by a commit compare", func(t *testing.T) {
		prefix := exitPrefix(t)
		clearPrefix(ctx, t, env.cli, prefix)
		fenceKey := prefix + "-fence"
		put, err := env.cli.Put(ctx, fenceKey, "owner")
		require.NoError(t, err)
		var delRev atomic.Int64
		hook := &answerHook{fn: func(_ context.Context, _ *etcdserverpb.TxnRequest, invoke func() error) error {
			resp, err := env.cli.Delete(ctx, fenceKey)
			if err != nil {
				return err
			}
			delRev.Store(resp.Header.Revision)
			return invoke()
		}}
		var emitted atomic.Int64
		w := mustNewEtcdWorker(t, env.client(t, hook.dialOption()), prefix, counterReactor(&emitted), newMapState(prefix),
			WithFencingKey(fenceKey, put.Header.Revision), WithMaxStaleness(time.Minute))
		runCtx, _, done := run(t, w, nil)
		ticksAtLeast(t, &emitted, 3)
		start := time.Now()
		hook.armed.Store(true)
		checkExit(t, awaitExit(t, runCtx, done, start), exitWant{is: []error{ErrNotOwner}})
		require.Empty(t, visibleWritesSince(ctx, t, env.cli, delRev.Load(), prefix))
	})
	t.Run("fencing key lost, seen by the check", func(t *testing.T) {
		prefix := exitPrefix(t)
		fenceKey := prefix + "-fence"
		put, err := env.cli.Put(ctx, fenceKey, "owner")
		require.NoError(t, err)
		var ticks atomic.Int64
		w := mustNewEtcdWorker(t, env.cli, prefix, countingReactor(&ticks), newMapState(prefix),
			WithFencingKey(fenceKey, put.Header.Revision), WithMaxStaleness(time.Second))
		runCtx, _, done := run(t, w, nil)
		ticksAtLeast(t, &ticks, 3)
		start := time.Now()
		_, err = env.cli.Delete(ctx, fenceKey)
		require.NoError(t, err)
		checkExit(t, awaitExit(t, runCtx, done, start), exitWant{is: []error{ErrNotOwner}, within: time.Second})
	})

	t.Run("client closed before Run", func(t *testing.T) {
		prefix := exitPrefix(t)
		cli := env.client(t)
		w := mustNewEtcdWorker(t, cli, prefix, idleReactor(), newMapState(prefix))
		require.NoError(t, cli.Close())
		runCtx, _, done := run(t, w, nil)
		checkExit(t, awaitExit(t, runCtx, done, time.Now()), exitWant{is: []error{ErrEtcdRejected}, within: time.Second})
	})
	t.Run("client closed while running", func(t *testing.T) {
		prefix := exitPrefix(t)
		cli := env.client(t)
		var ticks atomic.Int64
		w := mustNewEtcdWorker(t, cli, prefix, countingReactor(&ticks), newMapState(prefix))
		runCtx, _, done := run(t, w, nil)
		ticksAtLeast(t, &ticks, 3)
		start := time.Now()
		require.NoError(t, cli.Close())
		checkExit(t, awaitExit(t, runCtx, done, start), exitWant{is: []error{ErrEtcdRejected}, within: time.Second})
	})
	t.Run("cancel, then the client closed", func(t *testing.T) {
		prefix := exitPrefix(t)
		cli := env.client(t)
		var emitted atomic.Int64
		w := mustNewEtcdWorker(t, cli, prefix, counterReactor(&emitted), newMapState(prefix))
		runCtx, cancel, done := run(t, w, nil)
		ticksAtLeast(t, &emitted, 3)
		start := time.Now()
		cancel()
		require.NoError(t, cli.Close())
		got := awaitExit(t, runCtx, done, start)
		if errors.Is(got.err, ErrCommitUnresolved) { // a commit in flight at the cancel, cut by Close
			checkExit(t, got, exitWant{is: []error{context.Canceled, ErrCommitUnresolved}, within: time.Second})
			return
		}
		checkExit(t, got, exitWant{is: []error{context.Canceled}, clean: true, within: time.Second})
	})

	t.Run("invalid arguments", func(t *testing.T) {
		prefix := exitPrefix(t)
		w := mustNewEtcdWorker(t, env.cli, prefix, idleReactor(), newMapState(prefix))
		var nilCtx context.Context
		err := w.Run(nilCtx, nil, behaviourTick, "exit")
		require.ErrorIs(t, err, ErrInvalidArgument)
		require.False(t, IsCleanStop(err))
		for _, d := range []time.Duration{0, -time.Second} {
			err = w.Run(ctx, nil, d, "exit")
			require.ErrorIs(t, err, ErrInvalidArgument)
			require.False(t, IsCleanStop(err))
		}
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		err = w.Run(cctx, nil, 0, "exit")
		require.ErrorIs(t, err, ErrInvalidArgument)
		require.False(t, IsCleanStop(err))

		runCtx, cancelRun, done := run(t, w, nil)
		require.NoError(t, w.WaitSynced(ctx))
		err = w.Run(ctx, nil, behaviourTick, "exit")
		require.ErrorIs(t, err, ErrWorkerRunning)
		require.False(t, IsCleanStop(err))
		start := time.Now()
		cancelRun()
		checkExit(t, awaitExit(t, runCtx, done, start), exitWant{is: []error{context.Canceled}, clean: true})
	})
}

// ---------------------------------------------------------------------------
// Exit causes that need a fault proxy: outages, commits in flight.

func TestExitFaults(t *testing.T) {
	t.Parallel()
	const delay = 300 * time.Millisecond
	t.Run("cancel during an outage", func(t *testing.T) {
		env := newTestEnv(t, withProxy())
		ctx := contextWithin(t, 25*time.Second)
		prefix := exitPrefix(t)
		w := mustNewEtcdWorker(t, env.client(t), prefix, idleReactor(), newMapState(prefix),
			WithRequestTimeout(300*time.Millisecond), WithMaxStaleness(time.Second))
		runCtx, cancel := context.WithCancel(ctx)
		defer cancel()
		done := runAsync(runCtx, w, nil, behaviourTick, "exit")
		require.NoError(t, w.WaitSynced(ctx))
		env.proxy.Blackhole()
		defer env.proxy.Resume()
		waitUntil(ctx, t, "the outage noticed", func() bool { return w.Status().Unreachable })
		start := time.Now()
		cancel()
		checkExit(t, awaitExit(t, runCtx, done, start), exitWant{is: []error{context.Canceled}, clean: true, within: 1500 * time.Millisecond})
	})
	t.Run("etcd unavailable past WithMaxOutage", func(t *testing.T) {
		env := newTestEnv(t, withProxy())
		ctx := contextWithin(t, 25*time.Second)
		prefix := exitPrefix(t)
		var emitted atomic.Int64
		w := mustNewEtcdWorker(t, env.client(t), prefix, counterReactor(&emitted), newMapState(prefix),
			WithRequestTimeout(500*time.Millisecond), WithMaxOutage(time.Second))
		runCtx, cancel := context.WithCancel(ctx)
		defer cancel()
		done := runAsync(runCtx, w, nil, behaviourTick, "exit")
		waitUntil(ctx, t, "commits", func() bool { return emitted.Load() >= 3 })
		env.proxy.Blackhole()
		defer env.proxy.Resume()
		start := time.Now()
		checkExit(t, awaitExit(t, runCtx, done, start), exitWant{is: []error{ErrEtcdUnavailable}, within: 3 * time.Second})
	})
	for _, tc := range []struct {
		name       string
		deadline   bool
		unresolved bool
	}{
		{name: "cancel during a commit in flight"},
		{name: "deadline during a commit in flight", deadline: true},
		{name: "cancel with the commit unresolved", unresolved: true},
		{name: "deadline with the commit unresolved", deadline: true, unresolved: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := newTestEnv(t, withProxy())
			ctx := contextWithin(t, 25*time.Second)
			prefix := exitPrefix(t)
			clearPrefix(ctx, t, env.cli, prefix)
			probe := newTxnProbe()
			var emitted atomic.Int64
			const shutdown = 700 * time.Millisecond
			w := mustNewEtcdWorker(t, env.client(t, probe.dialOption()), prefix, counterReactor(&emitted), newMapState(prefix),
				WithMetrics(env.reg), WithLogger(faultLogger(t)), WithRequestTimeout(2*time.Second), WithShutdownTimeout(shutdown))
			var runCtx context.Context
			var end func()
			if tc.deadline {
				d := newManualDeadline()
				runCtx, end = d, d.expire
			} else {
				c, cancel := context.WithCancel(ctx)
				defer cancel()
				runCtx, end = c, cancel
			}
			defer end()
			done := runAsync(runCtx, w, nil, faultInterval, "exit")
			waitUntil(ctx, t, "commits", func() bool { return emitted.Load() >= 3 })
			env.proxy.SetDelay(delay)
			t0 := probe.next(t, 10*time.Second)
			sleepUntil(t0.Add(delay / 2))
			if tc.unresolved {
				env.proxy.Blackhole()
			}
			start := time.Now()
			end()
			got := awaitExit(t, runCtx, done, start)
			env.proxy.SetDelay(0)
			env.proxy.Resume()
			want := exitWant{is: []error{runCtx.Err()}, not: []error{ErrCommitUnresolved}, clean: true, within: 2 * time.Second}
			if tc.unresolved {
				want = exitWant{is: []error{runCtx.Err(), ErrCommitUnresolved}, within: shutdown + 600*time.Millisecond}
			}
			checkExit(t, got, want)
			if !tc.unresolved {
				landed := int64(metricSum(t, env.reg, "orchestrator_patch_groups_applied_total"))
				require.Equal(t, fmt.Sprint(landed), etcdSnapshot(ctx, t, env.cli, prefix)["/n"], "what Run counted is what etcd has")
			}
		})
	}
}

// ---------------------------------------------------------------------------
// Permission denied (auth).

func TestExitPermissionDenied(t *testing.T) {
	t.Parallel()
	const prefix = "/test/exit-auth"
	env := newTestEnv(t, ownServer(), withAuth(prefix))
	ctx := contextWithin(t, 25*time.Second)
	t.Run("no rights", func(t *testing.T) {
		w := mustNewEtcdWorker(t, env.userClient(t, "nobody", "pw"), prefix, idleReactor(), newMapState(prefix))
		runCtx, cancel := context.WithCancel(ctx)
		defer cancel()
		done := runAsync(runCtx, w, nil, behaviourTick, "exit")
		checkExit(t, awaitExit(t, runCtx, done, time.Now()),
			exitWant{is: []error{ErrEtcdRejected, rpctypes.ErrPermissionDenied}})
	})
	t.Run("write revoked, the commit", func(t *testing.T) {
		var emitted atomic.Int64
		w := mustNewEtcdWorker(t, env.userClient(t, "reader-writer", "pw"), prefix, counterReactor(&emitted), newMapState(prefix))
		runCtx, cancel := context.WithCancel(ctx)
		defer cancel()
		done := runAsync(runCtx, w, nil, behaviourTick, "exit")
		waitUntil(ctx, t, "commits", func() bool { return emitted.Load() >= 3 })
		start := time.Now()
		_, err := env.cli.UserRevokeRole(ctx, "reader-writer", "w")
		require.NoError(t, err)
		checkExit(t, awaitExit(t, runCtx, done, start),
			exitWant{is: []error{ErrEtcdRejected, rpctypes.ErrPermissionDenied}})
	})
}

// ---------------------------------------------------------------------------
// Failures racing a cancel: IsCleanStop must stay false for real failures,
// true only for requested stops.

func TestExitRaces(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t)
	ctx := contextWithin(t, 90*time.Second)

	// A Tick of the reactor returns an error of its own while Run's ctx is
	// alive (it checks); the ctx ends right after, before Run returns (the
	// slow-Tick warning, logged between the two, ends it). IsCleanStop's doc:
	// "Any other error is a failure ..., also when it matches ctx's error
	// because ctx ended meanwhile: ... a context error of the reactor's own
	// returned while Run's ctx was alive".
	for _, tc := range []struct {
		name     string
		deadline bool
		err      error
	}{
		{"Tick's own deadline, then Run's deadline passes", true, fmt.Errorf("backend: %w", context.DeadlineExceeded)},
		{"Tick's own error, then a cancel", false, errExitUser},
	} {
		t.Run(tc.name, func(t *testing.T) {
			prefix := exitPrefix(t)
			var runCtx context.Context
			var end func()
			if tc.deadline {
				d := newManualDeadline()
				runCtx, end = d, d.expire
			} else {
				c, cancel := context.WithCancel(ctx)
				runCtx, end = c, cancel
			}
			defer end()
			var ticks atomic.Int64
			var aliveAtReturn atomic.Bool
			r := ReactorFunc(func(c context.Context, s ReactorState) (ReactorState, error) {
				if ticks.Add(1) < 3 {
					return s, nil
				}
				time.Sleep(slowTickThreshold + 50*time.Millisecond) // the slow Tick's warning is the hook
				aliveAtReturn.Store(c.Err() == nil)
				return s, tc.err
			})
			lg := hookLogger(t, func(e zapcore.Entry) {
				if strings.Contains(e.Message, "Tick is slow") {
					end()
				}
			})
			w := mustNewEtcdWorker(t, env.cli, prefix, r, newMapState(prefix), WithLogger(lg))
			done := runAsync(runCtx, w, nil, behaviourTick, "exit")
			got := awaitExit(t, runCtx, done, time.Now())
			require.True(t, aliveAtReturn.Load(), "Tick returned while Run's ctx was alive")
			checkExit(t, got, exitWant{is: []error{tc.err}, within: 5 * time.Second})
		})
	}

	// Update returns an error of its own while Run's ctx is alive; a cancel
	// comes right after (the worker's log of the failure ends the ctx).
	t.Run("Update's own error, then a cancel", func(t *testing.T) {
		prefix := exitPrefix(t)
		clearPrefix(ctx, t, env.cli, prefix)
		runCtx, cancel := context.WithCancel(ctx)
		defer cancel()
		st := newExitState(prefix)
		st.onUpdate = func() error {
			if runCtx.Err() != nil {
				return errors.New("test broken: ctx ended before Update failed")
			}
			return errExitUser
		}
		lg := hookLogger(t, func(e zapcore.Entry) {
			if strings.Contains(e.Message, "ReactorState.Update failed") {
				cancel()
			}
		})
		w := mustNewEtcdWorker(t, env.cli, prefix, idleReactor(), st, WithLogger(lg))
		done := runAsync(runCtx, w, nil, behaviourTick, "exit")
		require.NoError(t, w.WaitSynced(ctx))
		mustPutKV(ctx, t, env.cli, prefix+"/trigger", "x")
		got := awaitExit(t, runCtx, done, time.Now())
		checkExit(t, got, exitWant{is: []error{errExitUser}})
	})

	// Patch returns an error of its own while Run's ctx is alive; a cancel
	// from another goroutine races Run's return. k of n.
	t.Run("Patch's own error racing a cancel", func(t *testing.T) {
		const n = 50
		clean := 0
		for i := range n {
			prefix := fmt.Sprintf("%s/%d", exitPrefix(t), i)
			runCtx, cancel := context.WithCancel(ctx)
			var alive, fired atomic.Bool
			spun := make(chan struct{})
			go func() { // spins on another core, cancels as soon as the patch returned
				defer close(spun)
				for !fired.Load() && ctx.Err() == nil {
				}
				cancel()
			}()
			r := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
				st := s.(*mapState)
				st.patches = append(st.patches, []DataPatch{patchFunc(func(map[util.EtcdKey][]byte, map[util.EtcdKey]struct{}) error {
					alive.Store(runCtx.Err() == nil)
					fired.Store(true)
					return errExitUser
				})})
				return st, nil
			})
			w := mustNewEtcdWorker(t, env.cli, prefix, r, newMapState(prefix))
			err := w.Run(runCtx, nil, behaviourTick, "exit")
			fired.Store(true)
			<-spun
			require.True(t, alive.Load())
			require.ErrorIs(t, err, errExitUser)
			if IsCleanStop(err) {
				clean++
				t.Logf("run %d: a Patch failure taken for a clean stop: %v", i, err)
			}
		}
		// The worker samples ctx right after the patches return, so a cancel
		// in the few instructions between can still pass for their cause.
		require.LessOrEqual(t, clean, n/10, "%d of %d Patch failures (returned while Run's ctx was alive) were called clean stops", clean, n)
	})

	// The worker learnt of a failure while ctx was alive (its fencing check
	// found the key gone; the session's lease is gone) during a slow Tick;
	// the cancel comes after, before the Tick returns.
	for _, tc := range []struct {
		cause     string
		cancelToo bool
	}{{"fencing key lost", true}, {"fencing key lost", false}, {"session lost", false}} {
		// No "session lost, then a cancel" case: the worker learns of the
		// loss from the session's channel in a goroutine of its own, which a
		// cancel right after the channel closed can beat; the loss counts
		// as a failure only when seen while ctx was alive.
		cause := tc.cause
		name := cause + " before a cancel, during a slow Tick"
		if !tc.cancelToo {
			name = "control: " + cause + " during a slow Tick, no cancel"
		}
		t.Run(name, func(t *testing.T) {
			prefix := exitPrefix(t)
			cli := env.client(t)
			fenceKey := prefix + "-fence"
			put, err := env.cli.Put(ctx, fenceKey, "owner")
			require.NoError(t, err)
			var session *concurrency.Session
			opts := []Option{WithMaxStaleness(time.Second)} // fencing check every 250ms
			if cause == "session lost" {
				session, err = concurrency.NewSession(cli, concurrency.WithTTL(2))
				require.NoError(t, err)
				defer session.Close()
			} else {
				opts = append(opts, WithFencingKey(fenceKey, put.Header.Revision))
			}
			entered, release := make(chan struct{}), make(chan struct{})
			var ticks atomic.Int64
			r := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
				if ticks.Add(1) == 3 {
					close(entered)
					<-release // busy user code, not looking at ctx
				}
				return s, nil
			})
			w := mustNewEtcdWorker(t, cli, prefix, r, newMapState(prefix), opts...)
			runCtx, cancel := context.WithCancel(ctx)
			defer cancel()
			done := runAsync(runCtx, w, session, behaviourTick, "exit")
			awaitSignal(ctx, t, entered, "the slow Tick")
			if session != nil {
				_, err = env.cli.Revoke(ctx, session.Lease())
				require.NoError(t, err)
				awaitSignal(contextWithin(t, 5*time.Second), t, session.Done(), "the session noticed its loss")
			} else {
				_, err = env.cli.Delete(ctx, fenceKey)
				require.NoError(t, err)
				time.Sleep(time.Second) // fault timing: four fencing checks
			}
			start := time.Now()
			if tc.cancelToo {
				cancel()
			}
			close(release)
			got := awaitExit(t, runCtx, done, start)
			want := exitWant{is: []error{ErrNotOwner}}
			if session != nil {
				want = exitWant{is: []error{ErrEtcdSessionDone}}
			}
			checkExit(t, got, want)
		})
	}

	// A failure the worker reports itself, found right after the cancel
	// (the patch that ends ctx writes outside the prefix / a group too
	// large): no clean stop, and errors.Is(err, ctx.Err()).
	for _, tc := range []struct {
		name  string
		group func(st *mapState, cancel func()) []DataPatch
		want  error
	}{
		{"key outside the prefix just after a cancel", func(st *mapState, cancel func()) []DataPatch {
			return []DataPatch{SingleDataPatch{Key: util.NewEtcdKey("/test/exit-elsewhere/y"), Func: func([]byte) ([]byte, bool, error) {
				cancel()
				return []byte("1"), true, nil
			}}}
		}, ErrKeyOutsidePrefix},
		{"group too large just after a cancel", func(st *mapState, cancel func()) []DataPatch {
			g := []DataPatch{SingleDataPatch{Key: st.key("/c"), Func: func([]byte) ([]byte, bool, error) {
				cancel()
				return []byte("1"), true, nil
			}}}
			for i := range 127 {
				g = append(g, setPatch(st.key(fmt.Sprintf("/big%03d", i)), []byte("v")))
			}
			return g
		}, ErrEtcdTxnOpsExceed},
		{"panic just after a cancel", func(st *mapState, cancel func()) []DataPatch {
			return []DataPatch{SingleDataPatch{Key: st.key("/c"), Func: func([]byte) ([]byte, bool, error) {
				cancel()
				panic("exit: on the way out")
			}}}
		}, ErrPanic},
	} {
		t.Run(tc.name, func(t *testing.T) {
			prefix := exitPrefix(t)
			clearPrefix(ctx, t, env.cli, prefix)
			before := headRevision(ctx, t, env.cli)
			runCtx, cancel := context.WithCancel(ctx)
			defer cancel()
			var queued atomic.Bool
			r := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
				st := s.(*mapState)
				if !queued.Swap(true) {
					st.patches = append(st.patches, tc.group(st, cancel))
				}
				return st, nil
			})
			w := mustNewEtcdWorker(t, env.cli, prefix, r, newMapState(prefix))
			done := runAsync(runCtx, w, nil, behaviourTick, "exit")
			checkExit(t, awaitExit(t, runCtx, done, time.Now()), exitWant{is: []error{tc.want, context.Canceled}})
			require.Empty(t, visibleWritesSince(ctx, t, env.cli, before, prefix))
		})
	}
}

// TestExitNoGoroutineAtReturn: Run's doc: "every goroutine it starts
// has ended when it returns". Over many short Runs (a Tick error ends each
// at once), none is left once Run returned (the Outlive goroutine was).
func TestExitNoGoroutineAtReturn(t *testing.T) {
	env := newTestEnv(t)
	ctx := contextWithin(t, 25*time.Second)
	const n = 100
	var seen []string
	for i := range n {
		prefix := fmt.Sprintf("/test/exit/at-return/%d", i)
		r := ReactorFunc(func(context.Context, ReactorState) (ReactorState, error) { return nil, errExitUser })
		w := mustNewEtcdWorker(t, env.cli, prefix, r, newMapState(prefix))
		before := workerGoroutines()
		err := w.Run(ctx, nil, behaviourTick, "exit")
		// Joined goroutines may still be on their way out at the instant
		// Run returns (after their last signal); none may stay.
		left := goroutinesLeftBy(before)
		require.ErrorIs(t, err, errExitUser)
		if len(left) > 0 {
			seen = append(seen, left[0])
		}
	}
	if len(seen) > 0 {
		t.Logf("first: %s", seen[0])
	}
	require.Empty(t, seen, "%d of %d Runs returned with a goroutine of theirs still there", len(seen), n)
}
