package main

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator/examples/internal/demo"
	"github.com/etcdworker/orchestrator/examples/internal/demotest"
	"github.com/etcdworker/orchestrator/internal/etcdtest"
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

// TestRunRefusesAPrefixHoldingOtherKeys: the demo empties its prefix at the
// start, so a prefix holding a key outside the demo's folders (between,
// before or after them) is refused with an error naming the key, and nothing
// is deleted; keys of the demo's own folders (a previous run) are not in the
// way. --prefix / would otherwise have deleted every key under "/".
func TestRunRefusesAPrefixHoldingOtherKeys(t *testing.T) {
	srv := etcdtest.NewServer(t)
	cli := srv.Client(t)
	conn := demo.ConnConfig{Endpoints: strings.Join(srv.Endpoints(), ","), DialTimeout: 5 * time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), demotest.RunTimeout)
	defer cancel()
	for _, key := range []string{"/r/a", "/r/capture", "/r/d", "/r/tasks", "/r/zz", "/r/"} {
		_, err := cli.Put(ctx, key, "theirs")
		require.NoError(t, err)
		cfg := config{conn: conn, prefix: "/r", tasks: 3, captures: 1, timeout: 10 * time.Second, interval: 2 * time.Millisecond}
		var out demotest.Buffer
		_, err = run(ctx, cfg, &out)
		require.ErrorContains(t, err, "holds "+key+",", key)
		resp, err := cli.Get(ctx, key)
		require.NoError(t, err)
		require.Len(t, resp.Kvs, 1, "%s was deleted", key)
		_, err = cli.Delete(ctx, key)
		require.NoError(t, err)
	}
	for _, key := range []string{"/r/task/7", "/r/capture/c9/todo/7", "/r/__orchestrator/token"} {
		_, err := cli.Put(ctx, key, "")
		require.NoError(t, err)
	}
	ok, err := run(ctx, config{conn: conn, prefix: "/r", tasks: 3, captures: 1, timeout: 20 * time.Second,
		interval: 2 * time.Millisecond}, io.Discard)
	require.NoError(t, err)
	require.True(t, ok)
}
