package demo

import (
	"context"
	"io"
	"net/http"
	"os"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestConnectEmbedded(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := Connect(ctx, ConnConfig{})
	require.NoError(t, err)
	require.True(t, c.Embedded())
	dir := c.dir
	_, err = c.Client.Put(ctx, "/k", "v")
	require.NoError(t, err)
	other, err := c.NewClient()
	require.NoError(t, err)
	resp, err := other.Get(ctx, "/k")
	require.NoError(t, err)
	require.Len(t, resp.Kvs, 1)

	// An external cluster is just endpoints.
	ext, err := Connect(ctx, ConnConfig{Endpoints: " " + c.Endpoints[0] + ", "})
	require.NoError(t, err)
	require.False(t, ext.Embedded())
	require.Equal(t, c.Endpoints, ext.Endpoints)
	ext.Close()

	c.Close()
	c.Close()
	_, err = os.Stat(dir)
	require.True(t, os.IsNotExist(err), "the data directory is removed")
}

func TestServeMetricsAndSum(t *testing.T) {
	reg := prometheus.NewRegistry()
	commits := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "orchestrator_commits_total", Help: "h"}, []string{"role"})
	reg.MustRegister(commits)
	commits.WithLabelValues("a").Add(2)
	commits.WithLabelValues("b").Add(3)
	require.Equal(t, 5.0, Sum(reg, "orchestrator_commits_total"))
	require.Equal(t, map[string]float64{"": 5, "a": 2, "b": 3}, SumBy(reg, "orchestrator_commits_total"))
	require.Zero(t, Sum(reg, "absent"))

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	url, stop, err := ServeMetrics(ctx, "", reg)
	require.NoError(t, err)
	require.Empty(t, url)
	stop()

	url, stop, err = ServeMetrics(ctx, "127.0.0.1:0", reg)
	require.NoError(t, err)
	defer stop()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, http.NoBody)
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, resp.Body.Close())
	require.NoError(t, err)
	require.Contains(t, string(body), `orchestrator_commits_total{role="b"} 3`)
	http.DefaultClient.CloseIdleConnections()
}
