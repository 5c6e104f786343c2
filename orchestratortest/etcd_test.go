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
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/orchestratortest"
	"github.com/etcdworker/orchestrator/util"
)

func testContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestStartEtcdReturnsAReadyClient(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	cli := orchestratortest.StartEtcd(t)
	_, err := cli.Put(ctx, "/k", "v")
	require.NoError(t, err)
	resp, err := cli.Get(ctx, "/k")
	require.NoError(t, err)
	require.Len(t, resp.Kvs, 1)
	require.Equal(t, "v", string(resp.Kvs[0].Value))
}

func TestServerLimitsAreApplied(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	cli := orchestratortest.StartEtcd(t,
		orchestratortest.WithMaxTxnOps(2), orchestratortest.WithMaxRequestBytes(4096))

	ops := []clientv3.Op{clientv3.OpPut("/a", ""), clientv3.OpPut("/b", ""), clientv3.OpPut("/c", "")}
	_, err := cli.Txn(ctx).Then(ops[:2]...).Commit()
	require.NoError(t, err)
	_, err = cli.Txn(ctx).Then(ops...).Commit()
	require.ErrorIs(t, err, rpctypes.ErrTooManyOps)

	_, err = cli.Put(ctx, "/big", string(make([]byte, 8192)))
	require.ErrorIs(t, err, rpctypes.ErrRequestTooLarge)
}

func TestInvalidArguments(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	tests := []struct {
		name string
		size int
		opts []orchestratortest.Option
	}{
		{name: "zero cluster size", size: 0},
		{name: "negative txn ops", size: 1, opts: []orchestratortest.Option{orchestratortest.WithMaxTxnOps(-1)}},
		{name: "negative request bytes", size: 1, opts: []orchestratortest.Option{orchestratortest.WithMaxRequestBytes(-1)}},
		{name: "negative quota", size: 1, opts: []orchestratortest.Option{orchestratortest.WithQuotaBackendBytes(-1)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, err := orchestratortest.StartCluster(ctx, tt.size, tt.opts...)
			require.ErrorIs(t, err, orchestrator.ErrInvalidArgument)
			require.Nil(t, e)
		})
	}
}

func TestCompactMakesOldRevisionsUnreadable(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	e := orchestratortest.StartEtcdServer(t)
	cli := e.Client()
	first, err := cli.Put(ctx, "/k", "1")
	require.NoError(t, err)
	_, err = cli.Put(ctx, "/k", "2")
	require.NoError(t, err)

	rev, err := e.Compact(ctx)
	require.NoError(t, err)
	require.Greater(t, rev, first.Header.Revision)
	_, err = cli.Get(ctx, "/k", clientv3.WithRev(first.Header.Revision))
	require.ErrorIs(t, err, rpctypes.ErrCompacted)

	again, err := e.Compact(ctx)
	require.NoError(t, err, "compacting at the same revision again")
	require.Equal(t, rev, again)
}

func TestRevokeLeaseDeletesItsKeys(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	e := orchestratortest.StartEtcdServer(t)
	other, err := e.NewClient() // closed by the kit
	require.NoError(t, err)
	lease, err := other.Grant(ctx, 60)
	require.NoError(t, err)
	_, err = other.Put(ctx, "/owned", "x", clientv3.WithLease(lease.ID))
	require.NoError(t, err)

	require.NoError(t, e.RevokeLease(ctx, lease.ID))
	resp, err := e.Client().Get(ctx, "/owned")
	require.NoError(t, err)
	require.Empty(t, resp.Kvs)
	require.NoError(t, e.RevokeLease(ctx, lease.ID), "revoking a revoked lease")
}

func TestCloseRemovesItsTemporaryDirectoryButNotAGivenOne(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	given := t.TempDir()
	for _, dir := range []string{"", given} {
		e, err := orchestratortest.Start(ctx, orchestratortest.WithDir(dir))
		require.NoError(t, err)
		_, err = e.Client().Put(ctx, "/k", "v")
		require.NoError(t, err)
		require.NoError(t, e.Close())
		require.NoError(t, e.Close(), "Close is idempotent")
		entries, err := os.ReadDir(given)
		require.NoError(t, err)
		if dir == given {
			require.NotEmpty(t, entries, "data kept in the given directory")
		}
	}
}

func TestClusterServesFromEveryMember(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	e := orchestratortest.StartEtcdCluster(t, 3)
	eps := e.Endpoints()
	require.Len(t, eps, 3)
	_, err := e.Client().Put(ctx, "/k", "v")
	require.NoError(t, err)
	for _, ep := range eps {
		cli, err := clientv3.New(clientv3.Config{Endpoints: []string{ep}, DialTimeout: 5 * time.Second})
		require.NoError(t, err)
		resp, err := cli.Get(ctx, "/k")
		require.NoError(t, cli.Close())
		require.NoError(t, err)
		require.Len(t, resp.Kvs, 1, "member %s", ep)
	}
}

// TestParallelServersRunWorkers: several parallel tests each start
// their own server and run a worker on it; nothing is shared, nothing leaks.
func TestParallelServersRunWorkers(t *testing.T) {
	t.Parallel()
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

func (nopState) GetPatches() [][]orchestrator.DataPatch { return nil }

// TestCloseIsIdempotentAndConcurrent: Close may be called from
// several goroutines and again later; each returns the same result.
func TestCloseIsIdempotentAndConcurrent(t *testing.T) {
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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
