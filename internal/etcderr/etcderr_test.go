package etcderr

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestPermanent(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		err       error
		permanent bool
		tooLarge  bool
	}{
		{name: "permission denied", err: rpctypes.ErrPermissionDenied, permanent: true},
		{name: "wrapped too many ops", err: fmt.Errorf("commit: %w", rpctypes.ErrTooManyOps), permanent: true},
		{name: "request too large", err: rpctypes.ErrRequestTooLarge, permanent: true},
		{name: "lease TTL over etcd's longest", err: rpctypes.ErrLeaseTTLTooLarge, permanent: true},
		{name: "gRPC unauthenticated", err: status.Error(codes.Unauthenticated, "no"), permanent: true},
		{name: "gRPC receive limit", err: status.Error(codes.ResourceExhausted,
			"grpc: received message larger than max (5000 vs. 4096)"), permanent: true, tooLarge: true},
		{name: "too many requests", err: rpctypes.ErrTooManyRequests},
		{name: "other resource exhausted", err: status.Error(codes.ResourceExhausted, "quota")},
		{name: "unavailable", err: status.Error(codes.Unavailable, "connection refused")},
		{name: "no leader", err: rpctypes.ErrNoLeader},
		{name: "deadline", err: context.DeadlineExceeded},
		{name: "not from etcd", err: errors.New("boom")},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.permanent, Permanent(tc.err))
			require.Equal(t, tc.tooLarge, MessageTooLarge(tc.err))
		})
	}
}

// TestEndsRetries: a closed client ends the retries whatever the error; an
// open one (or none) only on a Permanent error.
func TestEndsRetries(t *testing.T) {
	t.Parallel()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{"127.0.0.1:1"}, Logger: zap.NewNop()})
	require.NoError(t, err)
	transient := status.Error(codes.Unavailable, "connection refused")
	require.False(t, ClientClosed(nil))
	require.False(t, ClientClosed(cli))
	require.False(t, EndsRetries(nil, transient))
	require.False(t, EndsRetries(cli, transient))
	require.True(t, EndsRetries(nil, rpctypes.ErrPermissionDenied))
	require.True(t, EndsRetries(cli, rpctypes.ErrPermissionDenied))
	require.NoError(t, cli.Close())
	require.True(t, ClientClosed(cli))
	require.True(t, EndsRetries(cli, transient))
}

// TestReceivedTooLarge: the size of a message a gRPC receiver refused, as
// gRPC words it; nothing for other errors.
func TestReceivedTooLarge(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		err  error
		size int64
		ok   bool
	}{
		{status.Error(codes.ResourceExhausted, "grpc: received message larger than max (3277816 vs. 2097152)"), 3277816, true},
		{fmt.Errorf("commit: %w", status.Error(codes.ResourceExhausted, "grpc: received message larger than max (10 vs. 4)")), 10, true},
		{status.Error(codes.ResourceExhausted, "grpc: trying to send message larger than max (10 vs. 4)"), 0, false},
		{status.Error(codes.ResourceExhausted, "etcdserver: too many requests"), 0, false},
		{status.Error(codes.Unavailable, "grpc: received message larger than max (10 vs. 4)"), 0, false},
		{errors.New("received message larger than max (10 vs. 4)"), 0, false},
		{nil, 0, false},
	} {
		size, ok := ReceivedTooLarge(tc.err)
		require.Equal(t, tc.ok, ok, "%v", tc.err)
		require.Equal(t, tc.size, size, "%v", tc.err)
	}
}
