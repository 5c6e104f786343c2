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

// TestRun runs the demo briefly on an embedded etcd: the invariant must
// hold and everything must be torn down (goleak).
func TestRun(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ok, err := run(ctx, config{
		prefix:      "/bank-test",
		workers:     3,
		accounts:    5,
		perTick:     3,
		duration:    time.Second,
		interval:    2 * time.Millisecond,
		metricsAddr: "127.0.0.1:0",
	})
	require.NoError(t, err)
	require.True(t, ok)
}
