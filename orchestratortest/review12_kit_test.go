package orchestratortest_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/orchestratortest"
	"github.com/etcdworker/orchestrator/util"
)

// TestParallelServersRunWorkers: several parallel tests each start
// their own server and run a worker on it; nothing is shared, nothing leaks.
func TestParallelServersRunWorkers(t *testing.T) {
	for i := range 3 {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			t.Parallel()
			ctx := testContext(t)
			cli := orchestratortest.StartEtcd(t)
			n := 0
			w, err := orchestrator.NewEtcdWorker(cli, "/p", orchestrator.ReactorFunc(
				func(_ context.Context, s orchestrator.ReactorState) (orchestrator.ReactorState, error) {
					n++
					if n == 3 {
						return s, orchestrator.ErrReactorFinished
					}
					return s, nil
				}), nopState{})
			require.NoError(t, err)
			require.NoError(t, w.Run(ctx, nil, 5*time.Millisecond, "kit"))
		})
	}
}

type nopState struct{}

func (nopState) Update(_ util.EtcdKey, _ []byte, _ bool) error { return nil }
func (nopState) GetPatches() [][]orchestrator.DataPatch        { return nil }

// TestCloseIsIdempotentAndConcurrent: Close may be called from
// several goroutines and again later; each returns the same result.
func TestCloseIsIdempotentAndConcurrent(t *testing.T) {
	e, err := orchestratortest.Start(testContext(t))
	require.NoError(t, err)
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() { defer wg.Done(); require.NoError(t, e.Close()) }()
	}
	wg.Wait()
	require.NoError(t, e.Close())
}

// TestUseAfterCloseFailsCleanly: NewClient, Compact and RevokeLease
// on a closed Etcd return errors; none hangs, panics or leaks a client.
func TestUseAfterCloseFailsCleanly(t *testing.T) {
	ctx := testContext(t)
	e, err := orchestratortest.Start(ctx)
	require.NoError(t, err)
	require.NoError(t, e.Close())
	start := time.Now()
	cli, err := e.NewClient()
	if err == nil {
		_ = cli.Close()
	}
	require.ErrorIs(t, err, orchestratortest.ErrClosed, "a client of a closed Etcd is never closed by the kit")
	_, err = e.Compact(ctx)
	require.ErrorIs(t, err, orchestratortest.ErrClosed)
	require.ErrorIs(t, e.RevokeLease(ctx, 1), orchestratortest.ErrClosed)
	require.Less(t, time.Since(start), 3*time.Second)
}

// TestStartWithDoneContextLeavesNothing: Start with a cancelled ctx
// fails, and leaves neither a server nor a temporary directory.
func TestStartWithDoneContextLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for _, size := range []int{1} { // a 3-member cluster takes several seconds to stop
		sub := filepath.Join(dir, fmt.Sprint(size))
		e, err := orchestratortest.StartCluster(ctx, size, orchestratortest.WithDir(sub), nil)
		if e != nil {
			require.NoError(t, e.Close())
		}
		require.Error(t, err, "size %d", size)
		require.Nil(t, e)
	}
	_, err := os.Stat(dir)
	require.NoError(t, err, "a given dir stays")
}
