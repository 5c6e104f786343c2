package jsonstate_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/jsonstate"
)

type stock struct {
	Apples int `json:"apples"`
}

type order struct {
	Qty      int  `json:"qty"`
	Accepted bool `json:"accepted"`
}

// TestRequireMakesGroupsConditional: a group with Require or RequireAll
// commits only when the condition holds on the values at commit time, and a
// failed condition also undoes the group's changes queued before it.
func TestRequireMakesGroupsConditional(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name  string
		build func(orders *jsonstate.State[order], shop *jsonstate.Doc[stock], g *jsonstate.Group[order])
		want  bool
	}{
		{"require holds", func(_ *jsonstate.State[order], shop *jsonstate.Doc[stock], g *jsonstate.Group[order]) {
			g.Add(shop.RequireOps(func(s stock, ok bool) (bool, error) { return ok && s.Apples >= 3, nil })...)
			g.Put("new", order{Qty: 3, Accepted: true})
		}, true},
		{"require fails after a change", func(_ *jsonstate.State[order], shop *jsonstate.Doc[stock], g *jsonstate.Group[order]) {
			g.Put("new", order{Qty: 9, Accepted: true})
			g.Add(shop.RequireOps(func(s stock, _ bool) (bool, error) { return s.Apples >= 9, nil })...)
		}, false},
		{"require on a document of the state", func(_ *jsonstate.State[order], _ *jsonstate.Doc[stock], g *jsonstate.Group[order]) {
			g.Require("old", func(o order, ok bool) (bool, error) { return ok && o.Accepted, nil })
			g.Put("new", order{Qty: 1, Accepted: true})
		}, true},
		{"require on an absent document", func(_ *jsonstate.State[order], _ *jsonstate.Doc[stock], g *jsonstate.Group[order]) {
			g.Require("missing", func(_ order, ok bool) (bool, error) { return ok, nil })
			g.Put("new", order{Qty: 1, Accepted: true})
		}, false},
		{"require all holds", func(_ *jsonstate.State[order], _ *jsonstate.Doc[stock], g *jsonstate.Group[order]) {
			g.RequireAll(func(docs map[string]order) (bool, error) { return len(docs) == 1, nil })
			g.Put("new", order{Qty: 1, Accepted: true})
		}, true},
		{"require all fails", func(_ *jsonstate.State[order], _ *jsonstate.Doc[stock], g *jsonstate.Group[order]) {
			g.Put("new", order{Qty: 1, Accepted: true})
			g.RequireAll(func(docs map[string]order) (bool, error) { return len(docs) < 2, nil })
		}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			orders := jsonstate.New[order]("/shop/orders")
			shop := jsonstate.NewDoc[stock]("/shop/stock")
			tester := orchestrator.NewReactorStateTester(t, jsonstate.Multi{orders, shop}, map[string]string{
				"/shop/stock": `{"apples":5}`, "/shop/orders/old": `{"qty":1,"accepted":true}`,
			})
			orders.Group(func(g *jsonstate.Group[order]) { tt.build(orders, shop, g) })
			tester.MustApplyPatches()
			_, ok := orders.Get("new")
			require.Equal(t, tt.want, ok)
			require.Equal(t, 1+map[bool]int{true: 1}[tt.want], orders.Len())
		})
	}
}

// TestRequireAllNeverOversellsWithEtcdWorker: three workers each try to
// place three one-seat bookings, each a group "put my booking if fewer than
// capacity bookings exist" (RequireAll). Demand is 9, capacity 4: etcd must
// end with exactly 4 bookings.
func TestRequireAllNeverOversellsWithEtcdWorker(t *testing.T) {
	t.Parallel()
	const (
		prefix   = "/jsonstate-require"
		workers  = 3
		attempts = 3
		capacity = 4
	)
	srv := etcdtest.Shared(t)
	ctx := testContext(t)
	g, gctx := errgroup.WithContext(ctx)
	for w := range workers {
		bookings := jsonstate.New[order](prefix + "/bookings")
		done := 0
		reactor := orchestrator.ReactorFunc(func(context.Context, orchestrator.ReactorState) (orchestrator.ReactorState, error) {
			if done == attempts {
				return bookings, orchestrator.ErrReactorFinished
			}
			name := fmt.Sprintf("%d-%d", w, done)
			done++
			bookings.Group(func(g *jsonstate.Group[order]) {
				g.RequireAll(func(docs map[string]order) (bool, error) { return len(docs) < capacity, nil })
				g.Put(name, order{Qty: 1, Accepted: true})
			})
			return bookings, nil
		})
		worker, err := orchestrator.NewEtcdWorker(srv.Client(t), prefix, reactor, bookings)
		require.NoError(t, err)
		g.Go(func() error { return worker.Run(gctx, nil, 5*time.Millisecond, "book") })
	}
	require.NoError(t, g.Wait())
	resp, err := srv.Client(t).Get(ctx, prefix+"/bookings/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	require.NoError(t, err)
	require.EqualValues(t, capacity, resp.Count)
}
