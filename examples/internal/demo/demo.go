// Package demo holds what the example programs share: connecting to etcd
// (an embedded single-member etcd in a temporary directory unless endpoints
// are given), serving /metrics, and reading the orchestrator's metrics back.
package demo

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/internal/embedetcd"
)

// dialTimeout is the DialTimeout of every client.
const dialTimeout = 5 * time.Second

// Cluster is the etcd the example talks to, with the clients it made.
type Cluster struct {
	// Endpoints are the client URLs.
	Endpoints []string
	// Client is a client for general use, closed by Close.
	Client *clientv3.Client

	srv *embedetcd.Server // nil for an external cluster
	dir string

	mu      sync.Mutex
	clients []*clientv3.Client
}

// Connect connects to the comma-separated endpoints, or, when endpoints is
// empty, starts an embedded etcd on 127.0.0.1 with its data in a new
// temporary directory. The caller must Close the cluster.
func Connect(ctx context.Context, endpoints string) (c *Cluster, err error) {
	c = &Cluster{}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	if endpoints == "" {
		if c.dir, err = os.MkdirTemp("", "orchestrator-example-"); err != nil {
			return nil, err
		}
		if c.srv, err = embedetcd.Start(ctx, c.dir); err != nil {
			return nil, fmt.Errorf("start embedded etcd: %w", err)
		}
		c.Endpoints = c.srv.Endpoints()
	} else {
		for _, e := range strings.Split(endpoints, ",") {
			if e = strings.TrimSpace(e); e != "" {
				c.Endpoints = append(c.Endpoints, e)
			}
		}
	}
	if c.Client, err = c.NewClient(); err != nil {
		return nil, err
	}
	// Fail early when the cluster is unreachable.
	sctx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	if _, err = c.Client.Status(sctx, c.Endpoints[0]); err != nil {
		return nil, fmt.Errorf("etcd at %v: %w", c.Endpoints, err)
	}
	return c, nil
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

// NewClient returns another client for the cluster, closed by Close.
func (c *Cluster) NewClient() (*clientv3.Client, error) {
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   c.Endpoints,
		DialTimeout: dialTimeout,
		Logger:      zap.NewNop(),
	})
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
		return "", nil, fmt.Errorf("metrics: %w", err)
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

// IsStop reports whether err is how Run reports that ctx ended it normally:
// ctx is done, err matches it, and no commit was left unresolved.
func IsStop(ctx context.Context, err error) bool {
	if ctx.Err() == nil || errors.Is(err, orchestrator.ErrCommitUnresolved) {
		return false
	}
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// Main runs a demo until it ends or SIGINT/SIGTERM and returns the process
// exit code: 0 when run reports that the invariants held, 1 otherwise (an
// error is printed with the demo's name). A second Ctrl-C kills the process.
func Main(name string, run func(ctx context.Context) (bool, error)) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		stop()
	}()
	ok, err := run(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, name+":", err)
		return 1
	}
	if !ok {
		return 1
	}
	return 0
}

// Env is what a demo runs on: a cluster and a fresh metrics registry, served
// over HTTP when an address was given.
type Env struct {
	*Cluster
	Registry    *prometheus.Registry
	MetricsURL  string // empty when metrics are not served
	stopMetrics func()
}

// Setup connects to endpoints (see Connect) and serves a new registry's
// metrics at metricsAddr (see ServeMetrics). The caller must Close the Env.
func Setup(ctx context.Context, endpoints, metricsAddr string) (*Env, error) {
	cluster, err := Connect(ctx, endpoints)
	if err != nil {
		return nil, err
	}
	env := &Env{Cluster: cluster, Registry: prometheus.NewRegistry()}
	env.MetricsURL, env.stopMetrics, err = ServeMetrics(ctx, metricsAddr, env.Registry)
	if err != nil {
		cluster.Close()
		return nil, err
	}
	return env, nil
}

// Close stops serving metrics and closes the cluster.
func (e *Env) Close() {
	e.stopMetrics()
	e.Cluster.Close()
}
