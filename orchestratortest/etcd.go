package orchestratortest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/internal/embedetcd"
	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// ErrClosed is returned by Etcd.NewClient, Compact and RevokeLease after
// Close.
var ErrClosed = errors.New("orchestratortest: etcd closed")

// Etcd is a running embedded etcd: one member, or several started by
// StartCluster. Its methods are safe for concurrent use.
type Etcd struct {
	server  *embedetcd.Server // one member, or
	cluster *etcdtest.Cluster // several
	dir     string            // removed by Close when ownDir
	ownDir  bool
	client  *clientv3.Client

	mu      sync.Mutex
	clients []*clientv3.Client // closed by Close, before the members
	closed  bool               // Close has begun: no new clients

	closeOnce sync.Once
	closeErr  error
}

// Start starts a single-member etcd on a free 127.0.0.1 port and returns it
// once it serves clients, with a connected client (Client). ctx bounds the
// start only. The caller must Close it; StartEtcd and StartEtcdServer do that
// through t.Cleanup.
func Start(ctx context.Context, opts ...Option) (*Etcd, error) {
	return start(ctx, 1, opts)
}

// MustStart is Start for examples: it panics if etcd does not start, as
// net/http/httptest.NewServer does. The caller must Close it.
func MustStart(ctx context.Context, opts ...Option) *Etcd {
	e, err := Start(ctx, opts...)
	if err != nil {
		panic(fmt.Sprintf("orchestratortest: %v", err))
	}
	return e
}

// StartCluster starts a size-member etcd cluster on free 127.0.0.1 ports and
// returns it once every member serves clients. Endpoints lists every member
// and the kit's clients use all of them. ctx bounds the start only. The
// caller must Close it.
func StartCluster(ctx context.Context, size int, opts ...Option) (*Etcd, error) {
	return start(ctx, size, opts)
}

// StartEtcd starts a single-member etcd for the test and returns a client
// connected to it. The client and the server are closed by t.Cleanup; the
// test fails if the server does not start.
func StartEtcd(t testing.TB, opts ...Option) *clientv3.Client {
	t.Helper()
	return StartEtcdServer(t, opts...).Client()
}

// StartEtcdServer is StartEtcd returning the server itself, for tests that
// need its endpoints, more clients, compaction or lease revocation.
func StartEtcdServer(t testing.TB, opts ...Option) *Etcd {
	t.Helper()
	return startForTest(t, 1, opts)
}

// StartEtcdCluster is StartCluster for a test: the cluster is closed by
// t.Cleanup and the test fails if it does not start.
func StartEtcdCluster(t testing.TB, size int, opts ...Option) *Etcd {
	t.Helper()
	return startForTest(t, size, opts)
}

func startForTest(t testing.TB, size int, opts []Option) *Etcd {
	t.Helper()
	if newConfig(opts).dir == "" {
		opts = append(opts[:len(opts):len(opts)], WithDir(t.TempDir()))
	}
	ctx, cancel := context.WithTimeout(context.Background(), embedetcd.DefaultReadyTimeout)
	defer cancel()
	e, err := start(ctx, size, opts)
	if err != nil {
		t.Fatalf("orchestratortest: %v", err)
	}
	t.Cleanup(func() {
		if err := e.Close(); err != nil {
			t.Errorf("orchestratortest: %v", err)
		}
	})
	return e
}

func start(ctx context.Context, size int, opts []Option) (e *Etcd, err error) {
	c := newConfig(opts)
	if err := c.validate(size); err != nil {
		return nil, err
	}
	e = &Etcd{dir: c.dir}
	if e.dir == "" {
		if e.dir, err = os.MkdirTemp("", "orchestratortest-"); err != nil {
			return nil, fmt.Errorf("orchestratortest: %w", err)
		}
		e.ownDir = true
	}
	started := e // the returns below set e to nil on error
	defer func() {
		if err != nil {
			_ = started.Close()
		}
	}()
	if size == 1 {
		srv, err := embedetcd.Start(ctx, e.dir, c.serverOptions()...)
		if err != nil {
			return nil, fmt.Errorf("orchestratortest: start etcd: %w", err)
		}
		e.server = srv
	} else {
		cl, err := etcdtest.StartCluster(ctx, e.dir, size, c.serverOptions()...)
		if err != nil {
			return nil, fmt.Errorf("orchestratortest: start etcd cluster: %w", err)
		}
		e.cluster = cl
	}
	if e.client, err = e.NewClient(); err != nil {
		return nil, err
	}
	return e, nil
}

func (c *config) validate(size int) error {
	switch {
	case size < 1:
		return fmt.Errorf("orchestratortest: cluster size %d: %w", size, orchestrator.ErrInvalidArgument)
	case c.maxTxnOps < 0, c.maxRequestBytes < 0, c.quotaBytes < 0:
		return fmt.Errorf("orchestratortest: negative server limit: %w", orchestrator.ErrInvalidArgument)
	}
	return nil
}

func (c *config) serverOptions() []embedetcd.Option {
	return []embedetcd.Option{
		embedetcd.WithMaxTxnOps(uint(c.maxTxnOps)),
		embedetcd.WithMaxRequestBytes(uint(c.maxRequestBytes)),
		embedetcd.WithQuotaBackendBytes(c.quotaBytes),
		embedetcd.WithLogger(c.logger),
	}
}

// Endpoints returns the client URLs of every member, e.g.
// ["http://127.0.0.1:23456"], for clientv3.Config.Endpoints.
func (e *Etcd) Endpoints() []string {
	switch {
	case e.cluster != nil:
		return e.cluster.Endpoints()
	case e.server != nil:
		return e.server.Endpoints()
	}
	return nil
}

// Client returns the client created with the server, connected to every
// endpoint. It is closed by Close; do not close it yourself.
func (e *Etcd) Client() *clientv3.Client { return e.client }

// NewClient returns a new client connected to every endpoint, with a no-op
// logger and DefaultDialTimeout, for code that should not share a client
// (one per simulated process). It is closed by Close, before the server.
// After Close it returns an error matching ErrClosed.
func (e *Etcd) NewClient() (*clientv3.Client, error) {
	if e.isClosed() { // fail fast: dialling stopped members would take DialTimeout
		return nil, fmt.Errorf("orchestratortest: new client: %w", ErrClosed)
	}
	cli, err := clientv3.New(etcdtest.ClientConfig(e.Endpoints()...))
	if err != nil {
		return nil, fmt.Errorf("orchestratortest: new client: %w", err)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		_ = cli.Close()
		return nil, fmt.Errorf("orchestratortest: new client: %w", ErrClosed)
	}
	e.clients = append(e.clients, cli)
	return cli, nil
}

// Compact compacts the key-value history at the current revision and returns
// that revision. Watches and reads from older revisions then fail with
// "mvcc: required revision has been compacted", which orchestrator workers
// must survive. Compacting twice at the same revision is not an error.
func (e *Etcd) Compact(ctx context.Context) (int64, error) {
	if e.isClosed() {
		return 0, fmt.Errorf("orchestratortest: compact: %w", ErrClosed)
	}
	rev, err := etcdtest.Compact(ctx, e.client)
	if err != nil {
		return 0, fmt.Errorf("orchestratortest: compact: %w", err)
	}
	return rev, nil
}

// RevokeLease revokes lease id, deleting every key attached to it, as etcd
// does when the lease's holder crashes and its TTL runs out (for example a
// concurrency.Session's Lease()). A lease that does not exist any more is not
// an error.
func (e *Etcd) RevokeLease(ctx context.Context, id clientv3.LeaseID) error {
	if e.isClosed() {
		return fmt.Errorf("orchestratortest: revoke lease %x: %w", int64(id), ErrClosed)
	}
	if err := etcdtest.RevokeLease(ctx, e.client, id); err != nil {
		return fmt.Errorf("orchestratortest: revoke lease %x: %w", int64(id), err)
	}
	return nil
}

// isClosed reports whether Close has begun.
func (e *Etcd) isClosed() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.closed
}

// Close closes every client made by the kit, stops the members and removes
// the data directory unless it was given with WithDir. It is idempotent.
// Close clients you made yourself first: etcd waits several seconds for
// streams (watches, lease keep-alives) that are still open when it stops.
func (e *Etcd) Close() error {
	e.closeOnce.Do(func() {
		e.mu.Lock()
		clients := e.clients
		e.clients = nil
		e.closed = true
		e.mu.Unlock()
		for _, cli := range clients {
			_ = cli.Close() // a client the caller closed already reports it; nothing to do
		}
		if e.cluster != nil {
			e.cluster.Close()
		}
		if e.server != nil {
			e.server.Close()
		}
		if e.ownDir {
			if err := os.RemoveAll(e.dir); err != nil {
				e.closeErr = fmt.Errorf("orchestratortest: remove data: %w", err)
			}
		}
	})
	return e.closeErr
}
