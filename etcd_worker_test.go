package orchestrator

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
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

// TestEtcdWorkerFinished ports the original TestFinished: the patches
// returned together with ErrReactorFinished are committed, then Run returns
// nil. A final Tick's append and delete must both be in etcd afterwards.
func TestEtcdWorkerFinished(t *testing.T) {
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
	finish := map[string]func() error{
		"plain":            func() error { return ErrReactorFinished },
		"pingcap Trace":    func() error { return pingcaperrors.Trace(ErrReactorFinished) },
		"pingcap Annotate": func() error { return pingcaperrors.Annotate(ErrReactorFinished, "done") },
		"fmt wrapped":      func() error { return fmt.Errorf("reactor done: %w", ErrReactorFinished) },
	}
	for name, finErr := range finish {
		t.Run(name, func(t *testing.T) {
			ctx := testContext(t)
			prefix := "/test/finished/" + strings.ReplaceAll(name, " ", "-")
			ticks := 0
			reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
				st := s.(*recordingState)
				if ticks < 2 {
					// Tick 2 must see tick 1's commit.
					if want := strings.Repeat("abc", ticks); string(st.values["/key1"]) != want {
						return st, fmt.Errorf("tick %d: key1 = %q, want %q", ticks, st.values["/key1"], want)
					}
					ticks++
					st.group(st.appendTo("/key1", "abc"), st.appendTo("/key2", "123"))
					return st, nil
				}
				st.group(st.appendTo("/key1", "fin"), deletePatch(st.key("/key2")))
				return st, finErr()
			})
			st := newRecordingState(prefix)
			require.NoError(t, runWorker(ctx, t, cli, prefix, reactor, st))
			require.Equal(t, map[string]string{"/key1": "abcabcfin"}, etcdSnapshot(ctx, t, cli, prefix))
		})
	}
}

// TestEtcdWorkerCover ports the original TestCover (several patches of one
// group on the same key compose in order, a delete followed by a put in one
// group is a put) and checks that a patch whose key another writer changed
// concurrently is re-run on the new value: the final value reflects both.
func TestEtcdWorkerCover(t *testing.T) {
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)

	t.Run("same group", func(t *testing.T) {
		ctx := testContext(t)
		const prefix = "/test/cover/group"
		ticks := 0
		reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
			st := s.(*recordingState)
			if ticks < 2 {
				ticks++
				st.group(st.appendTo("/key1", "abc"), st.appendTo("/key2", "123"),
					st.appendTo("/key1", "cba"), st.appendTo("/key2", "321"))
				return st, nil
			}
			st.group(st.appendTo("/key1", "fin"), st.appendTo("/key1", "fin"),
				deletePatch(st.key("/key2")), st.appendTo("/key2", "fin"))
			return st, ErrReactorFinished
		})
		require.NoError(t, runWorker(ctx, t, cli, prefix, reactor, newRecordingState(prefix)))
		require.Equal(t, map[string]string{"/key1": "abccbaabccbafinfin", "/key2": "fin"},
			etcdSnapshot(ctx, t, cli, prefix))
	})

	t.Run("concurrent writer", func(t *testing.T) {
		ctx := testContext(t)
		const prefix = "/test/cover/concurrent"
		mustPutKV(ctx, t, cli, prefix+"/key", "base")
		var calls atomic.Int64
		var seen []string // values the Func ran on, in order (worker goroutine only)
		reactor := newStepReactor(
			when(func(st *recordingState) bool { return st.has("/key", "base") }, func(ctx context.Context, st *recordingState) error {
				st.group(SingleDataPatch{Key: st.key("/key"), Func: func(old []byte) ([]byte, bool, error) {
					seen = append(seen, string(old))
					if calls.Add(1) == 1 {
						// Another writer changes the key after the worker
						// read it and before it commits.
						if _, err := cli.Put(ctx, prefix+"/key", string(old)+"+ext"); err != nil {
							return nil, false, err
						}
					}
					return []byte(string(old) + "+w"), true, nil
				}})
				return nil
			}),
			when(func(st *recordingState) bool { return st.has("/key", "base+ext+w") }, nil),
		)
		require.NoError(t, runWorker(ctx, t, cli, prefix, reactor, newRecordingState(prefix)))
		require.Equal(t, map[string]string{"/key": "base+ext+w"}, etcdSnapshot(ctx, t, cli, prefix))
		require.Equal(t, []string{"base", "base+ext"}, seen, "the patch must re-run exactly on the new value")
	})
}

// TestEtcdWorkerEmptyTxn: Ticks whose patches are all no-ops (changed =
// false, the current value again, deleting an absent key, a change undone
// within the group) send no Txn, so etcd's revision does not move.
func TestEtcdWorkerEmptyTxn(t *testing.T) {
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
	ctx := testContext(t)
	const prefix = "/test/emptytxn"
	mustPutKV(ctx, t, cli, prefix+"/key1", "v")
	mustPutKV(ctx, t, cli, prefix+"/key2", "")

	var runs atomic.Int64
	noops := func(st *recordingState) {
		count := func(p DataPatch) DataPatch {
			return patchFunc(func(vm map[util.EtcdKey][]byte, cs map[util.EtcdKey]struct{}) error {
				runs.Add(1)
				return p.Patch(vm, cs)
			})
		}
		st.group(
			count(SingleDataPatch{Key: st.key("/key1"), Func: func([]byte) ([]byte, bool, error) { return []byte("x"), false, nil }}),
			count(setPatch(st.key("/key1"), []byte("v"))),
			count(setPatch(st.key("/key2"), []byte{})),
			count(deletePatch(st.key("/absent"))),
		)
		st.group(count(setPatch(st.key("/key1"), []byte("changed"))), count(setPatch(st.key("/key1"), []byte("v"))))
		st.group(count(setPatch(st.key("/new"), []byte("x"))), count(deletePatch(st.key("/new"))))
		st.group(count(patchFunc(func(vm map[util.EtcdKey][]byte, cs map[util.EtcdKey]struct{}) error {
			cs[st.key("/key1")] = struct{}{} // touched, value unchanged
			return nil
		})))
	}
	ticks := 0
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*recordingState)
		ticks++
		noops(st)
		if ticks == 3 {
			return st, ErrReactorFinished
		}
		return st, nil
	})
	before := srv.Revision()
	require.NoError(t, runWorker(ctx, t, cli, prefix, reactor, newRecordingState(prefix)))
	require.Equal(t, before, srv.Revision(), "a flush of no-op patches moved etcd's revision")
	require.Equal(t, int64(3*9), runs.Load(), "every no-op patch must have run once per Tick")
	require.Equal(t, map[string]string{"/key1": "v", "/key2": ""}, etcdSnapshot(ctx, t, cli, prefix))
}

// TestEtcdWorkerEmptyOrNil: an empty value and a deleted key are different
// things, both ways. A put of []byte{} (by etcd clients and by patches)
// reaches Update as a non-nil zero-length slice, at the initial load and on
// the watch; a delete reaches it as nil. A patch returning []byte{} writes an
// empty value; nil with changed = true deletes.
func TestEtcdWorkerEmptyOrNil(t *testing.T) {
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
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
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
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

// TestEtcdWorkerRetryableError: a patch returning ErrEtcdTryAgain (wrapped)
// aborts the whole commit — nothing of it is written, no Tick runs in
// between — and is re-run until the state moves on; then it commits.
func TestEtcdWorkerRetryableError(t *testing.T) {
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
	ctx := testContext(t)
	const prefix = "/test/retry"

	var attempts atomic.Int64
	var landedOn atomic.Value
	reactor := newStepReactor(
		when(always, func(_ context.Context, st *recordingState) error {
			st.group(setPatch(st.key("/other"), []byte("1")))
			st.group(patchFunc(func(vm map[util.EtcdKey][]byte, cs map[util.EtcdKey]struct{}) error {
				attempts.Add(1)
				trigger, ok := vm[st.key("/trigger")]
				if !ok {
					return fmt.Errorf("trigger not there yet: %w", ErrEtcdTryAgain)
				}
				landedOn.Store(string(trigger))
				vm[st.key("/target")] = []byte("done:" + string(trigger))
				cs[st.key("/target")] = struct{}{}
				return nil
			}))
			return nil
		}),
		when(func(st *recordingState) bool { return st.has("/target", "done:go") }, nil),
	)
	w, err := NewEtcdWorker(cli, prefix, reactor, newRecordingState(prefix))
	require.NoError(t, err)
	done := runAsync(ctx, w, nil, behaviourTick, "retry")

	waitUntil(ctx, t, "three attempts", func() bool {
		select {
		case err := <-done:
			t.Fatalf("Run returned while the patch asked to try again: %v", err)
		default:
		}
		return attempts.Load() >= 3
	})
	require.Equal(t, int64(1), reactor.ticks.Load(), "Tick ran while patches were pending")
	require.Empty(t, etcdSnapshot(ctx, t, cli, prefix), "a commit aborted by ErrEtcdTryAgain wrote something")

	mustPutKV(ctx, t, cli, prefix+"/trigger", "go")
	require.NoError(t, recvErr(ctx, t, done))
	require.Equal(t, "go", landedOn.Load())
	require.Equal(t, map[string]string{"/other": "1", "/trigger": "go", "/target": "done:go"},
		etcdSnapshot(ctx, t, cli, prefix))
}

// TestEtcdWorkerIgnoreError: ErrEtcdIgnore (plain or wrapped) skips only
// the patch returning it — including what it changed before failing — and
// the other patches of its group still commit.
func TestEtcdWorkerIgnoreError(t *testing.T) {
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
	ctx := testContext(t)
	const prefix = "/test/ignore"

	reactor := newStepReactor(
		when(always, func(_ context.Context, st *recordingState) error {
			st.group(
				setPatch(st.key("/a"), []byte("1")),
				patchFunc(func(vm map[util.EtcdKey][]byte, cs map[util.EtcdKey]struct{}) error {
					vm[st.key("/b")] = []byte("2")
					cs[st.key("/b")] = struct{}{}
					vm[st.key("/a")] = []byte("bad")
					cs[st.key("/a")] = struct{}{}
					return fmt.Errorf("skip me: %w", ErrEtcdIgnore)
				}),
				setPatch(st.key("/c"), []byte("3")),
				SingleDataPatch{Key: st.key("/a"), Func: func([]byte) ([]byte, bool, error) {
					return []byte("bad2"), true, pingcaperrors.Trace(ErrEtcdIgnore)
				}},
				st.appendTo("/a", "+"),
			)
			st.group(SingleDataPatch{Key: st.key("/d"), Func: func([]byte) ([]byte, bool, error) {
				return nil, false, ErrEtcdIgnore
			}})
			return nil
		}),
		when(func(st *recordingState) bool { return !st.absent("/c") }, nil),
	)
	st := newRecordingState(prefix)
	require.NoError(t, runWorker(ctx, t, cli, prefix, reactor, st))
	require.Equal(t, map[string]string{"/a": "1+", "/c": "3"}, etcdSnapshot(ctx, t, cli, prefix))
	require.Equal(t, map[string]string{"/a": "1+", "/c": "3"}, stateSnapshot(st))
}

// deleteCounterCase is one case of TestEtcdWorkerDeleteCounter.
type deleteCounterCase struct {
	name string
	// patch builds B's patch; it reports each run to calls.
	patch func(st *recordingState, firstRun func() error) DataPatch
	want  map[string]string
}

// deleteCounterCases returns the cases of TestEtcdWorkerDeleteCounter.
func deleteCounterCases() []deleteCounterCase {
	return []deleteCounterCase{
		{
			name: "reader of the deleted key",
			patch: func(st *recordingState, firstRun func() error) DataPatch {
				return patchFunc(func(vm map[util.EtcdKey][]byte, cs map[util.EtcdKey]struct{}) error {
					if err := firstRun(); err != nil {
						return err
					}
					y := "absent"
					if x, ok := vm[st.key("/x")]; ok {
						y = "x=" + string(x)
					}
					vm[st.key("/y")] = []byte(y)
					cs[st.key("/y")] = struct{}{}
					return nil
				})
			},
			want: map[string]string{"/y": "absent"},
		},
		{
			// The original TestModifyAfterDelete: modify the key if it
			// exists. After the delete it must not be resurrected.
			name: "modifier of the deleted key",
			patch: func(st *recordingState, firstRun func() error) DataPatch {
				return SingleDataPatch{Key: st.key("/x"), Func: func(old []byte) ([]byte, bool, error) {
					if err := firstRun(); err != nil {
						return nil, false, err
					}
					if old == nil {
						return nil, false, nil
					}
					return []byte("modified"), true, nil
				}}
			},
			want: map[string]string{},
		},
	}
}

// TestEtcdWorkerDeleteCounter: a delete committed by worker A makes a
// concurrent commit of worker B, prepared on a snapshot that still had the
// key, fail and re-run, even when B does not write the deleted key (it only
// read it). B's patch blocks on its first run until A's delete landed.
func TestEtcdWorkerDeleteCounter(t *testing.T) {
	srv := etcdtest.NewServer(t)

	cases := deleteCounterCases()
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testContext(t)
			prefix := fmt.Sprintf("/test/deletecounter/%d", i)
			cliA, cliB := srv.Client(t), srv.Client(t)
			mustPutKV(ctx, t, cliA, prefix+"/x", "1")

			entered, release := make(chan struct{}), make(chan struct{})
			var runs atomic.Int64
			firstRun := func() error {
				if runs.Add(1) > 1 {
					return nil
				}
				close(entered)
				return blockUntil(ctx, release)
			}
			reactorB := newStepReactor(
				when(func(st *recordingState) bool { return st.has("/x", "1") }, func(_ context.Context, st *recordingState) error {
					st.group(tc.patch(st, firstRun))
					return nil
				}),
				when(always, nil),
			)
			wB, err := NewEtcdWorker(cliB, prefix, reactorB, newRecordingState(prefix))
			require.NoError(t, err)
			doneB := runAsync(ctx, wB, nil, behaviourTick, "B")

			awaitSignal(ctx, t, entered, "B's patch never ran")
			reactorA := newStepReactor(
				when(func(st *recordingState) bool { return st.has("/x", "1") }, func(_ context.Context, st *recordingState) error {
					st.group(deletePatch(st.key("/x")))
					return nil
				}),
				when(func(st *recordingState) bool { return st.absent("/x") }, nil),
			)
			require.NoError(t, runWorker(ctx, t, cliA, prefix, reactorA, newRecordingState(prefix)))
			close(release)

			require.NoError(t, recvErr(ctx, t, doneB))
			require.GreaterOrEqual(t, runs.Load(), int64(2), "B's commit was not re-run after A's delete")
			require.Equal(t, tc.want, etcdSnapshot(ctx, t, cliA, prefix))
		})
	}
}

// TestEtcdWorkerKeyOutsidePrefix: a patch writing a key outside prefix + "/"
// or into the reserved area makes Run return an error matching
// ErrKeyOutsidePrefix that names the key; nothing of that commit (not even
// the valid group before it) is written.
func TestEtcdWorkerKeyOutsidePrefix(t *testing.T) {
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
	// The prefix is given un-normalized: the worker's area is "/test/out/".
	const prefix = "test/out/"
	t.Run("keys under the normalized prefix", func(t *testing.T) {
		ctx := testContext(t)
		reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
			st := s.(*recordingState)
			st.group(SingleDataPatch{Key: util.NewEtcdKey("/test/out/ok"), Func: func([]byte) ([]byte, bool, error) {
				return []byte("1"), true, nil
			}})
			return st, ErrReactorFinished
		})
		require.NoError(t, runWorker(ctx, t, cli, prefix, reactor, newRecordingState(prefix)))
		require.Equal(t, map[string]string{"/ok": "1"}, etcdSnapshot(ctx, t, cli, "/test/out"))
	})
	for _, bad := range []string{
		"/other/key",
		"/test/out",
		"/test/outx/key",
		"/test",
		"/test/out/__orchestrator/delete-counter",
		"/test/out/__orchestrator/token/0123456789abcdef",
		"/test/out/__orchestrator/",
		"test/out/relative",
	} {
		t.Run(bad, func(t *testing.T) {
			ctx := testContext(t)
			reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
				st := s.(*recordingState)
				st.group(setPatch(st.key("/new"), []byte("1")))
				st.group(setPatch(st.key("/new2"), []byte("2")), SingleDataPatch{Key: util.NewEtcdKey(bad), Func: func([]byte) ([]byte, bool, error) {
					return []byte("x"), true, nil
				}})
				// The final commit fails: Run must report it, not return nil.
				return st, ErrReactorFinished
			})
			before := srv.Revision()
			err := runWorker(ctx, t, cli, prefix, reactor, newRecordingState(prefix))
			require.ErrorIs(t, err, ErrKeyOutsidePrefix)
			require.ErrorContains(t, err, bad)
			require.Equal(t, before, srv.Revision(), "something of the rejected commit was written")
		})
	}
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
			got := stateSnapshot(st)
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
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
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
	w, err := NewEtcdWorker(cli, prefix, reactor, st)
	require.NoError(t, err)

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
	_, err = cli.Delete(ctx, prefix+"/b")
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
	require.Equal(t, want, stateSnapshot(st))

	// A fresh worker sees the same.
	fresh := newRecordingState(prefix)
	require.NoError(t, runWorker(ctx, t, cli, prefix, newStepReactor(when(always, nil)), fresh))
	require.Equal(t, want, stateSnapshot(fresh))
}

// TestEtcdWorkerLongTimerInterval: with a timerInterval above one second
// the worker keeps ticking on the timer (the original computed the tick
// rate with integer Duration division and ticked once, never again).
func TestEtcdWorkerLongTimerInterval(t *testing.T) {
	t.Parallel()
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
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
	w, err := NewEtcdWorker(cli, "/test/longinterval", reactor, newRecordingState("/test/longinterval"))
	require.NoError(t, err)
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
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
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
	w1, err := NewEtcdWorker(cli, prefix, r1, st1)
	require.NoError(t, err)
	done1 := runAsync(ctx, w1, nil, behaviourTick, "w1")

	waitUntil(ctx, t, "worker 1's commit", func() bool {
		resp, err := cli.Get(ctx, prefix+reservedMarker, clientv3.WithPrefix(), clientv3.WithCountOnly())
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
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
	okReactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) { return s, nil })
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
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
	newWorker := func(t *testing.T, reactor Reactor) *EtcdWorker {
		w, err := NewEtcdWorker(cli, "/test/stops/"+t.Name(), reactor, newRecordingState("/test/stops/"+t.Name()))
		require.NoError(t, err)
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
	runStopsOnSession(t, srv, cli, newWorker)
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
func runStopsOnSession(t *testing.T, srv *etcdtest.Server, cli *clientv3.Client, newWorker stopsWorker) {
	t.Run("session lease revoked", func(t *testing.T) {
		ctx := testContext(t)
		sess, err := concurrency.NewSession(srv.Client(t), concurrency.WithTTL(5))
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
		sess, err := concurrency.NewSession(srv.Client(t), concurrency.WithTTL(2))
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

// txnOpsGroup writes n keys (the last one a delete of an existing key when
// withDelete) in one group.
func txnOpsGroup(n int, withDelete bool) func(st *recordingState) {
	return func(st *recordingState) {
		var g []DataPatch
		for i := 0; i < n; i++ {
			rel := fmt.Sprintf("/k%03d", i)
			if withDelete && i == n-1 {
				g = append(g, deletePatch(st.key("/victim")))
				continue
			}
			g = append(g, setPatch(st.key(rel), []byte("v")))
		}
		st.group(g...)
	}
}

// maxSingleValue is the largest value the key prefix+rel may have in a group
// of its own.
func maxSingleValue(t *testing.T, cli *clientv3.Client, prefix, rel string, deletes bool) int {
	w, err := NewEtcdWorker(cli, prefix, newStepReactor(), newRecordingState(prefix))
	require.NoError(t, err)
	n := w.limits.maxBytes - w.limits.overheadBytes - writeKeyCopies*len(util.NormalizePrefix(prefix).String()+rel)
	if deletes {
		n -= w.limits.deleteBytes
	}
	return n
}

// TestEtcdWorkerTxnLimits: a group exactly at the default op or byte limit
// is accepted by the worker and by an etcd server with default limits; one
// key or byte more makes Run return ErrEtcdTxnOpsExceed /
// ErrEtcdTxnSizeExceed with nothing written (etcd's revision does not move).
func TestEtcdWorkerTxnLimits(t *testing.T) {
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)

	cases := []struct {
		name    string
		group   func(t *testing.T, prefix string) func(st *recordingState)
		wantErr error
	}{
		{"ops at the limit", func(*testing.T, string) func(*recordingState) { return txnOpsGroup(DefaultTxnMaxOps-2, false) }, nil},
		{"ops at the limit with a delete", func(*testing.T, string) func(*recordingState) { return txnOpsGroup(DefaultTxnMaxOps-2, true) }, nil},
		{"ops over the limit", func(*testing.T, string) func(*recordingState) { return txnOpsGroup(DefaultTxnMaxOps-1, false) }, ErrEtcdTxnOpsExceed},
		{"ops over the limit with a delete", func(*testing.T, string) func(*recordingState) { return txnOpsGroup(DefaultTxnMaxOps-1, true) }, ErrEtcdTxnOpsExceed},
		{"bytes at the limit", func(t *testing.T, prefix string) func(*recordingState) {
			n := maxSingleValue(t, cli, prefix, "/big", false)
			return func(st *recordingState) { st.group(setPatch(st.key("/big"), bytes.Repeat([]byte("b"), n))) }
		}, nil},
		{"bytes over the limit", func(t *testing.T, prefix string) func(*recordingState) {
			n := maxSingleValue(t, cli, prefix, "/big", false) + 1
			return func(st *recordingState) { st.group(setPatch(st.key("/big"), bytes.Repeat([]byte("b"), n))) }
		}, ErrEtcdTxnSizeExceed},
		{"bytes over the limit in two keys", func(t *testing.T, prefix string) func(*recordingState) {
			n := maxSingleValue(t, cli, prefix, "/big", false)
			return func(st *recordingState) {
				st.group(setPatch(st.key("/big"), bytes.Repeat([]byte("b"), n/2)), setPatch(st.key("/big2"), bytes.Repeat([]byte("b"), n/2+1)))
			}
		}, ErrEtcdTxnSizeExceed},
		{"far over the byte limit", func(*testing.T, string) func(*recordingState) {
			return func(st *recordingState) {
				st.group(setPatch(st.key("/big"), bytes.Repeat([]byte("b"), 2*DefaultTxnMaxBytes)))
			}
		}, ErrEtcdTxnSizeExceed},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testContext(t)
			prefix := fmt.Sprintf("/test/limits/%d", i)
			mustPutKV(ctx, t, cli, prefix+"/victim", "x")
			emit := tc.group(t, prefix)
			reactor := newStepReactor(
				when(always, func(_ context.Context, st *recordingState) error { emit(st); return nil }),
				when(always, nil),
			)
			before := srv.Revision()
			err := runWorker(ctx, t, cli, prefix, reactor, newRecordingState(prefix))
			if tc.wantErr == nil {
				require.NoError(t, err)
				require.Greater(t, srv.Revision(), before)
				return
			}
			require.ErrorIs(t, err, tc.wantErr)
			require.Equal(t, before, srv.Revision(), "something of the oversized group was written")
			require.Equal(t, map[string]string{"/victim": "x"}, etcdSnapshot(ctx, t, cli, prefix))
		})
	}
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
				return ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) { return s, nil })
			},
			state: func(prefix string, fail func() error) ReactorState {
				return &panickyPatchesState{recordingState: newRecordingState(prefix), fail: fail}
			},
		},
	}
}

// panickyPatchesState calls fail from GetPatches (which has no error
// return: only a panic can come out of it).
type panickyPatchesState struct {
	*recordingState
	fail func() error
}

func (s *panickyPatchesState) GetPatches() [][]DataPatch {
	if err := s.fail(); err != nil {
		panic(err)
	}
	return nil
}

// TestEtcdWorkerUserError: an error from Tick, Update (at load and on the
// watch) or Patch ends Run with that error, wrapped: errors.Is finds it,
// also when the user wrapped it with github.com/pingcap/errors. Nothing of a
// commit whose patch failed is written.
func TestEtcdWorkerUserError(t *testing.T) {
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
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
				before := srv.Revision()
				err := runWorker(ctx, t, cli, prefix, site.reactor(fail), site.state(prefix, fail))
				require.ErrorIs(t, err, errUserBoom)
				require.NotErrorIs(t, err, ErrPanic)
				if site.name != "Update on watch" {
					require.Equal(t, before, srv.Revision(), "the failed commit wrote something")
				}
			})
		}
	}
}

// TestEtcdWorkerPanic: a panic in Tick, Update, Patch or GetPatches ends Run
// with an error matching ErrPanic; the process survives (the test goes on).
func TestEtcdWorkerPanic(t *testing.T) {
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
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

// TestEtcdWorkerMultiTxnFlush: one Tick's groups that do not fit one Txn are
// committed in several, in order, never split, each applied once: later
// Txns compare against the revisions the earlier ones of the same flush
// produced (no self-conflict, so every patch runs exactly once), and a key
// rewritten by groups in several Txns ends up with all their changes.
func TestEtcdWorkerMultiTxnFlush(t *testing.T) {
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
	ctx := testContext(t)
	const (
		prefix    = "/test/multitxn"
		bigGroups = 5
		bigKeys   = 100 // with the worker's own ops, one big group per Txn
		small     = 10
	)
	runs := map[string]int{} // patch name -> runs (worker goroutine only)
	counted := func(name string, st *recordingState, rel, suffix string) DataPatch {
		p := st.appendTo(rel, suffix)
		return patchFunc(func(vm map[util.EtcdKey][]byte, cs map[util.EtcdKey]struct{}) error {
			runs[name]++
			return p.Patch(vm, cs)
		})
	}
	reactor := newStepReactor(
		when(always, func(_ context.Context, st *recordingState) error {
			for g := 0; g < bigGroups; g++ {
				// A big group: its own keys plus the shared one.
				group := []DataPatch{counted(fmt.Sprintf("big%d/shared", g), st, "/shared", strconv.Itoa(g))}
				for k := 0; k < bigKeys; k++ {
					group = append(group, counted(fmt.Sprintf("big%d/%d", g, k), st, fmt.Sprintf("/k%d-%03d", g, k), "v"))
				}
				st.group(group...)
				// Small groups after it rewrite the shared key again.
				for s := 0; s < small; s++ {
					st.group(counted(fmt.Sprintf("small%d/%d", g, s), st, "/shared", "."))
				}
			}
			return nil
		}),
		when(func(st *recordingState) bool { return !st.absent("/shared") }, nil),
	)
	st := newRecordingState(prefix)
	require.NoError(t, runWorker(ctx, t, cli, prefix, reactor, st))

	shared := ""
	want := map[string]string{}
	for g := 0; g < bigGroups; g++ {
		shared += strconv.Itoa(g) + strings.Repeat(".", small)
		for k := 0; k < bigKeys; k++ {
			want[fmt.Sprintf("/k%d-%03d", g, k)] = "v"
		}
	}
	want["/shared"] = shared
	require.Equal(t, want, etcdSnapshot(ctx, t, cli, prefix))
	require.Equal(t, want, stateSnapshot(st), "the Tick after the flush must see all of it")
	require.Len(t, runs, bigGroups*(1+bigKeys+small))
	for name, n := range runs {
		require.Equal(t, 1, n, "patch %s ran %d times: the flush conflicted with itself", name, n)
	}
}
