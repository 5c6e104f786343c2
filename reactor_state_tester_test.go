package orchestrator

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator/util"
)

// rstFunc is a SingleDataPatch on key running fn.
func rstFunc(key string, fn func(old []byte) ([]byte, bool, error)) DataPatch {
	return SingleDataPatch{Key: util.NewEtcdKey(key), Func: fn}
}

// rstFailTB is a testing.TB whose failures are recorded instead of failing
// the real test; FailNow ends the calling goroutine like the real one.
type rstFailTB struct {
	testing.TB
	mu     sync.Mutex
	failed bool
	msgs   []string
}

func (f *rstFailTB) Helper() {}

func (f *rstFailTB) Errorf(format string, args ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failed = true
	f.msgs = append(f.msgs, fmt.Sprintf(format, args...))
}

func (f *rstFailTB) Fatalf(format string, args ...any) {
	f.Errorf(format, args...)
	f.FailNow()
}

func (f *rstFailTB) FailNow() {
	f.mu.Lock()
	f.failed = true
	f.mu.Unlock()
	runtime.Goexit()
}

// rstRunFailing runs fn with a rstFailTB in its own goroutine (FailNow calls
// runtime.Goexit) and reports whether it failed and what it said.
func rstRunFailing(t *testing.T, fn func(tb testing.TB)) (failed bool, msgs string) {
	t.Helper()
	tb := &rstFailTB{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn(tb)
	}()
	<-done
	tb.mu.Lock()
	defer tb.mu.Unlock()
	return tb.failed, fmt.Sprint(tb.msgs)
}

func TestReactorStateTesterInit(t *testing.T) {
	t.Parallel()
	s := newRecordingState("")
	init := map[string]string{"/t/a": "1", "/t/b": "", "/t/c": "3"}
	tester := NewReactorStateTester(t, s, init)
	require.Len(t, s.log, 3)
	for _, c := range s.log {
		require.True(t, c.isInit, "init entries must be loaded with isInit = true: %q", c.rel)
		require.NotNil(t, c.value, "an empty init value must arrive non-nil: %q", c.rel)
		require.Equal(t, init[c.rel], string(c.value))
	}
	require.Equal(t, init, tester.KVEntries())
	require.Equal(t, init, stringValues(s.values))

	// No init entries: nothing loaded.
	empty := newRecordingState("")
	tester = NewReactorStateTester(t, empty, nil)
	require.Empty(t, empty.log)
	require.Empty(t, tester.KVEntries())
}

func TestReactorStateTesterInitFailure(t *testing.T) {
	t.Parallel()
	failed, msgs := rstRunFailing(t, func(tb testing.TB) {
		s := newRecordingState("")
		s.failKey = "/t/bad"
		NewReactorStateTester(tb, s, map[string]string{"/t/bad": "x"})
	})
	require.True(t, failed, "a failing init Update must fail the test")
	require.Contains(t, msgs, "/t/bad")

	failed, _ = rstRunFailing(t, func(tb testing.TB) {
		NewReactorStateTester(tb, nil, nil)
	})
	require.True(t, failed, "a nil state must fail the test")
}

func TestReactorStateTesterUpdate(t *testing.T) {
	t.Parallel()
	s := newRecordingState("")
	tester := NewReactorStateTester(t, s, map[string]string{"/t/a": "1"})
	s.log = nil

	require.NoError(t, tester.Update("/t/b", []byte("2")))
	tester.MustUpdate("/t/c", []byte{})
	tester.MustUpdate("/t/a", nil) // delete
	require.Equal(t, []updateRecord{
		{rel: "/t/b", value: []byte("2")},
		{rel: "/t/c", value: []byte{}},
		{rel: "/t/a", value: nil},
	}, s.log, "updates must arrive with isInit = false, nil meaning delete")
	require.Equal(t, map[string]string{"/t/b": "2", "/t/c": ""}, tester.KVEntries())
	require.Equal(t, tester.KVEntries(), stringValues(s.values))

	// A rejected update is returned and not recorded.
	s.failKey = "/t/b"
	err := tester.Update("/t/b", []byte("new"))
	require.ErrorIs(t, err, errUpdateRejected)
	require.Equal(t, map[string]string{"/t/b": "2", "/t/c": ""}, tester.KVEntries())
	err = tester.Update("/t/b", nil)
	require.ErrorIs(t, err, errUpdateRejected)
	require.Contains(t, tester.KVEntries(), "/t/b")

	failed, msgs := rstRunFailing(t, func(tb testing.TB) {
		s := newRecordingState("")
		s.failKey = "/t/x"
		NewReactorStateTester(tb, s, nil).MustUpdate("/t/x", []byte("1"))
	})
	require.True(t, failed, "MustUpdate must fail the test on error")
	require.Contains(t, msgs, "/t/x")
}

func TestReactorStateTesterKVEntriesIsACopy(t *testing.T) {
	t.Parallel()
	tester := NewReactorStateTester(t, newRecordingState(""), map[string]string{"/t/a": "1"})
	kv := tester.KVEntries()
	kv["/t/a"] = "changed"
	kv["/t/z"] = "added"
	require.Equal(t, map[string]string{"/t/a": "1"}, tester.KVEntries())
}

func TestReactorStateTesterApplyPatches(t *testing.T) {
	t.Parallel()
	s := newRecordingState("")
	tester := NewReactorStateTester(t, s, map[string]string{"/t/a": "1", "/t/b": "2", "/t/d": "4"})
	s.log = nil
	s.patches = [][]DataPatch{
		{setKey("/t/a", []byte("10")), setKey("/t/c", []byte("3"))},
		{
			// Sees group 1's write.
			rstFunc("/t/a", func(old []byte) ([]byte, bool, error) {
				require.Equal(t, "10", string(old))
				return []byte("11"), true, nil
			}),
			setKey("/t/b", nil),
			setKey("/t/e", []byte{}),
		},
		// No-op group: no Update.
		{setKey("/t/d", []byte("4")), rstFunc("/t/d", func(old []byte) ([]byte, bool, error) { return old, false, nil })},
		// An ignored patch is skipped, the rest of its group applies.
		{
			rstFunc("/t/d", func([]byte) ([]byte, bool, error) { return []byte("x"), true, ErrEtcdIgnore }),
			setKey("/t/f", []byte("6")),
		},
	}
	tryAgain, err := tester.ApplyPatches()
	require.NoError(t, err)
	require.False(t, tryAgain)
	require.Equal(t, []updateRecord{
		{rel: "/t/a", value: []byte("10")},
		{rel: "/t/c", value: []byte("3")},
		{rel: "/t/a", value: []byte("11")},
		{rel: "/t/b", value: nil},
		{rel: "/t/e", value: []byte{}},
		{rel: "/t/f", value: []byte("6")},
	}, s.log)
	want := map[string]string{"/t/a": "11", "/t/c": "3", "/t/d": "4", "/t/e": "", "/t/f": "6"}
	require.Equal(t, want, tester.KVEntries())
	require.Equal(t, want, stringValues(s.values))
	require.Empty(t, s.patches, "ApplyPatches must take the patches")

	// Nothing pending: nothing happens.
	s.log = nil
	tryAgain, err = tester.ApplyPatches()
	require.NoError(t, err)
	require.False(t, tryAgain)
	require.Empty(t, s.log)
	tester.MustApplyPatches()
}

// TestReactorStateTesterTryAgainAbortsWholeFlush: as in the worker, a group
// asking to try again aborts the whole flush: nothing of any group, before
// or after it, is applied.
func TestReactorStateTesterTryAgainAbortsWholeFlush(t *testing.T) {
	t.Parallel()
	s := newRecordingState("")
	tester := NewReactorStateTester(t, s, map[string]string{"/t/a": "1"})
	laterRan := false
	s.patches = [][]DataPatch{
		{setKey("/t/a", []byte("2"))},
		{
			setKey("/t/b", []byte("partial")),
			rstFunc("/t/a", func([]byte) ([]byte, bool, error) { return nil, false, fmt.Errorf("not yet: %w", ErrEtcdTryAgain) }),
		},
		{rstFunc("/t/c", func([]byte) ([]byte, bool, error) {
			laterRan = true
			return []byte("3"), true, nil
		})},
	}
	tryAgain, err := tester.ApplyPatches()
	require.NoError(t, err)
	require.True(t, tryAgain)
	require.False(t, laterRan, "groups after the one asking to try again must not run")
	require.Equal(t, map[string]string{"/t/a": "1"}, tester.KVEntries(),
		"nothing of any group applies when one asks to try again")
	require.Equal(t, map[string]string{"/t/a": "1"}, stringValues(s.values))
	require.Len(t, s.log, 1, "only the initial load reached the state")

	failed, msgs := rstRunFailing(t, func(tb testing.TB) {
		s := newRecordingState("")
		s.patches = [][]DataPatch{{rstFunc("/t/a", func([]byte) ([]byte, bool, error) { return nil, false, ErrEtcdTryAgain })}}
		NewReactorStateTester(tb, s, nil).MustApplyPatches()
	})
	require.True(t, failed, "MustApplyPatches must fail when a patch asks to try again")
	require.Contains(t, msgs, "try again")
}

func TestReactorStateTesterApplyPatchesErrors(t *testing.T) {
	t.Parallel()
	errBoom := errors.New("boom")
	tests := []struct {
		name    string
		failKey string
		bad     []DataPatch
		wantErr error
		// laterRan and wantKV: a failing patch aborts the flush before any
		// write; a rejected Update happens while the writes are fed back,
		// after every group ran and the groups before it were applied.
		laterRan bool
		wantKV   map[string]string
	}{
		{"patch error", "", []DataPatch{setKey("/t/b", []byte("partial")),
			rstFunc("/t/a", func([]byte) ([]byte, bool, error) { return nil, false, fmt.Errorf("ctx: %w", errBoom) })}, errBoom,
			false, map[string]string{"/t/a": "1"}},
		{"panic in a patch", "", []DataPatch{setKey("/t/b", []byte("partial")),
			rstFunc("/t/a", func([]byte) ([]byte, bool, error) { panic("kaboom") })}, ErrPanic,
			false, map[string]string{"/t/a": "1"}},
		{"nil Func", "", []DataPatch{setKey("/t/b", []byte("partial")), SingleDataPatch{Key: util.NewEtcdKey("/t/a")}}, ErrInvalidArgument,
			false, map[string]string{"/t/a": "1"}},
		{"rejected Update", "/t/b", []DataPatch{setKey("/t/b", []byte("x"))}, errUpdateRejected,
			true, map[string]string{"/t/a": "2"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newRecordingState("")
			tester := NewReactorStateTester(t, s, map[string]string{"/t/a": "1"})
			s.failKey = tt.failKey
			laterRan := false
			s.patches = [][]DataPatch{
				{setKey("/t/a", []byte("2"))},
				tt.bad,
				{rstFunc("/t/c", func([]byte) ([]byte, bool, error) {
					laterRan = true
					return []byte("3"), true, nil
				})},
			}
			tryAgain, err := tester.ApplyPatches()
			require.ErrorIs(t, err, tt.wantErr)
			require.False(t, tryAgain)
			require.Equal(t, tt.laterRan, laterRan)
			require.Equal(t, tt.wantKV, tester.KVEntries())

			failed, _ := rstRunFailing(t, func(tb testing.TB) {
				s := newRecordingState("")
				s.failKey = tt.failKey
				s.patches = [][]DataPatch{tt.bad}
				NewReactorStateTester(tb, s, map[string]string{"/t/a": "1"}).MustApplyPatches()
			})
			require.True(t, failed, "MustApplyPatches must fail on error")
		})
	}
}

// TestReactorStateTesterRefusesReservedKeys: as the worker does, the tester
// refuses a write to a key in a reserved area (/__orchestrator/ at any
// depth) with ErrKeyOutsidePrefix, and applies nothing of the flush. (Before,
// it applied the write and told the state the reserved key, which a worker
// never does: a state could pass its unit tests and fail in production.)
func TestReactorStateTesterRefusesReservedKeys(t *testing.T) {
	t.Parallel()
	for _, key := range []string{"/app/__orchestrator/delete-counter", "/__orchestrator/token/x", "/a/b/__orchestrator/"} {
		t.Run(key, func(t *testing.T) {
			s := newRecordingState("")
			tester := NewReactorStateTester(t, s, map[string]string{"/t/a": "1"})
			s.log = nil // the initial load
			s.patches = [][]DataPatch{{setKey("/t/a", []byte("2"))}, {setKey(key, []byte("x"))}}
			_, err := tester.ApplyPatches()
			require.ErrorIs(t, err, ErrKeyOutsidePrefix)
			require.Equal(t, map[string]string{"/t/a": "1"}, tester.KVEntries(), "nothing of the flush is applied")
			require.Empty(t, s.log, "the state is told nothing")
		})
	}
}

// TestReactorStateTesterMatchesWorkerRules runs the same patches through the
// tester twice in a row: the second run sees the first run's results, as the
// worker's next Tick would.
func TestReactorStateTesterMatchesWorkerRules(t *testing.T) {
	t.Parallel()
	s := newRecordingState("")
	tester := NewReactorStateTester(t, s, map[string]string{"/t/n": "0"})
	inc := rstFunc("/t/n", func(old []byte) ([]byte, bool, error) {
		return []byte(fmt.Sprint(len(old) + 1)), true, nil // "0" -> "2", "2" -> "2"
	})
	s.patches = [][]DataPatch{{inc}}
	tester.MustApplyPatches()
	require.Equal(t, map[string]string{"/t/n": "2"}, tester.KVEntries())
	s.log = nil
	s.patches = [][]DataPatch{{inc}}
	tester.MustApplyPatches()
	require.Empty(t, s.log, "a patch writing the current value is a no-op")
}

// TestReactorStateTesterFlushSeesEarlierGroups: the groups of one flush run
// on the values the groups before them left, general patches included; a
// flush aborted by ErrEtcdTryAgain leaves the values every patch sees as
// they were, so the next flush starts from the applied state.
func TestReactorStateTesterFlushSeesEarlierGroups(t *testing.T) {
	t.Parallel()
	s := newRecordingState("")
	tester := NewReactorStateTester(t, s, map[string]string{"/t/a": "1"})
	copyAToB := patchFunc(func(vm map[util.EtcdKey][]byte, cs map[util.EtcdKey]struct{}) error {
		b := util.NewEtcdKey("/t/b")
		vm[b] = vm[util.NewEtcdKey("/t/a")]
		cs[b] = struct{}{}
		return nil
	})
	tryAgain := rstFunc("/t/c", func([]byte) ([]byte, bool, error) { return nil, false, ErrEtcdTryAgain })

	s.patches = [][]DataPatch{{setKey("/t/a", []byte("2"))}, {copyAToB}, {tryAgain}}
	again, err := tester.ApplyPatches()
	require.NoError(t, err)
	require.True(t, again)
	require.Equal(t, map[string]string{"/t/a": "1"}, tester.KVEntries())

	s.patches = [][]DataPatch{{copyAToB}}
	tester.MustApplyPatches()
	require.Equal(t, map[string]string{"/t/a": "1", "/t/b": "1"}, tester.KVEntries(),
		"an aborted flush must leave nothing behind for the next one")

	s.patches = [][]DataPatch{{setKey("/t/a", []byte("3"))}, {copyAToB}}
	tester.MustApplyPatches()
	require.Equal(t, map[string]string{"/t/a": "3", "/t/b": "3"}, tester.KVEntries())
	require.Equal(t, tester.KVEntries(), stringValues(s.values))
}
