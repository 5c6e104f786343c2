package leader_test

// A panic in WithOnElected or WithOnTermEnd ends Run with ErrPanic after
// resigning: nothing may be left behind (election key, session lease,
// goroutines: goleak in TestMain), also when the panic comes after ctx
// ended, and a waiting candidate takes over at once. An error etcd answers
// for a while (internal/etcderr: not permanent) must not end a campaign.

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/leader"
)

// requireNothingLeft requires that no election key is left and that lease
// is revoked.
func (n names) requireNothingLeft(ctx context.Context, t *testing.T, cli *clientv3.Client, lease clientv3.LeaseID) {
	t.Helper()
	resp, err := cli.Get(ctx, n.election, clientv3.WithPrefix())
	require.NoError(t, err)
	require.Empty(t, resp.Kvs, "the election key is gone")
	ttl, err := cli.TimeToLive(ctx, lease)
	require.NoError(t, err)
	require.EqualValues(t, -1, ttl.TTL, "the session lease is revoked")
}

// TestOnTermEndPanicAfterCancelResignsAndRevokes: ctx ends while the
// candidate leads; its WithOnTermEnd callback then panics. Run returns an
// error matching both ErrPanic and ctx's error, promptly, and leaves
// neither the election key nor the session lease.
func TestOnTermEndPanicAfterCancelResignsAndRevokes(t *testing.T) {
	t.Parallel()
	etcd, n, ctx, runCtx, stop := startRunTest(t)
	cli := etcd.Client()
	elected := make(chan leader.Term, 1)
	var ended atomic.Pointer[error]
	wait := n.runCandidates(runCtx, t, etcd, n.countingWorker(0), []string{"solo"},
		leader.WithSessionTTL(30), // an expiry would take longer than the test
		leader.WithOnElected(func(term leader.Term) { elected <- term }),
		leader.WithOnTermEnd(func(_ leader.Term, err error) {
			ended.Store(&err)
			panic("term end")
		}))
	term := nextTerm(ctx, t, elected)
	n.waitWrites(ctx, t, cli, term.Rev, 2)
	start := time.Now()
	stop()
	err := wait()[0]
	require.Less(t, time.Since(start), 5*time.Second, "Run returns promptly")
	require.ErrorIs(t, err, orchestrator.ErrPanic)
	require.ErrorIs(t, err, context.Canceled, "ctx ended: errors.Is(err, ctx.Err()) holds (Run's contract)")
	require.NotNil(t, ended.Load(), "OnTermEnd ran")
	require.ErrorIs(t, *ended.Load(), context.Canceled)
	n.requireNothingLeft(ctx, t, cli, term.Lease)
}

// TestOnElectedPanicHandsOverAtOnce: the leader's WithOnElected callback
// panics while another candidate waits. Run returns ErrPanic with its lease
// revoked, and the waiting candidate is elected long before the panicking
// one's session TTL (it resigned).
func TestOnElectedPanicHandsOverAtOnce(t *testing.T) {
	t.Parallel()
	etcd, n, ctx, runCtx, stop := startRunTest(t)
	cli := etcd.Client()
	const ttl = 30
	waiting := make(chan struct{})
	elected := make(chan leader.Term, 2)
	waitA := n.runCandidates(runCtx, t, etcd, n.countingWorker(0), []string{"a"}, leader.WithSessionTTL(ttl),
		leader.WithOnElected(func(term leader.Term) {
			elected <- term
			select { // panic once b campaigns behind a
			case <-waiting:
			case <-runCtx.Done():
			}
			panic("elected")
		}))
	first := nextTerm(ctx, t, elected)
	waitB := n.runCandidates(runCtx, t, etcd, n.countingWorker(0), []string{"b"}, leader.WithSessionTTL(ttl),
		leader.WithOnElected(func(term leader.Term) { elected <- term }))
	require.Eventually(t, func() bool {
		resp, err := cli.Get(ctx, n.election, clientv3.WithPrefix(), clientv3.WithCountOnly())
		return err == nil && resp.Count == 2
	}, 10*time.Second, 10*time.Millisecond, "b campaigns")
	start := time.Now()
	close(waiting)
	require.ErrorIs(t, waitA()[0], orchestrator.ErrPanic)
	second := nextTerm(ctx, t, elected)
	require.Equal(t, "b", second.Candidate)
	require.Less(t, time.Since(start), 5*time.Second, "b is elected after a resigned, not after a's TTL")
	ttlResp, err := cli.TimeToLive(ctx, first.Lease)
	require.NoError(t, err)
	require.EqualValues(t, -1, ttlResp.TTL, "a's session lease is revoked")
	stop()
	require.ErrorIs(t, waitB()[0], context.Canceled)
	n.requireNothingLeft(ctx, t, cli, second.Lease)
}

// failFirst is a unary interceptor that fails the first call of method
// with err (before it reaches etcd), and lets every other call through.
type failFirst struct {
	method string
	err    error
	failed atomic.Bool
}

func (f *failFirst) intercept(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn,
	invoker grpc.UnaryInvoker, opts ...grpc.CallOption,
) error {
	if method == f.method && f.failed.CompareAndSwap(false, true) {
		return f.err
	}
	return invoker(ctx, method, req, reply, cc, opts...)
}

// TestCampaignRetriesTransientErrors: the first Grant, election Txn or
// Range of a candidate gets an error etcd answers while it has no leader,
// times out, is overloaded or out of space, or that gRPC reports for a
// broken connection, or the lease is gone. Run must campaign again, be
// elected and run its term to the end (nil), not end with the error.
func TestCampaignRetriesTransientErrors(t *testing.T) {
	t.Parallel()
	etcd := startShared(t)
	errs := map[string]error{
		"no leader":           rpctypes.ErrGRPCNoLeader,
		"leader changed":      rpctypes.ErrGRPCLeaderChanged,
		"request timed out":   rpctypes.ErrGRPCTimeout,
		"timeout leader fail": rpctypes.ErrGRPCTimeoutDueToLeaderFail,
		"unhealthy":           rpctypes.ErrGRPCUnhealthy,
		"too many requests":   rpctypes.ErrGRPCRequestTooManyRequests,
		"no space":            rpctypes.ErrGRPCNoSpace,
		"lease not found":     rpctypes.ErrGRPCLeaseNotFound,
		"not leader":          rpctypes.ErrGRPCNotLeader,
		"connection closed":   status.Error(codes.Unavailable, "error reading from server: EOF"),
		"deadline":            status.Error(codes.DeadlineExceeded, "context deadline exceeded"),
		"auth old revision":   rpctypes.ErrGRPCAuthOldRevision, // codes.InvalidArgument
	}
	methods := []string{"/etcdserverpb.Lease/LeaseGrant", "/etcdserverpb.KV/Txn", "/etcdserverpb.KV/Range"}
	for name, injected := range errs {
		for _, method := range methods {
			t.Run(fmt.Sprintf("%s/%s", name, method), func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
				defer cancel()
				n := testNames(t)
				f := &failFirst{method: method, err: injected}
				cfg := etcdtest.ClientConfig(etcd.Endpoints()...)
				cfg.DialOptions = append(cfg.DialOptions, grpc.WithChainUnaryInterceptor(f.intercept))
				cli := etcdtest.NewClientFromConfig(t, cfg)
				err := leader.Run(ctx, cli, n.election, "c", n.countingWorker(1), leader.WithSessionTTL(2))
				require.True(t, f.failed.Load(), "precondition: the error was injected")
				require.NoError(t, err, "a transient %v ended Run", injected)
			})
		}
	}
}

// TestCampaignThroughACutConnection: the candidate's connection to etcd is
// cut (connections reset) when Run begins and for the first campaign
// attempts, then heals. Run is elected and runs its term to the end.
func TestCampaignThroughACutConnection(t *testing.T) {
	t.Parallel()
	etcd, n := startShared(t), testNames(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	proxy := etcdtest.NewProxy(t, etcd.Endpoints()[0])
	cli := etcdtest.NewClient(t, proxy.Endpoint())
	proxy.CutFor(3 * time.Second)
	start := time.Now()
	err := leader.Run(ctx, cli, n.election, "c", n.countingWorker(1), leader.WithSessionTTL(2))
	require.NoError(t, err, "a cut connection ended Run")
	require.Greater(t, time.Since(start), 2*time.Second, "precondition: the campaign ran into the cut")
}
