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
// and counter, and returns its reactor and result channel.
func loadTestWorker(ctx context.Context, t *testing.T, proxy *etcdtest.Proxy, counter *rpcCounter, prefix string) (*tickSnapshotter, <-chan error) {
	t.Helper()
	cfg := etcdtest.ClientConfig(proxy.Endpoint())
	cfg.DialOptions = counter.dialOptions()
	reactor := &tickSnapshotter{}
	w, err := NewEtcdWorker(etcdtest.NewClientFromConfig(t, cfg), prefix, reactor, newRecordingState(prefix),
		WithPageSize(7), WithMaxStaleness(500*time.Millisecond))
	require.NoError(t, err)
	return reactor, runAsync(ctx, w, nil, 10*time.Millisecond, "load")
}

// TestLoadAndReloadOnBothReadPaths: the initial load and the reload after
// a compaction give the state exactly what etcd holds, through the
// streaming range and through the paged fallback of servers without one
// (RangeStream answered Unimplemented, as etcd before 3.7 does); the
// fallback is remembered, so the reload does not try the stream again.
func TestLoadAndReloadOnBothReadPaths(t *testing.T) {
	t.Parallel()
	for _, noStream := range []bool{false, true} {
		t.Run(fmt.Sprintf("noStream=%v", noStream), func(t *testing.T) {
			const prefix = "/test/readpaths"
			srv := etcdtest.NewServer(t)
			admin := srv.Client(t)
			ctx := testContext(t)
			for i := range 50 {
				mustPutKV(ctx, t, admin, fmt.Sprintf("%s/k%02d", prefix, i), fmt.Sprint(i))
			}
			proxy := etcdtest.NewProxy(t, srv.Endpoints()[0])
			counter := &rpcCounter{noStream: noStream}
			runCtx, cancel := context.WithCancel(ctx)
			defer cancel()
			reactor, done := loadTestWorker(runCtx, t, proxy, counter, prefix)
			waitUntil(ctx, t, "the loaded state", func() bool { return reactor.equals(etcdSnapshot(ctx, t, admin, prefix)) })
			streams, _, _ := counter.counts()
			require.Equal(t, 1, streams, "the load tries the stream once")

			// Change the prefix while the worker is cut off, compact, and
			// let it reload.
			proxy.Pause()
			for i := range 10 {
				_, err := admin.Delete(ctx, fmt.Sprintf("%s/k%02d", prefix, i))
				require.NoError(t, err)
				mustPutKV(ctx, t, admin, fmt.Sprintf("%s/n%02d", prefix, i), "new")
			}
			_, err := etcdtest.Compact(ctx, admin)
			require.NoError(t, err)
			proxy.Resume()
			waitUntil(ctx, t, "the reloaded state", func() bool { return reactor.equals(etcdSnapshot(ctx, t, admin, prefix)) })
			streams, _, ranges := counter.counts()
			if noStream {
				require.Equal(t, 1, streams, "a server without the stream is remembered")
				require.Greater(t, ranges, 2, "the fallback reads pages")
			} else {
				require.Equal(t, 2, streams, "the reload streams again")
			}
			cancel()
			require.True(t, IsCleanStop(recvErr(ctx, t, done)))
		})
	}
}
