package orchestrator

// The server matrix: the behaviours that depend on the etcd server, run
// against real servers of every release the README's version table lists,
// each a process of its own (internal/servers, etcdtest.StartProcess). One
// body per behaviour, the same helpers as the embedded-etcd tests, a list
// of releases. It runs with ORCHESTRATOR_SERVERS=all (make test-servers);
// make test skips it. leader's TestServerMatrix adds the leader failover.

import (
	"context"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// matrixLoadKeys is the size of the prefix BenchmarkServerLoad reads.
const matrixLoadKeys = 100_000

// serverCase is one behaviour of the matrix.
type serverCase struct {
	name  string
	flags []string // the server's flags (serverkit's)
	run   func(t *testing.T, srv *etcdtest.Process, release string)
}

// serverCases returns the behaviours the matrix runs against each server.
func serverCases() []serverCase {
	const authPrefix = "/matrix/auth"
	return []serverCase{
		{name: "bank: load, watch and commit", run: func(t *testing.T, srv *etcdtest.Process, _ string) {
			runBank(t, newTestEnv(t, onServer(srv)))
		}},
		{name: "progress notifications", run: func(t *testing.T, srv *etcdtest.Process, _ string) {
			env := newTestEnv(t, onServer(srv))
			requireProgressNotify(t, env)
			everyPutSeen(t, env)
		}},
		{name: "read path: load and compaction reload", run: func(t *testing.T, srv *etcdtest.Process, release string) {
			loadAndReload(t, newTestEnv(t, onServer(srv), withProxy()), &rpcCounter{}, releaseReadPath(release))
		}},
		{name: "outage: blackhole, then heal", run: func(t *testing.T, srv *etcdtest.Process, _ string) {
			bankOutages(t, newTestEnv(t, onServer(srv), withProxy()), "/matrix/outage", (*etcdtest.Proxy).Blackhole,
				time.Second, 2*time.Second)
		}},
		{name: "permission denied", flags: []string{"-bcrypt-cost=4"}, run: func(t *testing.T, srv *etcdtest.Process, _ string) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			permissionDenied(ctx, t, newTestEnv(t, onServer(srv), withAuth(authPrefix)), authPrefix)
		}},
		{name: "exactly once: dropped answers", run: func(t *testing.T, srv *etcdtest.Process, _ string) {
			scriptedUnknownOutcomes(t, newTestEnv(t, onServer(srv)))
		}},
		{name: "shared Source: a stuck worker", run: func(t *testing.T, srv *etcdtest.Process, _ string) {
			stuckWorkerOnSource(t, newTestEnv(t, onServer(srv)))
		}},
	}
}

// releaseReadPath is the path a worker reads the prefix with from a server
// of release: the stream from 3.7 on.
func releaseReadPath(release string) ReadPath {
	if release < "3.7" { // releases are "3.<digit>"
		return ReadPathFallback
	}
	return ReadPathStream
}

// TestServerMatrix runs serverCases against a fresh server of each release
// etcdtest.MatrixVersions selects.
func TestServerMatrix(t *testing.T) {
	for _, release := range etcdtest.MatrixVersions(t) {
		t.Run("etcd"+release, func(t *testing.T) {
			bin := etcdtest.ServerBinary(t, release)
			for _, c := range serverCases() {
				t.Run(c.name, func(t *testing.T) {
					c.run(t, etcdtest.StartProcess(t, bin, c.flags...), release)
				})
			}
		})
	}
}

// requireProgressNotify requires that env's server answers RequestProgress
// on a watch with a progress notification at its current revision.
func requireProgressNotify(t *testing.T, env *testEnv) {
	ctx := testContext(t)
	cli := env.cli
	put, err := cli.Put(ctx, "/matrix/progress/k", "v")
	require.NoError(t, err)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wch := cli.Watch(wctx, "/matrix/progress/", clientv3.WithPrefix(), clientv3.WithRev(put.Header.Revision),
		clientv3.WithProgressNotify())
	resp := <-wch // the put: the watch is synced
	require.NoError(t, resp.Err())
	require.Len(t, resp.Events, 1)
	require.NoError(t, cli.RequestProgress(ctx))
	for resp := range wch {
		require.NoError(t, resp.Err())
		if resp.IsProgressNotify() {
			require.GreaterOrEqual(t, resp.Header.Revision, put.Header.Revision)
			return
		}
	}
	t.Fatalf("no progress notification: %v", ctx.Err())
}

// BenchmarkServerLoad measures, once per release, the worker's first Tick
// on a prefix of matrixLoadKeys keys against the fastest raw read of the
// same keys on that server: a streaming range on 3.7, one unpaged range
// before. It runs with ORCHESTRATOR_SERVERS=all (make test-servers) and
// reports first-tick-ms, raw-ms and the ratio.
func BenchmarkServerLoad(b *testing.B) {
	for _, release := range etcdtest.MatrixVersions(b) {
		b.Run("etcd"+release, func(b *testing.B) {
			srv := etcdtest.StartProcess(b, etcdtest.ServerBinary(b, release))
			ctx := testContext(b)
			cli := srv.Client(b)
			const prefix = "/matrix/load"
			benchPopulate(ctx, b, cli, prefix, matrixLoadKeys)
			want := releaseReadPath(release)
			for range b.N {
				raw, tick := serverLoad(ctx, b, cli, prefix, want)
				b.ReportMetric(float64(tick.Microseconds())/1e3, "first-tick-ms")
				b.ReportMetric(float64(raw.Microseconds())/1e3, "raw-ms")
				b.ReportMetric(float64(tick)/float64(raw), "ratio")
			}
		})
	}
}

// serverLoad returns the time of the raw read of prefix and of a worker's
// first Tick on it, read with path. An untimed raw read goes first: the
// first read after the writes is slower, whoever makes it.
func serverLoad(ctx context.Context, b *testing.B, cli *clientv3.Client, prefix string, path ReadPath) (raw, tick time.Duration) {
	read := rawStreamGet
	if path == ReadPathFallback {
		read = rawUnpagedGet
	}
	read(ctx, b, cli, prefix)
	runtime.GC()
	start := time.Now()
	if n := len(read(ctx, b, cli, prefix)); n != matrixLoadKeys {
		b.Fatalf("the raw read got %d keys, want %d", n, matrixLoadKeys)
	}
	raw = time.Since(start)

	runtime.GC()
	var (
		first time.Time
		got   ReadPath
		w     *EtcdWorker
	)
	state := newMapState(prefix)
	w = newBenchWorker(b, cli, prefix, ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		first, got = time.Now(), w.Status().ReadPath
		return s, ErrReactorFinished
	}), state)
	start = time.Now()
	if err := w.Run(ctx, nil, time.Second, "server-load"); err != nil {
		b.Fatal(err)
	}
	if len(state.values) != matrixLoadKeys || got != path {
		b.Fatalf("the first Tick saw %d keys read with %q, want %d with %q", len(state.values), got, matrixLoadKeys, path)
	}
	return raw, first.Sub(start)
}
