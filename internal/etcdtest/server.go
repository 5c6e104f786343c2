// Package etcdtest is the test harness shared by the library's tests and
// benchmarks: embedded etcd servers and clusters on 127.0.0.1, etcd servers
// of other releases as processes of their own (ServerBinary, StartProcess),
// a fault-injecting TCP proxy, and small client helpers.
//
// Everything is bound to loopback ports, keeps its data in t.TempDir(), logs
// nothing by default and is torn down by t.Cleanup. Non-test programs should
// use internal/embedetcd, which does not import the testing package.
package etcdtest

import (
	"context"
	"errors"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/etcdworker/orchestrator/internal/embedetcd"
)

// ServerOption configures servers started by NewServer and NewCluster.
type ServerOption = embedetcd.Option

// WithMaxTxnOps sets etcd's maximum number of operations per transaction.
func WithMaxTxnOps(n uint) ServerOption { return embedetcd.WithMaxTxnOps(n) }

// WithMaxRequestBytes sets etcd's maximum client request size in bytes.
func WithMaxRequestBytes(n uint) ServerOption { return embedetcd.WithMaxRequestBytes(n) }

// WithQuotaBackendBytes sets etcd's backend quota; exceeding it raises the
// NOSPACE alarm and makes writes fail.
func WithQuotaBackendBytes(n int64) ServerOption { return embedetcd.WithQuotaBackendBytes(n) }

// WithLogger sends the server's logs to lg (default: only those that end the
// process, on standard error; etcd is very chatty). zaptest.NewLogger(t) is
// handy when debugging.
func WithLogger(lg *zap.Logger) ServerOption { return embedetcd.WithLogger(lg) }

// WithTiming sets the raft heartbeat interval and election timeout in
// milliseconds (defaults 50 and 500).
func WithTiming(tickMs, electionMs uint) ServerOption {
	return embedetcd.WithTiming(tickMs, electionMs)
}

// WithReadyTimeout bounds how long starting a member may take (default 30s).
func WithReadyTimeout(d time.Duration) ServerOption { return embedetcd.WithReadyTimeout(d) }

// WithFsync turns fsync of the WAL and backend on (default off, for speed).
func WithFsync(on bool) ServerOption { return embedetcd.WithFsync(on) }

// WithEmbedConfig lets fn adjust the embed.Config of each member before it
// starts.
func WithEmbedConfig(fn func(*embed.Config)) ServerOption { return embedetcd.WithEmbedConfig(fn) }

// opTimeout bounds individual harness operations (compaction, client dial...).
const opTimeout = 30 * time.Second

// Server is a single-member etcd cluster embedded in the test process.
type Server struct {
	srv    *embedetcd.Server
	shared bool // the binary's shared server (Shared): never compacted nor closed by a test
}

// NewServer starts a single embedded etcd member with its data in
// t.TempDir() and client and peer URLs on free 127.0.0.1 ports, waits until
// it is ready and registers its Close with t.Cleanup. The test fails if the
// server does not start within the ready timeout.
func NewServer(t testing.TB, opts ...ServerOption) *Server {
	t.Helper()
	o := embedetcd.ResolveOptions(opts...)
	ctx, cancel := context.WithTimeout(context.Background(), o.ReadyTimeout+10*time.Second)
	defer cancel()
	srv, err := embedetcd.Start(ctx, t.TempDir(), opts...)
	if err != nil {
		t.Fatalf("etcdtest: start server: %v", err)
	}
	s := &Server{srv: srv}
	t.Cleanup(s.Close)
	return s
}

// Endpoints returns the server's client URLs.
func (s *Server) Endpoints() []string { return s.srv.Endpoints() }

// Client returns a new client connected to the server; it is closed by
// t.Cleanup (before the server, since cleanups run last-in first-out).
func (s *Server) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	return NewClient(t, s.Endpoints()...)
}

// Close stops the server. It is idempotent and also run by t.Cleanup. Close
// clients first: etcd waits up to ~6s for open streams (watches, lease
// keep-alives) before dropping them.
func (s *Server) Close() {
	if s.shared {
		panic("etcdtest: Close on the shared server; it is stopped by Main")
	}
	s.srv.Close()
}

// Etcd returns the underlying embed.Etcd.
func (s *Server) Etcd() *embed.Etcd { return s.srv.Etcd() }

// Embedded returns the underlying embedetcd.Server.
func (s *Server) Embedded() *embedetcd.Server { return s.srv }

// Revision returns the server's current store revision.
func (s *Server) Revision() int64 { return s.srv.Revision() }

// Compact physically compacts the history up to rev and fails the test on
// error. Compacting an already compacted revision is not an error.
func (s *Server) Compact(t testing.TB, rev int64) {
	t.Helper()
	if s.shared {
		t.Fatalf("etcdtest: compacting the shared server; start one with NewServer")
	}
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	if err := s.srv.Compact(ctx, rev); err != nil {
		t.Fatalf("etcdtest: compact at %d: %v", rev, err)
	}
}

// CompactAll physically compacts at the current revision and returns it.
// It refuses the shared server.
func (s *Server) CompactAll(ctx context.Context) (int64, error) {
	if s.shared {
		return 0, errors.New("etcdtest: compacting the shared server; start one with NewServer")
	}
	return s.srv.CompactAll(ctx)
}
