package orchestrator

import (
	"context"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"
)

// TestSum ports the original's sum test: six workers share /sum and /0../5.
// Each Tick asserts /sum == Σ /i on the snapshot it sees, then adds the same
// delta to its own key and /sum in one group. A torn snapshot, a lost or a
// doubled increment breaks the assertion or the final totals.
func TestSum(t *testing.T) {
	t.Parallel()
	const (
		workers = 6
		cycles  = 30
		prefix  = "/test/sum"
	)
	env := newTestEnv(t)
	ctx := testContext(t)
	g, gctx := errgroup.WithContext(ctx)
	for i := 0; i < workers; i++ {
		cli := env.client(t)
		state := newMapState(prefix)
		id := strconv.Itoa(i)
		done := 0
		reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
			st := s.(*mapState)
			var sum int64
			for j := 0; j < workers; j++ {
				sum += st.int("/" + strconv.Itoa(j))
			}
			if got := st.int("/sum"); got != sum {
				return nil, fmt.Errorf("torn snapshot: /sum = %d, Σ = %d", got, sum)
			}
			if done == cycles {
				return st, ErrReactorFinished
			}
			done++
			delta := int64(i + 1)
			st.patches = append(st.patches, []DataPatch{incrPatch(st.key("/"+id), delta), incrPatch(st.key("/sum"), delta)})
			return st, nil
		})
		w := mustNewEtcdWorker(t, cli, prefix, reactor, state)
		g.Go(func() error { return w.Run(gctx, nil, 5*time.Millisecond, "sum-"+id) })
	}
	require.NoError(t, g.Wait())

	cli := env.client(t)
	resp, err := cli.Get(ctx, prefix+"/", clientv3.WithPrefix())
	require.NoError(t, err)
	got := map[string]int64{}
	for _, kv := range resp.Kvs {
		if k := string(kv.Key); k[len(prefix):len(prefix)+2] != "/_" {
			got[k] = mustInt(t, kv.Value)
		}
	}
	var want int64
	for i := 0; i < workers; i++ {
		v := int64(cycles * (i + 1))
		require.Equal(t, v, got[prefix+"/"+strconv.Itoa(i)], "worker %d", i)
		want += v
	}
	require.Equal(t, want, got[prefix+"/sum"])
}
