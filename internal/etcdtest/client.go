package etcdtest

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/etcdworker/orchestrator/internal/etcderr"
)

// ClientDialTimeout is the DialTimeout of clients made by NewClient.
const ClientDialTimeout = 5 * time.Second

// ClientConfig returns the client configuration NewClient uses: the given
// endpoints, ClientDialTimeout and a no-op logger.
func ClientConfig(endpoints ...string) clientv3.Config {
	return clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: ClientDialTimeout,
		Logger:      zap.NewNop(),
	}
}

// NewClient returns a client for endpoints (e.g. a Proxy's Endpoint), closed
// by t.Cleanup. The test fails if the client cannot be created.
func NewClient(t testing.TB, endpoints ...string) *clientv3.Client {
	t.Helper()
	return NewClientFromConfig(t, ClientConfig(endpoints...))
}

// NewClientFromConfig returns a client built from cfg (a nil Logger is
// replaced by a no-op one), closed by t.Cleanup.
func NewClientFromConfig(t testing.TB, cfg clientv3.Config) *clientv3.Client {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	cli, err := clientv3.New(cfg)
	if err != nil {
		t.Fatalf("etcdtest: new client for %v: %v", cfg.Endpoints, err)
	}
	t.Cleanup(func() { _ = cli.Close() })
	return cli
}

// Compact physically compacts the store at its current revision (read with a
// Get) and returns that revision. Compacting an already compacted revision is
// not an error.
// It refuses a client of the shared server.
func Compact(ctx context.Context, cli *clientv3.Client) (int64, error) {
	if isShared(cli.Endpoints()) {
		return 0, errors.New("etcdtest: compacting the shared server; start one with NewServer")
	}
	resp, err := cli.Get(ctx, "\x00etcdtest/compact-probe", clientv3.WithCountOnly())
	if err != nil {
		return 0, err
	}
	rev := resp.Header.Revision
	if _, err := cli.Compact(ctx, rev, clientv3.WithCompactPhysical()); err != nil &&
		!errors.Is(err, rpctypes.ErrCompacted) {
		return 0, err
	}
	return rev, nil
}

// RevokeLease revokes lease id; a lease that no longer exists is not an
// error.
func RevokeLease(ctx context.Context, cli *clientv3.Client, id clientv3.LeaseID) error {
	_, err := cli.Revoke(ctx, id)
	if etcderr.LeaseNotFound(err) {
		return nil
	}
	return err
}
