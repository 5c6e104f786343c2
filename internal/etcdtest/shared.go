package etcdtest

import (
	"context"
	"fmt"
	"os"
	"slices"
	"sync"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"

	"github.com/etcdworker/orchestrator/internal/embedetcd"
)

// The shared servers: one embedded etcd per test binary, started at the
// first Shared call and stopped by Main after every test ran. Tests that
// inject no fault into the server use it, each under its own key prefix, and
// may run in parallel; a test that needs compaction, an alarm or auth starts
// its own with NewServer. Tests that need the same server options (a request
// size limit) share one such server as well: SharedWith, by name.
//
// With -count=N each repetition of the tests gets fresh servers (a test
// name seen again with a new testing.T starts the next repetition; the
// testing package finishes one before it begins the next), so that no test
// finds keys its previous run left.
var shared struct {
	mu      sync.Mutex
	servers map[string]*sharedServer // by name ("" is Shared's)
	retired []*Server
	dir     string
}

// sharedServer is one shared server and the tests of the current
// repetition that use it.
type sharedServer struct {
	srv  *Server
	seen map[string]testing.TB // test name -> its T in the current repetition
}

// Shared returns the test binary's shared server, starting it on first use.
// It must not be compacted, reconfigured or stopped: Compact and Close on it
// fail the test. Its Revision moves with every test's writes, so tests on it
// compare keys, never the global revision. Use it only from a package whose
// TestMain calls Main.
func Shared(t testing.TB) *Server {
	t.Helper()
	return SharedWith(t, "")
}

// SharedWith is Shared for the tests that need a server with opts: the
// server named name, started with opts on first use. Every caller with the
// same name must pass the same options; a name is not Shared's ("").
func SharedWith(t testing.TB, name string, opts ...ServerOption) *Server {
	t.Helper()
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if shared.servers == nil {
		shared.servers = map[string]*sharedServer{}
	}
	ss := shared.servers[name]
	if ss == nil {
		ss = &sharedServer{}
		shared.servers[name] = ss
	}
	if ss.seen == nil {
		ss.seen = map[string]testing.TB{}
	}
	if prev, ok := ss.seen[t.Name()]; ok && prev != t && ss.srv != nil {
		shared.retired = append(shared.retired, ss.srv)
		ss.srv, ss.seen = nil, map[string]testing.TB{}
	}
	ss.seen[t.Name()] = t
	if ss.srv == nil {
		srv, err := startShared(opts)
		if err != nil {
			t.Fatalf("etcdtest: start the shared server %q: %v", name, err)
		}
		ss.srv = srv
	}
	return ss.srv
}

func startShared(opts []ServerOption) (*Server, error) {
	if shared.dir == "" {
		dir, err := os.MkdirTemp("", "etcdtest-shared-")
		if err != nil {
			return nil, err
		}
		shared.dir = dir
	}
	dir, err := os.MkdirTemp(shared.dir, "server-")
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), embedetcd.DefaultReadyTimeout)
	defer cancel()
	srv, err := embedetcd.Start(ctx, dir, opts...)
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
	for _, ss := range shared.servers {
		if ss.srv != nil {
			shared.retired = append(shared.retired, ss.srv)
		}
	}
	for _, s := range shared.retired {
		s.srv.Close()
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

// isShared reports whether any of endpoints is a shared server's.
func isShared(endpoints []string) bool {
	shared.mu.Lock()
	defer shared.mu.Unlock()
	for _, ss := range shared.servers {
		if ss.srv == nil {
			continue
		}
		for _, e := range endpoints {
			if slices.Contains(ss.srv.Endpoints(), e) {
				return true
			}
		}
	}
	return false
}
