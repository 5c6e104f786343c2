package orchestrator

import (
	"bytes"
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/etcdworker/orchestrator/util"
	pingcaperrors "github.com/pingcap/errors"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// TestEtcdWorkerFinished ports the original TestFinished: the patches
// returned together with ErrReactorFinished are committed, then Run returns
// nil. A final Tick's append and delete must both be in etcd afterwards.
func TestEtcdWorkerFinished(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
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

// TestPatchesOfAGroupComposeAndRerunOnAConcurrentWrite ports the original
// TestCover (several patches of one group on the same key compose in order,
// a delete followed by a put in one group is a put) and checks that a patch
// whose key another writer changed concurrently is re-run on the new value:
// the final value reflects both.
func TestPatchesOfAGroupComposeAndRerunOnAConcurrentWrite(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)

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
	t.Parallel()
	cli := sharedClient(t)
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
	before := headRevision(ctx, t, cli)
	require.NoError(t, runWorker(ctx, t, cli, prefix, reactor, newRecordingState(prefix)))
	require.Empty(t, writesSince(ctx, t, cli, before, prefix), "a flush of no-op patches wrote")
	require.Equal(t, int64(3*9), runs.Load(), "every no-op patch must have run once per Tick")
	require.Equal(t, map[string]string{"/key1": "v", "/key2": ""}, etcdSnapshot(ctx, t, cli, prefix))
}

// TestEtcdWorkerRetryableError: a patch returning ErrEtcdTryAgain (wrapped)
// aborts the whole commit — nothing of it is written, no Tick runs in
// between — and is re-run until the state moves on; then it commits.
func TestEtcdWorkerRetryableError(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
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
	t.Parallel()
	cli := sharedClient(t)
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
	require.Equal(t, map[string]string{"/a": "1+", "/c": "3"}, stringValues(st.values))
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
	t.Parallel()

	cases := deleteCounterCases()
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testContext(t)
			prefix := fmt.Sprintf("/test/deletecounter/%d", i)
			cliA, cliB := sharedClient(t), sharedClient(t)
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
			wB := mustNewEtcdWorker(t, cliB, prefix, reactorB, newRecordingState(prefix))
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
	t.Parallel()
	cli := sharedClient(t)
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
			before := headRevision(ctx, t, cli)
			err := runWorker(ctx, t, cli, prefix, reactor, newRecordingState(prefix))
			require.ErrorIs(t, err, ErrKeyOutsidePrefix)
			require.ErrorContains(t, err, bad)
			require.Empty(t, writesSince(ctx, t, cli, before, prefix, bad), "something of the rejected commit was written")
		})
	}
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
	w := mustNewEtcdWorker(t, cli, prefix, newStepReactor(), newRecordingState(prefix))
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
	t.Parallel()
	cli := sharedClient(t)

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
			before := headRevision(ctx, t, cli)
			err := runWorker(ctx, t, cli, prefix, reactor, newRecordingState(prefix))
			if tc.wantErr == nil {
				require.NoError(t, err)
				require.NotEmpty(t, writesSince(ctx, t, cli, before, prefix))
				return
			}
			require.ErrorIs(t, err, tc.wantErr)
			require.Empty(t, writesSince(ctx, t, cli, before, prefix), "something of the oversized group was written")
			require.Equal(t, map[string]string{"/victim": "x"}, etcdSnapshot(ctx, t, cli, prefix))
		})
	}
}

// TestEtcdWorkerMultiTxnFlush: one Tick's groups that do not fit one Txn are
// committed in several, in order, never split, each applied once: later
// Txns compare against the revisions the earlier ones of the same flush
// produced (no self-conflict, so every patch runs exactly once), and a key
// rewritten by groups in several Txns ends up with all their changes.
func TestEtcdWorkerMultiTxnFlush(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
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
	require.Equal(t, want, stringValues(st.values), "the Tick after the flush must see all of it")
	require.Len(t, runs, bigGroups*(1+bigKeys+small))
	for name, n := range runs {
		require.Equal(t, 1, n, "patch %s ran %d times: the flush conflicted with itself", name, n)
	}
}

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

// CAS conflicts: the patches re-run once on a newer state, and the worker
// waits for that state instead of retrying at once on the state that
// conflicted.

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
	env := newTestEnv(t)
	ctx := testContext(t)
	cli := env.cli
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
	w := mustNewEtcdWorker(t, cli, prefix, reactor, newRecordingState(prefix), WithMetrics(reg))
	done := runAsync(ctx, w, nil, behaviourTick, role)

	awaitSignal(ctx, t, entered, "the worker never ran its patch")
	// The patch has read "0"; another client adds 10 before the worker's Txn.
	mustPutKV(ctx, t, env.client(t), prefix+"/n", "10")
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
	env := newTestEnv(t)
	ctx := testContext(t)
	cli := env.cli
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
	w := mustNewEtcdWorker(t, cli, prefix, reactor, newRecordingState(prefix), WithMetrics(reg))
	done := runAsync(ctx, w, nil, behaviourTick, role)

	awaitSignal(ctx, t, entered, "the worker never ran its patch")
	ext := env.client(t)
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
