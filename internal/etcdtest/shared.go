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
// fault into the server use it, each under its own key prefix, and may run
// in parallel; a test that needs server options, compaction, an alarm or
// auth starts its own with NewServer.
//
// With -count=N each repetition of the tests gets a fresh server (a test
// name seen again with a new testing.T starts the next repetition; the
// testing package finishes one before it begins the next), so that no test finds keys
// its previous run left.
var shared struct {
	mu      sync.Mutex
	srv     *Server
	retired []*Server
	seen    map[string]testing.TB // test name -> its T in the current repetition
	dir     string
}

// sharedSrv is shared.srv for readers that do not hold shared.mu.
var sharedSrv atomic.Pointer[Server]

// Shared returns the test binary's shared server, starting it on first use.
// It must not be compacted, reconfigured or stopped: Compact and Close on it
// fail the test. Its Revision moves with every test's writes, so tests on it
// compare keys, never the global revision. Use it only from a package whose
// TestMain calls Main.
func Shared(t testing.TB) *Server {
	t.Helper()
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if shared.seen == nil {
		shared.seen = map[string]testing.TB{}
	}
	if prev, ok := shared.seen[t.Name()]; ok && prev != t && shared.srv != nil {
		shared.retired = append(shared.retired, shared.srv)
		shared.srv, shared.seen = nil, map[string]testing.TB{}
	}
	shared.seen[t.Name()] = t
	if shared.srv == nil {
		srv, err := startShared()
		if err != nil {
			t.Fatalf("etcdtest: start the shared server: %v", err)
		}
		shared.srv = srv
		sharedSrv.Store(srv)
	}
	return shared.srv
}

func startShared() (*Server, error) {
	if shared.dir == "" {
		dir, err := os.MkdirTemp("", "etcdtest-shared-")
		if err != nil {
			return nil, err
		}
		shared.dir = dir
	}
	dir, err := os.MkdirTemp(shared.dir, "count-")
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), embedetcd.DefaultReadyTimeout)
	defer cancel()
	srv, err := embedetcd.Start(ctx, dir)
	if err != nil {
		return nil, err
	}
	return &Server{srv: srv, shared: true}, nil
}

// SharedClient returns a new client of the shared server, closed by
// t.Cleanup.
func SharedClient(t testing.TB) *clientv3.Client {
	t.Helper()
	return Shared(t).Client(t)
}

// Main runs the package's tests (m.Run), stops the shared servers, then
// checks for leaked goroutines with goleak (opts as for goleak.Find) and
// exits. Use it as TestMain's only call.
func Main(m *testing.M, opts ...goleak.Option) {
	code := m.Run()
	shared.mu.Lock()
	for _, s := range append(shared.retired, shared.srv) {
		if s != nil {
			s.srv.Close()
		}
	}
	if shared.dir != "" {
		_ = os.RemoveAll(shared.dir)
	}
	shared.mu.Unlock()
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
