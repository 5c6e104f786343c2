package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

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

// visibleSnapshot is etcdSnapshot without the reserved keys of nested
// prefixes either.
func visibleSnapshot(ctx context.Context, t *testing.T, cli *clientv3.Client, prefix string) map[string]string {
	t.Helper()
	out := etcdSnapshot(ctx, t, cli, prefix)
	for k := range out {
		if strings.Contains(k, reservedMarker) {
			delete(out, k)
		}
	}
	return out
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
	t.Parallel()
	const prefix = "/test/vanish"
	srv := etcdtest.Shared(t)
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
	t.Parallel()
	for _, refuse := range []bool{false, true} {
		t.Run(fmt.Sprintf("refuse=%v", refuse), func(t *testing.T) {
			const prefix = "/test/midload"
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
			// Cancelling stops the read at the next chunk: keys already
			// received may still be told (all of them on a fast machine).
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

// reloadWorker starts a worker on prefix through proxy with a logReactor.
func reloadWorker(ctx context.Context, t *testing.T, proxy *etcdtest.Proxy, counter *rpcCounter,
	recvLimit int, st *recordingState, opts ...Option,
) (*logReactor, <-chan error) {
	t.Helper()
	cfg := etcdtest.ClientConfig(proxy.Endpoint())
	cfg.DialOptions = counter.dialOptions()
	cfg.MaxCallRecvMsgSize = recvLimit
	reactor := &logReactor{}
	opts = append([]Option{WithMaxStaleness(500 * time.Millisecond)}, opts...)
	w, err := NewEtcdWorker(etcdtest.NewClientFromConfig(t, cfg), st.prefix, reactor, st, opts...)
	require.NoError(t, err)
	return reactor, runAsync(ctx, w, nil, 10*time.Millisecond, "reload")
}

// TestRepeatedReloadsTellOnlyTheDifferenceAndCommitsStillSucceed: three
// compactions in a row while the worker is cut off, with a key deleted,
// re-created, and deleted and re-created again between two loads, a changed
// key, new empty keys, reserved keys of a nested prefix and a bump of the
// worker's delete counter: each reload tells exactly the changed keys, with
// isInit; afterwards a commit writing an unchanged key and deleting one
// succeeds (no sweep mark or stale counter revision in its compares).
func TestRepeatedReloadsTellOnlyTheDifferenceAndCommitsStillSucceed(t *testing.T) {
	t.Parallel()
	const prefix = "/test/reload"
	srv := etcdtest.NewServer(t)
	admin := srv.Client(t)
	ctx := testContext(t)
	for _, k := range []string{"/stable", "/c", "/x", "/k1"} {
		mustPutKV(ctx, t, admin, prefix+k, "s")
	}
	proxy := etcdtest.NewProxy(t, srv.Endpoints()[0])
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	st := newRecordingState(prefix)
	reactor, done := reloadWorker(runCtx, t, proxy, &rpcCounter{}, 0, st)
	waitUntil(ctx, t, "the loaded state", func() bool { return reactor.equals(visibleSnapshot(ctx, t, admin, prefix)) })
	_, log := reactor.snapshot()
	seen := len(log)
	for round := 1; round <= 3; round++ {
		proxy.Pause()
		switch round {
		case 1, 3:
			_, err := admin.Delete(ctx, prefix+"/x")
			require.NoError(t, err)
			if round == 3 {
				mustPutKV(ctx, t, admin, prefix+"/x", "s")
			}
		case 2:
			mustPutKV(ctx, t, admin, prefix+"/x", "s")
		}
		mustPutKV(ctx, t, admin, prefix+"/c", fmt.Sprint(round))
		mustPutKV(ctx, t, admin, fmt.Sprintf("%s/n%d", prefix, round), "")
		mustPutKV(ctx, t, admin, fmt.Sprintf("%s/sub%s/token/%d", prefix, reservedDir, round), "t")
		mustPutKV(ctx, t, admin, prefix+reservedDir+"delete-counter", "")
		_, err := etcdtest.Compact(ctx, admin)
		require.NoError(t, err)
		proxy.Resume()
		waitUntil(ctx, t, "the reloaded state", func() bool { return reactor.equals(visibleSnapshot(ctx, t, admin, prefix)) })
		_, log = reactor.snapshot()
		require.Equal(t, []string{"/c", fmt.Sprintf("/n%d", round), "/x"}, updatedKeys(t, log[seen:]), "round %d", round)
		seen = len(log)
	}

	var once sync.Once
	reactor.mu.Lock()
	reactor.act = func(st *recordingState) {
		once.Do(func() { st.group(st.appendTo("/stable", "x"), deletePatch(st.key("/k1"))) })
	}
	reactor.mu.Unlock()
	waitUntil(ctx, t, "the commit", func() bool {
		snap := visibleSnapshot(ctx, t, admin, prefix)
		_, has := snap["/k1"]
		return snap["/stable"] == "sx" && !has && reactor.equals(snap)
	})
	cancel()
	require.True(t, IsCleanStop(recvErr(ctx, t, done)))
}

// TestFallbackPagesUnderATinyReceiveLimitRestartAfterACompactionBetweenPages:
// on a server without RangeStream and a client whose receive limit is far
// below the prefix, the load pages; a compaction between two pages makes it
// start over, and the state ends equal to etcd with every key told with
// isInit, nothing torn.
func TestFallbackPagesUnderATinyReceiveLimitRestartAfterACompactionBetweenPages(t *testing.T) {
	t.Parallel()
	const prefix = "/test/fallback"
	srv := etcdtest.NewServer(t)
	admin := srv.Client(t)
	ctx := testContext(t)
	big := string(make([]byte, 1000))
	for i := range 100 {
		mustPutKV(ctx, t, admin, fmt.Sprintf("%s/k%03d", prefix, i), big)
	}
	proxy := etcdtest.NewProxy(t, srv.Endpoints()[0])
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	st := newRecordingState(prefix)
	compacted := false
	st.onUpdate = func(rel string, _ []byte, _ bool) error {
		if !compacted && len(st.log) == 15 {
			compacted = true
			_, err := admin.Delete(ctx, prefix+"/k099")
			require.NoError(t, err)
			mustPutKV(ctx, t, admin, prefix+"/k000", "changed")
			_, err = etcdtest.Compact(ctx, admin)
			require.NoError(t, err)
		}
		return nil
	}
	counter := &rpcCounter{noStream: true}
	reactor, done := reloadWorker(runCtx, t, proxy, counter, 16<<10, st, WithPageSize(10))
	waitUntil(ctx, t, "the loaded state", func() bool { return reactor.equals(etcdSnapshot(ctx, t, admin, prefix)) })
	_, log := reactor.snapshot()
	for _, u := range log {
		require.True(t, u.isInit, "%s", u.rel)
	}
	// 15 keys of the cut load, then all 99 again except those unchanged.
	require.Len(t, log, 15+99-14, "the retry tells only what the cut load did not")
	_, _, ranges := counter.counts()
	require.Greater(t, ranges, 10, "the fallback paged")
	cancel()
	require.True(t, IsCleanStop(recvErr(ctx, t, done)))
}
