package orchestrator

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// sizedRecordingState is a recordingState that records its ExpectKeys calls
// and how many Updates it had seen at each.
type sizedRecordingState struct {
	*recordingState
	mu       sync.Mutex
	expected []int // n of each ExpectKeys call
	updates  []int // len(log) at each call
	panics   bool
}

func (s *sizedRecordingState) ExpectKeys(n int) {
	if s.panics {
		panic("ExpectKeys exploded")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.expected = append(s.expected, n)
	s.updates = append(s.updates, len(s.log))
}

func (s *sizedRecordingState) calls() ([]int, []int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]int(nil), s.expected...), append([]int(nil), s.updates...)
}

// sizedSnapshotter is tickSnapshotter for a sizedRecordingState.
type sizedSnapshotter struct{ tickSnapshotter }

func (s *sizedSnapshotter) Tick(ctx context.Context, st ReactorState) (ReactorState, error) {
	_, err := s.tickSnapshotter.Tick(ctx, st.(*sizedRecordingState).recordingState)
	return st, err
}

// TestSizedStateExpectsKeysBeforeTheFirstLoad: a SizedState hears the
// number of keys once, before the first load's first Update, on the
// streaming path and on the fallback; neither the reload after a compaction
// of a state that holds keys nor a second Run of the worker calls it again.
func TestSizedStateExpectsKeysBeforeTheFirstLoad(t *testing.T) {
	t.Parallel()
	for _, noStream := range []bool{false, true} {
		t.Run(fmt.Sprintf("noStream=%v", noStream), func(t *testing.T) {
			const prefix, keys = "/test/sized", 40
			srv := etcdtest.NewServer(t)
			admin := srv.Client(t)
			ctx := testContext(t)
			for i := range keys {
				mustPutKV(ctx, t, admin, fmt.Sprintf("%s/k%02d", prefix, i), fmt.Sprint(i))
			}
			proxy := etcdtest.NewProxy(t, srv.Endpoints()[0])
			cfg := etcdtest.ClientConfig(proxy.Endpoint())
			cfg.DialOptions = (&rpcCounter{noStream: noStream}).dialOptions()
			state := &sizedRecordingState{recordingState: newRecordingState(prefix)}
			reactor := &sizedSnapshotter{}
			w, err := NewEtcdWorker(etcdtest.NewClientFromConfig(t, cfg), prefix, reactor, state,
				WithPageSize(7), WithMaxStaleness(500*time.Millisecond))
			require.NoError(t, err)

			runCtx, cancel := context.WithCancel(ctx)
			done := runAsync(runCtx, w, nil, 10*time.Millisecond, "sized")
			waitUntil(ctx, t, "the loaded state", func() bool { return reactor.equals(etcdSnapshot(ctx, t, admin, prefix)) })
			expected, updates := state.calls()
			require.Len(t, expected, 1, "one hint for the first load")
			require.GreaterOrEqual(t, expected[0], keys, "the hint counts every key")
			require.LessOrEqual(t, expected[0], keys+4, "the hint counts the prefix, bookkeeping included")
			require.Equal(t, []int{0}, updates, "the hint comes before the first Update")

			reloadByCompaction(ctx, t, proxy, admin, func() { mustPutKV(ctx, t, admin, prefix+"/new", "x") })
			waitUntil(ctx, t, "the reloaded state", func() bool { return reactor.equals(etcdSnapshot(ctx, t, admin, prefix)) })
			cancel()
			require.True(t, IsCleanStop(recvErr(ctx, t, done)))

			runCtx, cancel = context.WithCancel(ctx)
			defer cancel()
			done = runAsync(runCtx, w, nil, 10*time.Millisecond, "sized")
			require.NoError(t, w.WaitSynced(ctx))
			cancel()
			require.True(t, IsCleanStop(recvErr(ctx, t, done)))
			expected, _ = state.calls()
			require.Len(t, expected, 1, "a state that holds keys gets no hint")
		})
	}
}

// TestSizedStatePanicEndsRun: a panic in ExpectKeys ends Run with ErrPanic
// before the state gets any Update.
func TestSizedStatePanicEndsRun(t *testing.T) {
	t.Parallel()
	const prefix = "/test/sizedpanic"
	cli := sharedClient(t)
	ctx := testContext(t)
	mustPutKV(ctx, t, cli, prefix+"/a", "1")
	state := &sizedRecordingState{recordingState: newRecordingState(prefix), panics: true}
	w, err := NewEtcdWorker(cli, prefix, &sizedSnapshotter{}, state)
	require.NoError(t, err)
	err = recvErr(ctx, t, runAsync(ctx, w, nil, 10*time.Millisecond, "sized"))
	require.ErrorIs(t, err, ErrPanic)
	require.ErrorContains(t, err, "SizedState.ExpectKeys")
	require.Empty(t, state.log, "no Update after the failed hint")
}
