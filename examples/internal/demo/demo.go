// Package demo holds what the example programs share: their command line
// (the connection flags --endpoints, --dial-timeout, --cacert, --cert, --key,
// --user and --password, one-line errors naming the flag at fault, --help),
// connecting to etcd (an embedded single-member etcd in a temporary
// directory unless endpoints are given), serving /metrics, and reading the
// orchestrator's metrics back.
package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/internal/embedetcd"
)

// Cluster is the etcd the example talks to, with the clients it made.
type Cluster struct {
	// Endpoints are the client URLs.
	Endpoints []string
	// Client is a client for general use, closed by Close.
	Client *clientv3.Client

	cfg clientv3.Config   // template of NewClient
	srv *embedetcd.Server // nil for an external cluster
	dir string

	mu      sync.Mutex
	clients []*clientv3.Client
}

// Connect connects to the etcd that conn describes, or, when conn has no
// endpoints, starts an embedded etcd on 127.0.0.1 with its data in a new
// temporary directory. It fails within conn's dial timeout when etcd does
// not answer; its errors are one line and name the flag at fault. On success
// the caller must Close the cluster; on error nothing is left behind.
func Connect(ctx context.Context, conn ConnConfig) (*Cluster, error) {
	cfg, err := conn.ClientConfig()
	if err != nil {
		return nil, err
	}
	c := &Cluster{cfg: cfg}
	if err := c.connect(ctx, conn); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// connect starts the embedded etcd if there is no endpoint, then makes the
// general client and checks that etcd answers.
func (c *Cluster) connect(ctx context.Context, conn ConnConfig) error {
	if len(c.cfg.Endpoints) == 0 {
		dir, err := os.MkdirTemp("", "orchestrator-example-")
		if err != nil {
			return err
		}
		c.dir = dir
		if c.srv, err = embedetcd.Start(ctx, c.dir); err != nil {
			return fmt.Errorf("start embedded etcd: %s", oneLine(err.Error()))
		}
		c.cfg.Endpoints = c.srv.Endpoints()
	}
	c.Endpoints = c.cfg.Endpoints
	cli, err := c.NewClient()
	if err == nil {
		// Fail early when the cluster is unreachable: the client may
		// connect lazily.
		sctx, cancel := context.WithTimeout(ctx, c.cfg.DialTimeout)
		_, err = cli.Status(sctx, c.Endpoints[0])
		cancel()
	}
	if err != nil {
		return connectError(conn, c.cfg, err)
	}
	c.Client = cli
	return nil
}

// connectError names the flag most likely at fault for a failed connection.
func connectError(conn ConnConfig, cfg clientv3.Config, err error) error {
	msg := oneLine(err.Error())
	switch {
	case errors.Is(err, rpctypes.ErrAuthFailed) || errors.Is(err, rpctypes.ErrGRPCAuthFailed):
		return fmt.Errorf("--user/--password: %s", msg)
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled):
		return fmt.Errorf("--endpoints %s: etcd did not answer within --dial-timeout %v (%s)",
			conn.Endpoints, cfg.DialTimeout, msg)
	}
	return fmt.Errorf("--endpoints %s: %s", strings.Join(cfg.Endpoints, ","), msg)
}

// Embedded reports whether the cluster is the embedded etcd.
func (c *Cluster) Embedded() bool { return c.srv != nil }

// Describe says where etcd is, for the first output line.
func (c *Cluster) Describe() string {
	if c.Embedded() {
		return fmt.Sprintf("embedded etcd at %s (data in %s)", strings.Join(c.Endpoints, ","), c.dir)
	}
	return "etcd at " + strings.Join(c.Endpoints, ",")
}

// NewClient returns another client for the cluster, with the same TLS and
// credentials, closed by Close.
func (c *Cluster) NewClient() (*clientv3.Client, error) {
	cli, err := clientv3.New(c.cfg)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.clients = append(c.clients, cli)
	c.mu.Unlock()
	return cli, nil
}

// Close closes every client, then stops the embedded etcd and removes its
// directory. It is safe to call more than once.
func (c *Cluster) Close() {
	c.mu.Lock()
	clients := c.clients
	c.clients = nil
	c.mu.Unlock()
	// Clients first: etcd waits for open streams when it stops.
	for _, cli := range clients {
		_ = cli.Close()
	}
	if c.srv != nil {
		c.srv.Close()
		c.srv = nil
	}
	if c.dir != "" {
		_ = os.RemoveAll(c.dir)
		c.dir = ""
	}
}

// ServeMetrics serves the metrics of g at http://addr/metrics until the
// returned stop function is called, and returns that URL (with the actual
// port when addr asks for port 0). An empty addr serves nothing and returns
// an empty URL.
// The server's base context is ctx; stop shuts it down within two seconds
// even when ctx is done.
func ServeMetrics(ctx context.Context, addr string, g prometheus.Gatherer) (url string, stop func(), err error) {
	if addr == "" {
		return "", func() {}, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return "", nil, fmt.Errorf("--metrics-addr %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{}))
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			fmt.Fprintln(os.Stderr, "metrics server:", err)
		}
	}()
	return "http://" + ln.Addr().String() + "/metrics", func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		<-done
	}, nil
}

// Sum returns the sum over all label values of the counter or gauge family
// name in g (0 when absent).
func Sum(g prometheus.Gatherer, name string) float64 {
	return SumBy(g, name)[""]
}

// SumBy returns the values of the counter or gauge family name in g by role
// label, plus their total under "".
func SumBy(g prometheus.Gatherer, name string) map[string]float64 {
	out := map[string]float64{"": 0}
	families, err := g.Gather()
	if err != nil {
		return out
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			v := m.GetCounter().GetValue() + m.GetGauge().GetValue()
			role := ""
			for _, l := range m.GetLabel() {
				if l.GetName() == "role" {
					role = l.GetValue()
				}
			}
			if role != "" {
				out[role] += v
			}
			out[""] += v
		}
	}
	return out
}

// Env is what a demo runs on: a cluster and a fresh metrics registry, served
// over HTTP when an address was given.
type Env struct {
	*Cluster
	Registry    *prometheus.Registry
	MetricsURL  string // empty when metrics are not served
	stopMetrics func()
}

// Setup connects to etcd as conn says (see Connect) and serves a new
// registry's metrics at metricsAddr (see ServeMetrics), then prints to out
// the demo's first line, header followed by where etcd is, and the metrics
// URL when they are served. The caller must Close the Env.
func Setup(ctx context.Context, conn ConnConfig, metricsAddr string, out io.Writer, header string) (*Env, error) {
	cluster, err := Connect(ctx, conn)
	if err != nil {
		return nil, err
	}
	env := &Env{Cluster: cluster, Registry: prometheus.NewRegistry()}
	env.MetricsURL, env.stopMetrics, err = ServeMetrics(ctx, metricsAddr, env.Registry)
	if err != nil {
		cluster.Close()
		return nil, err
	}
	fmt.Fprintf(out, "%s, %s\n", header, cluster.Describe())
	if env.MetricsURL != "" {
		fmt.Fprintln(out, "metrics:", env.MetricsURL)
	}
	return env, nil
}

// Close stops serving metrics and closes the cluster.
func (e *Env) Close() {
	e.stopMetrics()
	e.Cluster.Close()
}
