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

// tickSnapshotter is a reactor that publishes a copy of the state each Tick
// sees, for another goroutine to compare with etcd.
type tickSnapshotter struct {
	mu   sync.Mutex
	last map[string]string
}

func (s *tickSnapshotter) Tick(_ context.Context, st ReactorState) (ReactorState, error) {
	snap := stateSnapshot(st.(*recordingState))
	s.mu.Lock()
	s.last = snap
	s.mu.Unlock()
	return st, nil
}

func (s *tickSnapshotter) equals(want map[string]string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return fmt.Sprint(s.last) == fmt.Sprint(want)
}

// loadTestWorker starts a worker on prefix whose client goes through proxy
// and counter, and returns it, its reactor and its result channel.
func loadTestWorker(ctx context.Context, t *testing.T, proxy *etcdtest.Proxy, counter *rpcCounter, prefix string,
	opts ...Option,
) (*EtcdWorker, *tickSnapshotter, <-chan error) {
	t.Helper()
	cfg := etcdtest.ClientConfig(proxy.Endpoint())
	cfg.DialOptions = counter.dialOptions()
	reactor := &tickSnapshotter{}
	opts = append([]Option{WithPageSize(7), WithMaxStaleness(500 * time.Millisecond)}, opts...)
	w, err := NewEtcdWorker(etcdtest.NewClientFromConfig(t, cfg), prefix, reactor, newRecordingState(prefix), opts...)
	require.NoError(t, err)
	return w, reactor, runAsync(ctx, w, nil, 10*time.Millisecond, "load")
}

// fallbackLog is the start of the message a worker logs when it falls back
// from the streaming range.
const fallbackLog = "etcd has no streaming range (RangeStream)"

// TestLoadAndReloadOnBothReadPaths: the initial load and the reload after
// a compaction give the state exactly what etcd holds, through the
// streaming range and through the paged fallback of servers without one
// (RangeStream answered Unimplemented, as etcd before 3.7 does); the
// fallback is remembered, so the reload does not try the stream again.
// Status tells the path, and the fallback is logged once, with the
// server's version. TestServerMatrix runs the same against real servers
// before 3.7.
func TestLoadAndReloadOnBothReadPaths(t *testing.T) {
	for _, noStream := range []bool{false, true} {
		t.Run(fmt.Sprintf("noStream=%v", noStream), func(t *testing.T) {
			want := ReadPathStream
			if noStream {
				want = ReadPathFallback
			}
			loadAndReload(t, etcdtest.NewServer(t), &rpcCounter{noStream: noStream}, want)
		})
	}
}

// loadAndReload loads a prefix of target through a worker whose client
// counts range RPCs with counter, changes the prefix while the worker is
// cut off, compacts and lets it reload. Both times the state is exactly
// etcd's. The worker reads with path want: the fallback is remembered (the
// reload does not try the stream again), reported by Status and logged
// once, with the server's version.
func loadAndReload(t *testing.T, target etcdtest.Target, counter *rpcCounter, want ReadPath) {
	const prefix = "/test/readpaths"
	admin := target.Client(t)
	ctx := testContext(t)
	for i := range 50 {
		mustPutKV(ctx, t, admin, fmt.Sprintf("%s/k%02d", prefix, i), fmt.Sprint(i))
	}
	proxy := etcdtest.NewProxy(t, target.Endpoints()[0])
	lg, logs := observedLogger(t)
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	w, reactor, done := loadTestWorker(runCtx, t, proxy, counter, prefix, WithLogger(lg))
	waitUntil(ctx, t, "the loaded state", func() bool { return reactor.equals(etcdSnapshot(ctx, t, admin, prefix)) })
	streams, _, _ := counter.counts()
	require.Equal(t, 1, streams, "the load tries the stream once")
	require.Equal(t, want, w.Status().ReadPath)

	// Change the prefix while the worker is cut off, compact, and let it
	// reload.
	reloadByCompaction(ctx, t, proxy, admin, func() {
		for i := range 10 {
			_, err := admin.Delete(ctx, fmt.Sprintf("%s/k%02d", prefix, i))
			require.NoError(t, err)
			mustPutKV(ctx, t, admin, fmt.Sprintf("%s/n%02d", prefix, i), "new")
		}
	})
	waitUntil(ctx, t, "the reloaded state", func() bool { return reactor.equals(etcdSnapshot(ctx, t, admin, prefix)) })
	streams, _, ranges := counter.counts()
	fallbacks := logs.FilterMessageSnippet(fallbackLog)
	if want == ReadPathFallback {
		require.Equal(t, 1, streams, "a server without the stream is remembered")
		require.Greater(t, ranges, 2, "the fallback reads pages")
		st, err := admin.Status(ctx, target.Endpoints()[0])
		require.NoError(t, err)
		require.Equal(t, 1, fallbacks.Len(), "the fallback is logged once")
		require.Equal(t, st.Version, fallbacks.All()[0].ContextMap()["serverVersion"])
	} else {
		require.Equal(t, 2, streams, "the reload streams again")
		require.Zero(t, fallbacks.Len())
	}
	require.Equal(t, want, w.Status().ReadPath)
	cancel()
	require.True(t, IsCleanStop(recvErr(ctx, t, done)))
	require.Equal(t, Status{}, w.Status(), "a stopped worker reports the zero Status")
}
