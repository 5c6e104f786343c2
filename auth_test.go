package orchestrator

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"google.golang.org/grpc"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// i10Prompt bounds how long Run may take to return after a permanent
// rejection.
const i10Prompt = 5 * time.Second

// i10AuthEnv is an etcd server with authentication on: a root client and
// users "reader-writer" (roles "r" and "w": read, and write, on the
// prefixes granted) and "nobody" (no rights).
type i10AuthEnv struct {
	srv  *etcdtest.Server
	root *clientv3.Client
}

func i10NewAuthEnv(t *testing.T, prefixes ...string) *i10AuthEnv {
	t.Helper()
	srv := etcdtest.NewServer(t, etcdtest.WithEmbedConfig(func(cfg *embed.Config) {
		cfg.BcryptCost = 4 // the minimum: the test authenticates often
	}))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cli := srv.Client(t)
	must := func(_ any, err error) { t.Helper(); require.NoError(t, err) }
	must(cli.UserAdd(ctx, "root", "rootpw"))
	must(cli.UserGrantRole(ctx, "root", "root"))
	must(cli.RoleAdd(ctx, "r"))
	must(cli.RoleAdd(ctx, "w"))
	for _, p := range prefixes {
		must(cli.RoleGrantPermission(ctx, "r", p+"/", clientv3.GetPrefixRangeEnd(p+"/"), clientv3.PermissionType(clientv3.PermRead)))
		must(cli.RoleGrantPermission(ctx, "w", p+"/", clientv3.GetPrefixRangeEnd(p+"/"), clientv3.PermissionType(clientv3.PermWrite)))
	}
	for _, u := range []string{"reader-writer", "nobody"} {
		must(cli.UserAdd(ctx, u, "pw"))
	}
	must(cli.UserGrantRole(ctx, "reader-writer", "r"))
	must(cli.UserGrantRole(ctx, "reader-writer", "w"))
	must(cli.AuthEnable(ctx))
	return &i10AuthEnv{srv: srv, root: i10UserClient(t, srv, "root", "rootpw")}
}

func i10UserClient(t *testing.T, srv *etcdtest.Server, user, password string) *clientv3.Client {
	t.Helper()
	cfg := etcdtest.ClientConfig(srv.Endpoints()...)
	cfg.Username, cfg.Password = user, password
	return etcdtest.NewClientFromConfig(t, cfg)
}

// i10RunAsync starts Run and returns its result channel.
func i10RunAsync(ctx context.Context, w *EtcdWorker, interval time.Duration) <-chan error {
	errc := make(chan error, 1)
	go func() { errc <- w.Run(ctx, nil, interval, "i10") }()
	return errc
}

// i10Returns waits for Run's result, failing if it takes longer than
// i10Prompt after since.
func i10Returns(t *testing.T, errc <-chan error, since time.Time) error {
	t.Helper()
	select {
	case err := <-errc:
		t.Logf("Run returned after %v: %v", time.Since(since), err)
		return err
	case <-time.After(time.Until(since.Add(i10Prompt))):
		t.Fatalf("Run did not return within %v", i10Prompt)
		return nil
	}
}

// i10Writer is a reactor that commits one increment of /n per Tick, as many
// times as writes says, and records the value of /n it sees.
type i10Writer struct {
	writes atomic.Int64 // increments still to emit
	seen   atomic.Int64 // value of /n the last Tick saw
}

func (x *i10Writer) Tick(_ context.Context, s ReactorState) (ReactorState, error) {
	st := s.(*mapState)
	x.seen.Store(st.int("/n"))
	if x.writes.Load() > 0 {
		x.writes.Add(-1)
		st.patches = append(st.patches, []DataPatch{incrPatch(st.key("/n"), 1)})
	}
	return st, nil
}

// TestPermanentErrorsEndRun: rejections that retrying cannot heal end Run
// promptly with an error matching ErrEtcdRejected and etcd's own error,
// whichever path meets them: the load (a user without rights), the watch
// or the head probe (read right revoked while running), a commit (write
// right revoked), or a closed client.
func TestPermanentErrorsEndRun(t *testing.T) {
	const prefix = "/i10/auth"
	env := i10NewAuthEnv(t, prefix)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	opts := []Option{WithMaxStaleness(time.Second), WithRequestTimeout(2 * time.Second)}

	t.Run("no rights: the load", func(t *testing.T) {
		w, err := NewEtcdWorker(i10UserClient(t, env.srv, "nobody", "pw"), prefix, &i10Writer{}, newMapState(prefix), opts...)
		require.NoError(t, err)
		err = i10Returns(t, i10RunAsync(ctx, w, 20*time.Millisecond), time.Now())
		require.ErrorIs(t, err, ErrEtcdRejected)
		require.ErrorIs(t, err, rpctypes.ErrPermissionDenied)
		require.Contains(t, err.Error(), "load")
	})
	for _, tc := range []struct {
		name, role, path string
	}{
		{"read revoked: the watch or probe", "r", "probe|watch"},
		{"write revoked: the commit", "w", "commit"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			i10RevokedCase(ctx, t, env, prefix, tc.role, tc.path, opts)
		})
	}
	t.Run("closed client", func(t *testing.T) { i10ClosedClientCase(ctx, t, env, prefix) })
	t.Run("closed client during a commit", func(t *testing.T) { i10ClosedDuringCommitCase(ctx, t, env, prefix) })
}

// i10RevokedCase runs a worker as reader-writer, lets it commit once, then
// revokes role and checks that Run ends promptly on the path named by the
// regexp path.
func i10RevokedCase(ctx context.Context, t *testing.T, env *i10AuthEnv, prefix, role, path string, opts []Option) {
	for _, granted := range []string{"r", "w"} { // back from an earlier case
		_, err := env.root.UserGrantRole(ctx, "reader-writer", granted)
		require.NoError(t, err)
	}
	r := &i10Writer{}
	w, err := NewEtcdWorker(i10UserClient(t, env.srv, "reader-writer", "pw"), prefix, r, newMapState(prefix), opts...)
	require.NoError(t, err)
	errc := i10RunAsync(ctx, w, 20*time.Millisecond)
	// One commit first, so the run has its token and lease.
	before := r.seen.Load()
	r.writes.Store(1)
	require.Eventually(t, func() bool { return r.seen.Load() > before }, 5*time.Second, 10*time.Millisecond)

	// Another client keeps the watch busy: the worker must find out
	// even though its watch is never silent.
	busyCtx, stopBusy := context.WithCancel(ctx)
	busyDone := make(chan struct{})
	defer func() { stopBusy(); <-busyDone }()
	go func() {
		defer close(busyDone)
		for busyCtx.Err() == nil {
			_, _ = env.root.Put(busyCtx, prefix+"/busy", time.Now().String())
			time.Sleep(30 * time.Millisecond)
		}
	}()
	start := time.Now()
	_, err = env.root.UserRevokeRole(ctx, "reader-writer", role)
	require.NoError(t, err)
	if role == "w" {
		r.writes.Store(1)
	}
	err = i10Returns(t, errc, start)
	require.ErrorIs(t, err, ErrEtcdRejected)
	require.ErrorIs(t, err, rpctypes.ErrPermissionDenied)
	require.Regexp(t, path, err.Error())
	require.Less(t, time.Since(start), 2*time.Second, "the probe runs every 250ms")
}

// i10ClosedClientCase closes the worker's client before Run and while it
// runs (default request timeout: Run must not wait for it).
func i10ClosedClientCase(ctx context.Context, t *testing.T, env *i10AuthEnv, prefix string) {
	for _, whileRunning := range []bool{false, true} {
		cli := i10UserClient(t, env.srv, "root", "rootpw")
		w, err := NewEtcdWorker(cli, prefix, &i10Writer{}, newMapState(prefix))
		require.NoError(t, err)
		var errc <-chan error
		if whileRunning {
			errc = i10RunAsync(ctx, w, 20*time.Millisecond)
			time.Sleep(100 * time.Millisecond) // fault timing: close while it loads and starts its watch
		}
		start := time.Now()
		require.NoError(t, cli.Close())
		if !whileRunning {
			errc = i10RunAsync(ctx, w, 20*time.Millisecond)
		}
		err = i10Returns(t, errc, start)
		require.ErrorIs(t, err, ErrEtcdRejected, "while running: %v", whileRunning)
		require.Less(t, time.Since(start), time.Second, "while running: %v", whileRunning)
	}
}

// i10ClosedDuringCommitCase closes the worker's client while a commit Txn
// is in flight: the outcome is unknown.
func i10ClosedDuringCommitCase(ctx context.Context, t *testing.T, env *i10AuthEnv, prefix string) {
	hold := make(chan struct{})
	var holding atomic.Bool
	cfg := etcdtest.ClientConfig(env.srv.Endpoints()...)
	cfg.Username, cfg.Password = "root", "rootpw"
	cfg.DialOptions = []grpc.DialOption{grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string,
		req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption,
	) error {
		if tr, ok := req.(*etcdserverpb.TxnRequest); ok && len(tr.Compare) > 1 && holding.CompareAndSwap(false, true) {
			hold <- struct{}{} // the commit is in flight ...
			<-hold             // ... until the client is closed
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	})}
	cli := etcdtest.NewClientFromConfig(t, cfg)
	r := &i10Writer{}
	r.writes.Store(1000)
	w, err := NewEtcdWorker(cli, prefix, r, newMapState(prefix))
	require.NoError(t, err)
	errc := i10RunAsync(ctx, w, 20*time.Millisecond)
	select {
	case <-hold:
	case <-time.After(5 * time.Second):
		t.Fatal("no commit started")
	}
	start := time.Now()
	require.NoError(t, cli.Close())
	hold <- struct{}{}
	err = i10Returns(t, errc, start)
	require.ErrorIs(t, err, ErrEtcdRejected)
	require.ErrorIs(t, err, ErrCommitUnresolved, "a commit cut by Close may or may not have landed")
	require.Less(t, time.Since(start), time.Second)
}
