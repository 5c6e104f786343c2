package orchestrator

// The one way a test gets an etcd and its clients: newTestEnv. By default
// the package's shared server (etcdtest.Shared), which tests that inject no
// fault into the server use, each under its own prefix; sharedWith names a
// shared server with options (a request size limit) that the tests naming it
// share alike; ownServer starts one for the test alone (compaction, auth, a
// global revision nobody else moves);
// onServer takes one the test started (a process of the server matrix, a
// cluster). withProxy puts a fault proxy in front of it for the workers'
// clients, withAuth turns authentication on.

import (
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// testEnv is the etcd a test runs against and its ways in.
type testEnv struct {
	// target is the server (or cluster) the clients reach.
	target etcdtest.Target
	// srv is target when it is an embedded server (the shared one or the
	// test's own, or one given to onServer), for its revision and
	// compaction; nil for a process or a cluster.
	srv *etcdtest.Server
	// cli is a client straight to the server (root's with withAuth), for
	// the test's own reads and writes and for compactions.
	cli *clientv3.Client
	// proxy is, with withProxy, a fault proxy in front of the server that
	// the clients of client and userClient go through; nil otherwise.
	proxy *etcdtest.Proxy
	// reg is a metrics registry of the test's own.
	reg *prometheus.Registry
}

// envConfig is what the envOptions of newTestEnv chose.
type envConfig struct {
	own          bool
	sharedName   string
	serverOpts   []etcdtest.ServerOption
	target       etcdtest.Target
	proxy        bool
	auth         bool
	authPrefixes []string
}

// envOption configures newTestEnv.
type envOption func(*envConfig)

// ownServer starts a server for the test alone, with opts (default: the
// shared server).
func ownServer(opts ...etcdtest.ServerOption) envOption {
	return func(c *envConfig) { c.own, c.serverOpts = true, append(c.serverOpts, opts...) }
}

// sharedWith runs the test on the shared server named name, which the
// first test naming it starts with opts (etcdtest.SharedWith): every test
// naming it must pass the same opts.
func sharedWith(name string, opts ...etcdtest.ServerOption) envOption {
	return func(c *envConfig) { c.sharedName, c.serverOpts = name, append(c.serverOpts, opts...) }
}

// withMaxTxnOps runs the test on the shared server whose --max-txn-ops is n.
func withMaxTxnOps(n uint) envOption {
	return sharedWith(fmt.Sprintf("max-txn-ops=%d", n), etcdtest.WithMaxTxnOps(n))
}

// withMaxRequestBytes runs the test on the shared server whose
// --max-request-bytes is n.
func withMaxRequestBytes(n uint) envOption {
	return sharedWith(fmt.Sprintf("max-request-bytes=%d", n), etcdtest.WithMaxRequestBytes(n))
}

// onServer runs the test against srv, a server or cluster the test started
// (default: the shared server).
func onServer(srv etcdtest.Target) envOption {
	return func(c *envConfig) { c.target = srv }
}

// withProxy puts a fault proxy (etcdtest.Proxy) in front of the server: the
// clients of client and userClient go through it, cli does not.
func withProxy() envOption {
	return func(c *envConfig) { c.proxy = true }
}

// withAuth adds users and roles and enables authentication: "root"
// (password "rootpw"), whose client cli is, "reader-writer" (roles "r" and
// "w": read, and write, on prefixes + "/") and "nobody" (no rights), both
// with password "pw". It needs ownServer (whose bcrypt cost it lowers: the
// tests authenticate often) or onServer.
func withAuth(prefixes ...string) envOption {
	return func(c *envConfig) { c.auth, c.authPrefixes = true, prefixes }
}

// newTestEnv returns the etcd the options choose (default: the shared
// server) and its clients, all closed by t.Cleanup.
func newTestEnv(t testing.TB, opts ...envOption) *testEnv {
	t.Helper()
	var c envConfig
	for _, o := range opts {
		o(&c)
	}
	env := &testEnv{reg: prometheus.NewRegistry()}
	switch {
	case c.target != nil:
		env.target = c.target
		env.srv, _ = c.target.(*etcdtest.Server)
	case c.own:
		if c.auth {
			c.serverOpts = append(c.serverOpts, etcdtest.WithEmbedConfig(func(cfg *embed.Config) {
				cfg.BcryptCost = 4 // the minimum
			}))
		}
		env.srv = etcdtest.NewServer(t, c.serverOpts...)
		env.target = env.srv
	default:
		if c.auth {
			t.Fatal("withAuth on the shared server: use ownServer")
		}
		env.srv = etcdtest.SharedWith(t, c.sharedName, c.serverOpts...)
		env.target = env.srv
	}
	if c.proxy {
		env.proxy = etcdtest.NewProxy(t, env.target.Endpoints()[0])
	}
	if c.auth {
		enableAuth(t, env.target.Client(t), c.authPrefixes)
		cfg := etcdtest.ClientConfig(env.target.Endpoints()...)
		cfg.Username, cfg.Password = "root", "rootpw"
		env.cli = etcdtest.NewClientFromConfig(t, cfg)
	} else {
		env.cli = env.target.Client(t)
	}
	return env
}

// enableAuth adds the users and roles withAuth describes through cli and
// enables authentication.
func enableAuth(t testing.TB, cli *clientv3.Client, prefixes []string) {
	t.Helper()
	dirs := make([]string, len(prefixes))
	for i, p := range prefixes {
		dirs[i] = p + "/"
	}
	require.NoError(t, etcdtest.EnableAuth(contextWithin(t, 10*time.Second), cli, "rootpw",
		[]etcdtest.AuthRole{
			{Name: "r", Perm: clientv3.PermissionType(clientv3.PermRead), Prefixes: dirs},
			{Name: "w", Perm: clientv3.PermissionType(clientv3.PermWrite), Prefixes: dirs},
		},
		[]etcdtest.AuthUser{{Name: "reader-writer", Password: "pw", Roles: []string{"r", "w"}}, {Name: "nobody", Password: "pw"}}))
}

// clientConfig is the configuration of env's clients: through the proxy if
// there is one, else straight to the server; gRPC reconnects quickly after
// an outage (its default back-off grows to minutes), which keeps the fault
// tests short. extra dial options come last.
func (e *testEnv) clientConfig(extra ...grpc.DialOption) clientv3.Config {
	endpoints := e.target.Endpoints()
	if e.proxy != nil {
		endpoints = []string{e.proxy.Endpoint()}
	}
	cfg := etcdtest.ClientConfig(endpoints...)
	cfg.DialOptions = append([]grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
		Backoff: grpcbackoff.Config{
			BaseDelay:  50 * time.Millisecond,
			Multiplier: 1.6,
			Jitter:     0.2,
			MaxDelay:   500 * time.Millisecond,
		},
		MinConnectTimeout: time.Second,
	})}, extra...)
	return cfg
}

// client returns a new client with clientConfig(extra...), closed by
// t.Cleanup: the client a worker (or a Source) of the test runs on.
func (e *testEnv) client(t testing.TB, extra ...grpc.DialOption) *clientv3.Client {
	t.Helper()
	return etcdtest.NewClientFromConfig(t, e.clientConfig(extra...))
}

// userClient is client logged in as user (see withAuth).
func (e *testEnv) userClient(t testing.TB, user, password string) *clientv3.Client {
	t.Helper()
	cfg := e.clientConfig()
	cfg.Username, cfg.Password = user, password
	return etcdtest.NewClientFromConfig(t, cfg)
}

// sharedClient returns a new client of the package's shared server,
// closed by t.Cleanup: newTestEnv(t).cli.
func sharedClient(t testing.TB) *clientv3.Client {
	t.Helper()
	return newTestEnv(t).cli
}
