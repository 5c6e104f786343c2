package etcdreq

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
	"go.uber.org/zap"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestContextEndsWithItsTimeoutOrTheClient: a request's context ends at its
// timeout, with its parent, or as soon as its client is closed, whichever
// comes first; cancel releases it.
func TestContextEndsWithItsTimeoutOrTheClient(t *testing.T) {
	t.Parallel()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{"127.0.0.1:1"}, Logger: zap.NewNop()})
	require.NoError(t, err)
	defer func() { _ = cli.Close() }()

	ctx, cancel := Context(context.Background(), time.Millisecond, cli)
	<-ctx.Done()
	require.ErrorIs(t, ctx.Err(), context.DeadlineExceeded)
	cancel()

	parent, cancelParent := context.WithCancel(context.Background())
	ctx, cancel = Context(parent, time.Hour, cli)
	cancelParent()
	<-ctx.Done()
	require.ErrorIs(t, ctx.Err(), context.Canceled)
	cancel()

	ctx, cancel = Context(context.Background(), time.Hour, cli)
	defer cancel()
	require.NoError(t, ctx.Err())
	require.NoError(t, cli.Close())
	select {
	case <-ctx.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the request's context outlived its closed client")
	}
}

// TestBoundWithoutAClientContext: a client with no context of its own (a
// zero Client) leaves ctx and cancel as they are.
func TestBoundWithoutAClientContext(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	bctx, bcancel := Bound(ctx, cancel, &clientv3.Client{})
	require.Equal(t, ctx, bctx)
	bcancel()
	require.ErrorIs(t, ctx.Err(), context.Canceled)
}
