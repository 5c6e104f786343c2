package etcdtest

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

func ctxT(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func mustPut(ctx context.Context, t *testing.T, cli *clientv3.Client, k, v string) *clientv3.PutResponse {
	t.Helper()
	resp, err := cli.Put(ctx, k, v)
	if err != nil {
		t.Fatalf("put %s: %v", k, err)
	}
	return resp
}

func mustGet(ctx context.Context, t *testing.T, cli *clientv3.Client, k string) string {
	t.Helper()
	resp, err := cli.Get(ctx, k)
	if err != nil {
		t.Fatalf("get %s: %v", k, err)
	}
	if len(resp.Kvs) != 1 {
		t.Fatalf("get %s: %d kvs", k, len(resp.Kvs))
	}
	return string(resp.Kvs[0].Value)
}

// eventually retries fn every 50ms until it succeeds or ctx is done.
func eventually(ctx context.Context, t *testing.T, what string, fn func(context.Context) error) {
	t.Helper()
	for {
		octx, cancel := context.WithTimeout(ctx, time.Second)
		err := fn(octx)
		cancel()
		if err == nil {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s: still failing: %v", what, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func TestServerThroughProxyPauseResume(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t, 60*time.Second)
	srv := NewServer(t)
	p := NewProxy(t, srv.Endpoints()[0])
	cli := NewClient(t, p.Endpoint())

	mustPut(ctx, t, cli, "k", "v1")
	if got := mustGet(ctx, t, cli, "k"); got != "v1" {
		t.Fatalf("got %q", got)
	}
	if p.Connections() < 1 || p.ActiveConnections() < 1 {
		t.Fatalf("connections: accepted %d active %d", p.Connections(), p.ActiveConnections())
	}

	p.Pause()
	gctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	_, err := cli.Get(gctx, "k")
	cancel()
	if err == nil {
		t.Fatal("Get through paused proxy succeeded")
	}
	if p.ActiveConnections() != 0 {
		t.Fatalf("active connections while paused: %d", p.ActiveConnections())
	}

	p.Resume()
	eventually(ctx, t, "get after resume", func(ctx context.Context) error {
		_, err := cli.Get(ctx, "k")
		return err
	})

	// Latency is added in both directions.
	p.SetDelay(100 * time.Millisecond)
	start := time.Now()
	mustGet(ctx, t, cli, "k")
	if el := time.Since(start); el < 200*time.Millisecond {
		t.Fatalf("Get with 2x100ms delay took %v", el)
	}
	p.SetDelay(0)

	// Blackhole stalls without closing; Resume delivers the stalled request.
	p.Blackhole()
	gctx, cancel = context.WithTimeout(ctx, 300*time.Millisecond)
	_, err = cli.Get(gctx, "k")
	cancel()
	if err == nil {
		t.Fatal("Get through blackholed proxy succeeded")
	}
	if p.ActiveConnections() == 0 {
		t.Fatal("blackhole closed the connections")
	}
	done := make(chan error, 1)
	go func() {
		_, err := cli.Put(ctx, "k", "v2")
		done <- err
	}()
	time.Sleep(100 * time.Millisecond) // fault timing: the put is stalled in the proxy
	p.Resume()
	if err := <-done; err != nil {
		t.Fatalf("put across blackhole+resume: %v", err)
	}
	if got := mustGet(ctx, t, cli, "k"); got != "v2" {
		t.Fatalf("got %q", got)
	}

	// CutFor resumes by itself.
	p.CutFor(200 * time.Millisecond)
	eventually(ctx, t, "get after CutFor", func(ctx context.Context) error {
		_, err := cli.Get(ctx, "k")
		return err
	})
	p.Close()
	p.Close() // idempotent
}

func TestCompactAll(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t, 30*time.Second)
	srv := NewServer(t)
	cli := srv.Client(t)

	old := mustPut(ctx, t, cli, "a", "1").Header.Revision
	mustPut(ctx, t, cli, "a", "2")
	rev, err := srv.CompactAll(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rev <= old {
		t.Fatalf("compacted at %d, old revision %d", rev, old)
	}
	if _, err := cli.Get(ctx, "a", clientv3.WithRev(old)); !errors.Is(err, rpctypes.ErrCompacted) {
		t.Fatalf("Get at compacted revision: %v", err)
	}
	// Compacting again at the same revision is fine, through either path.
	srv.Compact(t, rev)
	if r, err := Compact(ctx, cli); err != nil || r != rev {
		t.Fatalf("Compact via client: rev %d err %v", r, err)
	}
	mustPut(ctx, t, cli, "a", "3")
	r, err := Compact(ctx, cli)
	if err != nil || r != rev+1 {
		t.Fatalf("Compact via client: rev %d err %v", r, err)
	}
	if _, err := cli.Get(ctx, "a", clientv3.WithRev(rev)); !errors.Is(err, rpctypes.ErrCompacted) {
		t.Fatalf("Get at compacted revision: %v", err)
	}

	lease, err := cli.Grant(ctx, 60)
	if err != nil {
		t.Fatal(err)
	}
	if err := RevokeLease(ctx, cli, lease.ID); err != nil {
		t.Fatal(err)
	}
	if err := RevokeLease(ctx, cli, lease.ID); err != nil {
		t.Fatalf("revoking a revoked lease: %v", err)
	}
}

func TestServerOptions(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t, 30*time.Second)
	srv := NewServer(t, WithMaxTxnOps(2), WithMaxRequestBytes(64<<10))
	cli := srv.Client(t)
	ops := []clientv3.Op{clientv3.OpPut("a", "1"), clientv3.OpPut("b", "2"), clientv3.OpPut("c", "3")}
	if _, err := cli.Txn(ctx).Then(ops...).Commit(); !errors.Is(err, rpctypes.ErrTooManyOps) {
		t.Fatalf("txn with 3 ops: %v", err)
	}
	if _, err := cli.Txn(ctx).Then(ops[:2]...).Commit(); err != nil {
		t.Fatalf("txn with 2 ops: %v", err)
	}
	if _, err := cli.Put(ctx, "big", string(make([]byte, 100<<10))); !errors.Is(err, rpctypes.ErrRequestTooLarge) {
		t.Fatalf("100KiB put: %v", err)
	}
}

func TestClusterFailover(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t, 90*time.Second)
	c := NewCluster(t, 3)
	cli := c.Client(t)

	mustPut(ctx, t, cli, "k", "before")
	lead := c.Leader(t)
	start := time.Now()
	c.StopMember(t, lead)
	t.Logf("stopping leader %d took %v", lead, time.Since(start))
	if c.Member(lead).Running() || c.Member(lead).Etcd() != nil {
		t.Fatal("stopped member still running")
	}

	newLead := c.WaitLeader(t)
	if newLead == lead {
		t.Fatalf("leader still %d", lead)
	}
	eventually(ctx, t, "put after leader stop", func(ctx context.Context) error {
		_, err := cli.Put(ctx, "k", "after")
		return err
	})

	start = time.Now()
	c.RestartMember(t, lead)
	t.Logf("restarting member %d took %v", lead, time.Since(start))

	// The restarted member serves the latest data, through its own endpoint.
	one := NewClient(t, c.Member(lead).Endpoint())
	eventually(ctx, t, "read from restarted member", func(ctx context.Context) error {
		resp, err := one.Get(ctx, "k")
		if err != nil {
			return err
		}
		if len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "after" {
			return fmt.Errorf("got %v", resp.Kvs)
		}
		return nil
	})
	members, err := cli.MemberList(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(members.Members) != 3 {
		t.Fatalf("%d members", len(members.Members))
	}
	c.WaitLeader(t)
}

func TestClusterPeerPartition(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t, 60*time.Second)
	c := NewCluster(t, 3)
	cli := c.Client(t)
	mustPut(ctx, t, cli, "k", "1")

	// Cutting every peer proxy partitions all members from each other:
	// writes cannot commit.
	for i := range c.Size() {
		c.Member(i).PeerProxy().Pause()
	}
	pctx, cancel := context.WithTimeout(ctx, time.Second)
	_, err := cli.Put(pctx, "k", "2")
	cancel()
	if err == nil {
		t.Fatal("put committed without peer connectivity")
	}
	for i := range c.Size() {
		c.Member(i).PeerProxy().Resume()
	}
	c.WaitLeader(t)
	eventually(ctx, t, "put after partition healed", func(ctx context.Context) error {
		_, err := cli.Put(ctx, "k", "3")
		return err
	})
}

func TestSharedServerIsOneAndRefusesCompaction(t *testing.T) {
	t.Parallel()
	srv := Shared(t)
	if Shared(t) != srv {
		t.Fatal("two shared servers in one cycle")
	}
	ctx := ctxT(t, 10*time.Second)
	cli := SharedClient(t)
	mustPut(ctx, t, cli, "/shared-test/k", "v")
	if got := mustGet(ctx, t, srv.Client(t), "/shared-test/k"); got != "v" {
		t.Fatalf("got %q", got)
	}
	if _, err := Compact(ctx, cli); err == nil {
		t.Fatal("Compact through a client of the shared server succeeded")
	}
	if _, err := srv.CompactAll(ctx); err == nil {
		t.Fatal("CompactAll on the shared server succeeded")
	}

	// A named shared server: one per name, not the default one, and just as
	// shielded from compaction.
	limited := SharedWith(t, "small-requests", WithMaxRequestBytes(4<<10))
	if SharedWith(t, "small-requests", WithMaxRequestBytes(4<<10)) != limited || limited == srv {
		t.Fatal("SharedWith: want one server per name, apart from Shared's")
	}
	lcli := limited.Client(t)
	if _, err := lcli.Put(ctx, "/shared-test/big", string(make([]byte, 8<<10))); err == nil {
		t.Fatal("a put over the named server's request limit succeeded")
	}
	if _, err := Compact(ctx, lcli); err == nil {
		t.Fatal("Compact through a client of a named shared server succeeded")
	}
}
