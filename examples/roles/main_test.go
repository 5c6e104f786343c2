package main

import (
	"context"
	"io"
	"testing"
	"time"

	"github.com/etcdworker/orchestrator/examples/internal/demotest"
)

func TestMain(m *testing.M) {
	demotest.Main(m)
}

// TestRun runs the demo on an embedded etcd: every task is done exactly
// once, and everything is torn down (goleak).
func TestRun(t *testing.T) {
	demotest.RequireRun(t, "tasks done: 30 of 30, left to do: 0 (OK)\n", func(ctx context.Context, out io.Writer) (bool, error) {
		return run(ctx, config{prefix: "/roles-test", tasks: 30, captures: 3, timeout: 30 * time.Second,
			interval: 2 * time.Millisecond}, out)
	})
}

// TestBadFlagIsOneLineNamingIt: a bad flag prints one line naming it and
// exits 2.
func TestBadFlagIsOneLineNamingIt(t *testing.T) {
	demotest.RequireBadInputs(t, runMain, []demotest.BadInput{
		{Args: []string{"--captures", "0"}, WantCode: 2, WantErr: "--captures"},
	})
}

// TestRunWithATrailingSlashPrefix: --prefix "/roles-slash/" names the keys
// of "/roles-slash", as it does for the library (util.NormalizePrefix). run
// built the keys it writes by hand from the flag as given, so the tasks went
// under "/roles-slash//task/", no worker saw one, and the demo timed out.
func TestRunWithATrailingSlashPrefix(t *testing.T) {
	demotest.RequireRun(t, "tasks done: 30 of 30, left to do: 0 (OK)\n", func(ctx context.Context, out io.Writer) (bool, error) {
		return run(ctx, config{prefix: "/roles-slash/", tasks: 30, captures: 3, timeout: 10 * time.Second,
			interval: 2 * time.Millisecond}, out)
	})
}
