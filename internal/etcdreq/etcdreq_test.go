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

// TestOutliveEndsItsDurationAfterItsParent: the context lives on after its
// parent ends, for d, and no longer; release ends it at once, before or
// after the parent ended.
func TestOutliveEndsItsDurationAfterItsParent(t *testing.T) {
	t.Parallel()
	const d = 100 * time.Millisecond
	parent, cancel := context.WithCancel(context.Background())
	ctx, release := Outlive(parent, d)
	defer release()
	cancel()
	ended := time.Now()
	require.NoError(t, ctx.Err(), "ended with its parent")
	select {
	case <-ctx.Done():
		require.GreaterOrEqual(t, time.Since(ended), d)
	case <-time.After(10 * time.Second):
		t.Fatal("outlived its parent by far more than d")
	}
	require.ErrorIs(t, ctx.Err(), context.Canceled)

	for _, parentEnds := range []bool{false, true} {
		parent, cancel := context.WithCancel(context.Background())
		ctx, release := Outlive(parent, time.Hour)
		if parentEnds {
			cancel()
		}
		release()
		<-ctx.Done() // at once
		cancel()
	}
}
