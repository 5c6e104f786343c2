package orchestratortest_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/jsonstate"
	"github.com/etcdworker/orchestrator/orchestratortest"
)

// TestUserControllerWithKitAndReadiness is what a user's test of a small
// controller looks like: a real etcd from the kit, the worker's readiness
// check, and a clean stop.
func TestUserControllerWithKitAndReadiness(t *testing.T) {
	t.Parallel()
	cli := orchestratortest.StartEtcd(t)
	stock := jsonstate.New[int]("/shop/stock")
	restock := orchestrator.ReactorFunc(func(_ context.Context, s orchestrator.ReactorState) (orchestrator.ReactorState, error) {
		if n, ok := stock.Get("apples"); !ok || n < 5 {
			stock.Put("apples", 10)
		}
		return s, nil
	})
	w, err := orchestrator.NewEtcdWorker(cli, "/shop", restock, stock)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx, nil, 10*time.Millisecond, "shop") }()
	require.NoError(t, w.WaitSynced(ctx))
	_, err = cli.Put(ctx, "/shop/stock/apples", "2") // a sale
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		resp, err := cli.Get(ctx, "/shop/stock/apples")
		return err == nil && len(resp.Kvs) == 1 && string(resp.Kvs[0].Value) == "10" && w.Ready() == nil
	}, 5*time.Second, 10*time.Millisecond, "restocked and ready")
	cancel()
	require.True(t, orchestrator.IsCleanStop(<-done))
}
