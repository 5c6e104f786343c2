package leader_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/leader"
	"github.com/etcdworker/orchestrator/orchestratortest"
)

// TestCancelWhileCampaigningLeavesNoLease: a candidate waiting behind
// a leader returns ctx's error promptly when ctx ends, and leaves neither an
// election key nor a lease behind.
func TestCancelWhileCampaigningLeavesNoLease(t *testing.T) {
	etcd, ctx, runCtx, stop := startRunTest(t)
	cli := etcd.Client()
	elected := make(chan leader.Term, 4)
	waitLeader := runCandidates(runCtx, t, etcd, countingWorker(0), []string{"leader"},
		leader.WithSessionTTL(5), leader.WithOnElected(func(term leader.Term) { elected <- term }))
	first := nextTerm(ctx, t, elected)

	waiterCtx, cancelWaiter := context.WithCancel(ctx)
	waitWaiter := runCandidates(waiterCtx, t, etcd, countingWorker(0), []string{"waiter"}, leader.WithSessionTTL(5))
	require.Eventually(t, func() bool {
		resp, err := cli.Get(ctx, electionPrefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
		return err == nil && resp.Count == 2
	}, 5*time.Second, 10*time.Millisecond, "the waiter campaigns")
	start := time.Now()
	cancelWaiter()
	require.ErrorIs(t, waitWaiter()[0], context.Canceled)
	require.Less(t, time.Since(start), 3*time.Second, "a waiting candidate stops promptly")

	resp, err := cli.Get(ctx, electionPrefix, clientv3.WithPrefix())
	require.NoError(t, err)
	require.Len(t, resp.Kvs, 1, "only the leader's key is left")
	leases, err := cli.Leases(ctx)
	require.NoError(t, err)
	require.Len(t, leases.Leases, 1, "only the leader's lease is left")
	require.Equal(t, first.Lease, leases.Leases[0].ID)
	stop()
	require.ErrorIs(t, waitLeader()[0], context.Canceled)
}

// TestRapidRevokesFenceEveryTerm: the leader's lease is revoked as
// soon as each term starts, many times in a row, while it commits. No group
// lands twice or in part (counter == log keys), and no term writes after its
// revocation.
func TestRapidRevokesFenceEveryTerm(t *testing.T) {
	etcd, ctx, runCtx, stop := startRunTest(t)
	cli := etcd.Client()
	elected := make(chan leader.Term, 32)
	wait := runCandidates(runCtx, t, etcd, countingWorker(0), []string{"a", "b"},
		leader.WithSessionTTL(2), leader.WithOnElected(func(term leader.Term) { elected <- term }))
	revokedAt := map[int64]int64{}
	for range 8 {
		term := nextTerm(ctx, t, elected)
		resp, err := cli.Revoke(ctx, term.Lease)
		require.NoError(t, err)
		revokedAt[term.Rev] = resp.Header.Revision
	}
	last := nextTerm(ctx, t, elected)
	waitWrites(ctx, t, cli, last.Rev, 2)
	stop()
	for _, err := range wait() {
		require.ErrorIs(t, err, context.Canceled)
	}
	counter, entries := readLedger(ctx, t, cli)
	require.Equal(t, counter, len(entries))
	for _, e := range entries {
		if revoked, ok := revokedAt[e.term]; ok {
			require.Less(t, e.createRev, revoked, "term %d wrote after its lease was revoked", e.term)
		}
	}
}

// TestOverlappingPrefixesAreRejected: an election prefix inside the
// worker's prefix puts the election keys in the worker's state; a worker
// prefix inside the election prefix makes the worker's keys block every
// later campaign (a candidate waits for all older keys under the election
// prefix to go). Both are invalid arguments, reported when the term starts.
func TestOverlappingPrefixesAreRejected(t *testing.T) {
	etcd := orchestratortest.StartEtcdServer(t)
	for _, tt := range []struct{ name, election, worker string }{
		{"election inside the worker prefix", "/test/data/election", "/test/data"},
		{"worker inside the election prefix", "/test/election", "/test/election/data"},
		{"same prefix", "/test/same", "/test/same/"},
		{"root worker prefix", "/test/e", "/"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			newWorker := func(context.Context, leader.Term) (leader.Worker, error) {
				state := &patchesOnly{}
				return leader.Worker{Prefix: tt.worker, State: state, TimerInterval: tickInterval,
					Reactor: orchestrator.ReactorFunc(func(_ context.Context, s orchestrator.ReactorState) (orchestrator.ReactorState, error) {
						return s, orchestrator.ErrReactorFinished
					})}, nil
			}
			err := leader.Run(ctx, etcd.Client(), tt.election, "c", newWorker, leader.WithSessionTTL(2))
			require.ErrorIs(t, err, orchestrator.ErrInvalidArgument, "%v", err)
		})
	}
	// Siblings that merely share a name prefix do not overlap.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := leader.Run(ctx, etcd.Client(), "/test/app-election", "c",
		func(context.Context, leader.Term) (leader.Worker, error) {
			return leader.Worker{Prefix: "/test/app", State: &patchesOnly{}, TimerInterval: tickInterval,
				Reactor: orchestrator.ReactorFunc(func(_ context.Context, s orchestrator.ReactorState) (orchestrator.ReactorState, error) {
					return s, orchestrator.ErrReactorFinished
				})}, nil
		}, leader.WithSessionTTL(2))
	require.NoError(t, err)
	require.False(t, errors.Is(err, orchestrator.ErrInvalidArgument))
}
