package etcdtest

import (
	"context"
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"

	"github.com/etcdworker/orchestrator/internal/embedetcd"
)

// The shared server: one embedded etcd per test binary, started at the first
// Shared call and stopped by Main after every test ran. Tests that inject no
// fault use it, each under its own key prefix, and may run in parallel; a
// test that needs server options, a proxy, compaction, an alarm or auth
// starts its own with NewServer.
var shared struct {
	once sync.Once
	srv  *Server
	dir  string
	err  error
}

// sharedSrv is shared.srv for readers that do not go through shared.once.
var sharedSrv atomic.Pointer[Server]

// Shared returns the test binary's shared server (starting it on first use).
// It must not be compacted, reconfigured or stopped: Compact and Close on it
// fail the test. Its Revision moves with every test's writes, so tests on it
// compare keys, never the global revision. Use it only from a package whose
// TestMain calls Main.
func Shared(t testing.TB) *Server {
	t.Helper()
	shared.once.Do(func() {
		dir, err := os.MkdirTemp("", "etcdtest-shared-")
		if err != nil {
			shared.err = err
			return
		}
		shared.dir = dir
		ctx, cancel := context.WithTimeout(context.Background(), embedetcd.DefaultReadyTimeout)
		defer cancel()
		srv, err := embedetcd.Start(ctx, dir)
		if err != nil {
			shared.err = err
			return
		}
		shared.srv = &Server{srv: srv, shared: true}
		sharedSrv.Store(shared.srv)
	})
	if shared.err != nil {
		t.Fatalf("etcdtest: start the shared server: %v", shared.err)
	}
	return shared.srv
}

// SharedClient returns a new client of the shared server, closed by
// t.Cleanup.
func SharedClient(t testing.TB) *clientv3.Client {
	t.Helper()
	return Shared(t).Client(t)
}

// Main runs the package's tests (m.Run), stops the shared server if one was
// started, then checks for leaked goroutines with goleak (opts as for
// goleak.Find) and exits. Use it as TestMain's only call.
func Main(m *testing.M, opts ...goleak.Option) {
	code := m.Run()
	if shared.srv != nil {
		shared.srv.srv.Close()
	}
	if shared.dir != "" {
		_ = os.RemoveAll(shared.dir)
	}
	if code == 0 {
		if err := goleak.Find(opts...); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: errors on successful test run: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// isShared reports whether any of endpoints is the shared server's.
func isShared(endpoints []string) bool {
	srv := sharedSrv.Load()
	if srv == nil {
		return false
	}
	for _, e := range endpoints {
		if slices.Contains(srv.Endpoints(), e) {
			return true
		}
	}
	return false
}
