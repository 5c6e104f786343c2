package main

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestRun runs the demo briefly on an embedded etcd with two forced leader
// changes: the log must match the counter and everything must be torn down
// (goleak).
func TestRun(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ok, err := run(ctx, config{
		prefix:      "/leader-test",
		controllers: 3,
		duration:    2 * time.Second,
		killAfter:   700 * time.Millisecond,
		interval:    20 * time.Millisecond,
		ttl:         5,
		metricsAddr: "127.0.0.1:0",
	})
	require.NoError(t, err)
	require.True(t, ok)
}
