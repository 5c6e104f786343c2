package main

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/etcdworker/orchestrator/examples/internal/demotest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestRun runs the demo on an embedded etcd: every task is done exactly
// once, and everything is torn down (goleak).
func TestRun(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out demotest.Buffer
	ok, err := run(ctx, config{prefix: "/roles-test", tasks: 30, captures: 3, timeout: 30 * time.Second,
		interval: 2 * time.Millisecond}, &out)
	require.NoError(t, err)
	require.True(t, ok, out.String())
	require.Contains(t, out.String(), "tasks done: 30 of 30, left to do: 0 (OK)\n")
}

// TestBadFlagIsOneLineNamingIt: a bad flag prints one line naming it and
// exits 2.
func TestBadFlagIsOneLineNamingIt(t *testing.T) {
	var stdout, stderr demotest.Buffer
	require.Equal(t, 2, runMain([]string{"--captures", "0"}, &stdout, &stderr))
	require.Contains(t, stderr.String(), "--captures")
}
