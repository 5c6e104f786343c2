package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// Attacks on the load and reload path (load.go, rangeread.go and the sweep
// marks of mirror.go), against a real embedded etcd.

// finishAtOnce is a reactor that ends Run at its first Tick, after a load.
var finishAtOnce = ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
	return s, ErrReactorFinished
})

// logReactor publishes, at every Tick, the state's values and the updates it
// has seen so far, for the test goroutine to inspect.
type logReactor struct {
	mu     sync.Mutex
	values map[string]string
	log    []updateRecord
	// act, if set, runs at every Tick in the worker's goroutine.
	act func(st *recordingState)
}

func (r *logReactor) Tick(_ context.Context, s ReactorState) (ReactorState, error) {
	st := s.(*recordingState)
	r.mu.Lock()
	r.values = stateSnapshot(st)
	r.log = append([]updateRecord(nil), st.log...)
	act := r.act
	r.mu.Unlock()
	if act != nil {
		act(st)
	}
	return st, nil
}

func (r *logReactor) snapshot() (map[string]string, []updateRecord) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.values, r.log
}

func (r *logReactor) equals(want map[string]string) bool {
	got, _ := r.snapshot()
	return fmt.Sprint(got) == fmt.Sprint(want)
}

// updatedKeys returns the sorted relative keys of updates, requiring each
// to be an initial update and to appear once.
func updatedKeys(t *testing.T, updates []updateRecord) []string {
	t.Helper()
	seen := map[string]bool{}
	keys := []string{}
	for _, u := range updates {
		require.True(t, u.isInit, "update of %s during a load has isInit", u.rel)
		require.False(t, seen[u.rel], "%s told twice in one load", u.rel)
		seen[u.rel] = true
		keys = append(keys, u.rel)
	}
	sort.Strings(keys)
	return keys
}

// TestRetryAfterAFailedVanishedUpdateReportsEveryVanishedKey: when the state
// refuses the Update(nil) of one vanished key, the load fails; the next Run
// must still report every key that vanished, not only the refused one (the
// others must not keep a sweep mark that makes them look found).
func TestRetryAfterAFailedVanishedUpdateReportsEveryVanishedKey(t *testing.T) {
	const prefix = "/test/r11vanish"
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
	ctx := testContext(t)
	for i := range 10 {
		mustPutKV(ctx, t, cli, fmt.Sprintf("%s/k%d", prefix, i), "v")
	}
	st := newRecordingState(prefix)
	w, err := NewEtcdWorker(cli, prefix, finishAtOnce, st)
	require.NoError(t, err)
	require.NoError(t, runWithin(t, w, 5*time.Second, "first"))
	require.Len(t, st.values, 10)

	for i := 1; i <= 5; i++ {
		_, err := cli.Delete(ctx, fmt.Sprintf("%s/k%d", prefix, i))
		require.NoError(t, err)
	}
	refused := errors.New("refused")
	st.onUpdate = func(_ string, value []byte, _ bool) error {
		if value == nil {
			return refused
		}
		return nil
	}
	require.ErrorIs(t, runWithin(t, w, 5*time.Second, "refusing"), refused)

	st.onUpdate = nil
	st.log = nil
	require.NoError(t, runWithin(t, w, 5*time.Second, "retry"))
	require.Equal(t, etcdSnapshot(ctx, t, cli, prefix), stateSnapshot(st))
}

// TestRunEndingMidLoadThenSecondRunTellsOnlyTheDifference: a Run that ends
// in the middle of its load (cancelled, or its state refusing an Update),
// then changes in etcd, then a second Run on the same worker: the state
// equals etcd, and the second load tells only the keys that differ from
// what the first one managed to tell (the refused key again).
func TestRunEndingMidLoadThenSecondRunTellsOnlyTheDifference(t *testing.T) {
	for _, refuse := range []bool{false, true} {
		t.Run(fmt.Sprintf("refuse=%v", refuse), func(t *testing.T) {
			const prefix = "/test/r11midload"
			srv := etcdtest.NewServer(t, etcdtest.WithMaxRequestBytes(8<<10))
			cli := srv.Client(t)
			ctx := testContext(t)
			big := string(make([]byte, 1000))
			for i := range 40 {
				mustPutKV(ctx, t, cli, fmt.Sprintf("%s/k%02d", prefix, i), big)
			}
			st := newRecordingState(prefix)
			w, err := NewEtcdWorker(cli, prefix, finishAtOnce, st)
			require.NoError(t, err)
			runCtx, cancel := context.WithCancel(ctx)
			defer cancel()
			refused := errors.New("refused")
			st.onUpdate = func(string, []byte, bool) error {
				if len(st.log) == 20 {
					if refuse {
						return refused
					}
					cancel()
				}
				return nil
			}
			err = w.Run(runCtx, nil, behaviourTick, "cut")
			if refuse {
				require.ErrorIs(t, err, refused)
			} else {
				require.True(t, IsCleanStop(err), "%v", err)
			}
			told := stateSnapshot(st)
			require.Less(t, len(told), 40, "the load stopped half way")
			require.GreaterOrEqual(t, len(told), 20)

			_, err = cli.Delete(ctx, prefix+"/k05")
			require.NoError(t, err)
			_, err = cli.Delete(ctx, prefix+"/k35")
			require.NoError(t, err)
			mustPutKV(ctx, t, cli, prefix+"/k06", "w")
			mustPutKV(ctx, t, cli, prefix+"/k36", "w")
			mustPutKV(ctx, t, cli, prefix+"/k50", "")
			st.onUpdate, st.log = nil, nil
			require.NoError(t, runWithin(t, w, 5*time.Second, "second"))
			now := etcdSnapshot(ctx, t, cli, prefix)
			require.Equal(t, now, stateSnapshot(st))
			want := []string{"/k05", "/k06", "/k50"}
			if refuse {
				want = append(want, "/k19")
			}
			for k := range told {
				if _, ok := now[k]; !ok && k != "/k05" {
					want = append(want, k)
				}
			}
			for k, v := range now {
				if _, ok := told[k]; !ok && k != "/k50" || ok && told[k] != v && k != "/k06" {
					want = append(want, k)
				}
			}
			sort.Strings(want)
			require.Equal(t, want, updatedKeys(t, st.log))
			require.True(t, st.has("/k50", ""), "an empty value reaches the state")
		})
	}
}
