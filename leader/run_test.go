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

// revocations maps each term (its Rev) whose session lease a test revoked
// to the revision of the revocation.
type revocations map[int64]int64

// revoke revokes term's session lease through cli: the leader crashes.
func (r revocations) revoke(ctx context.Context, t *testing.T, cli *clientv3.Client, term leader.Term) {
	t.Helper()
	resp, err := cli.Revoke(ctx, term.Lease)
	require.NoError(t, err)
	r[term.Rev] = resp.Header.Revision
}

// requireFencedLedger reads the ledger and requires that every group
// landed whole and once (the counter equals the entries) and that no term
// wrote after its lease was revoked; it returns the entries.
func (r revocations) requireFencedLedger(ctx context.Context, t *testing.T, cli *clientv3.Client, n names) []logEntry {
	t.Helper()
	counter, entries := n.readLedger(ctx, t, cli)
	require.Equal(t, counter, len(entries), "every group landed whole, none twice")
	for _, e := range entries {
		if revoked, ok := r[e.term]; ok {
			require.Less(t, e.createRev, revoked, "term %d wrote after its lease was revoked", e.term)
		}
	}
	return entries
}

// stopCandidates cancels the candidates' context (stop) and requires that
// each Run (wait) ended with it.
func stopCandidates(t *testing.T, stop func(), wait func() []error) {
	t.Helper()
	stop()
	for _, err := range wait() {
		require.ErrorIs(t, err, context.Canceled)
	}
}

func TestFailoverFencesOffTheDeposedLeader(t *testing.T) {
	t.Parallel()
	etcd := startShared(t)
	failoverFencesOff(t, testNames(t), etcd.Client(), etcd)
}

// failoverFencesOff runs three candidates on clients from etcd and makes
// three leaders in a row crash (their session lease revoked through cli): a
// follower takes over each time, terms grow, every group lands whole and
// once, and no term writes after its lease was revoked.
func failoverFencesOff(t *testing.T, n names, cli *clientv3.Client, etcd clientMaker) {
	ctx, runCtx, stop := runContexts(t)
	elected := make(chan leader.Term, 16)
	wait := n.runCandidates(runCtx, t, etcd, n.countingWorker(0), []string{"a", "b", "c"},
		leader.WithSessionTTL(2), leader.WithOnElected(func(term leader.Term) { elected <- term }))

	revoked := revocations{}
	var prev leader.Term
	for range 3 {
		term := nextTerm(ctx, t, elected)
		require.NotEqual(t, prev.Candidate, term.Candidate, "a follower takes over")
		require.Greater(t, term.Rev, prev.Rev, "terms grow")
		n.waitWrites(ctx, t, cli, term.Rev, 3)
		revoked.revoke(ctx, t, cli, term)
		prev = term
	}
	last := nextTerm(ctx, t, elected)
	n.waitWrites(ctx, t, cli, last.Rev, 3)
	stopCandidates(t, stop, wait)

	writesPerTerm := map[int64]int{}
	for _, e := range revoked.requireFencedLedger(ctx, t, cli, n) {
		writesPerTerm[e.term]++
	}
	require.Len(t, writesPerTerm, 4, "one entry set per term: %v", writesPerTerm)
}

func TestCancelResignsAndRevokesTheSession(t *testing.T) {
	t.Parallel()
	etcd, n, ctx, runCtx, stop := startRunTest(t)
	cli := etcd.Client()
	elected := make(chan leader.Term, 1)
	ended := make(chan error, 1)
	wait := n.runCandidates(runCtx, t, etcd, n.countingWorker(0), []string{"solo"},
		leader.WithSessionTTL(2),
		leader.WithOnElected(func(term leader.Term) { elected <- term }),
		leader.WithOnTermEnd(func(_ leader.Term, err error) { ended <- err }))

	term := nextTerm(ctx, t, elected)
	n.waitWrites(ctx, t, cli, term.Rev, 2)
	stop()
	require.ErrorIs(t, wait()[0], context.Canceled)
	require.ErrorIs(t, <-ended, context.Canceled, "OnTermEnd gets the worker's error")

	resp, err := cli.Get(ctx, n.election, clientv3.WithPrefix())
	require.NoError(t, err)
	require.Empty(t, resp.Kvs, "the election key is gone")
	ttl, err := cli.TimeToLive(ctx, term.Lease)
	require.NoError(t, err)
	require.EqualValues(t, -1, ttl.TTL, "the session lease is revoked")
}

func TestReactorFinishedResignsAndHandsOver(t *testing.T) {
	t.Parallel()
	ctx, _ := testContext(t)
	etcd, n := startShared(t), testNames(t)
	elected := make(chan leader.Term, 4)
	wait := n.runCandidates(ctx, t, etcd, n.countingWorker(3), []string{"a", "b"},
		leader.WithSessionTTL(2), leader.WithOnElected(func(term leader.Term) { elected <- term }))

	for _, err := range wait() {
		require.NoError(t, err, "Run returns nil once the reactor finished")
	}
	first, second := nextTerm(ctx, t, elected), nextTerm(ctx, t, elected)
	require.NotEqual(t, first.Candidate, second.Candidate)
	counter, entries := n.readLedger(ctx, t, etcd.Client())
	require.Equal(t, 6, counter, "three groups per term, final ones included")
	require.Len(t, entries, 6)
}

func TestLostSessionWhileWaitingCampaignsAgain(t *testing.T) {
	t.Parallel()
	etcd, n, ctx, runCtx, stop := startRunTest(t)
	cli := etcd.Client()
	elected := make(chan leader.Term, 4)
	onElected := leader.WithOnElected(func(term leader.Term) { elected <- term })
	waitA := n.runCandidates(runCtx, t, etcd, n.countingWorker(0), []string{"a"}, leader.WithSessionTTL(2), onElected)
	first := nextTerm(ctx, t, elected)
	waitB := n.runCandidates(runCtx, t, etcd, n.countingWorker(0), []string{"b"}, leader.WithSessionTTL(2), onElected)

	var waiting clientv3.LeaseID // b's session lease, attached to its election key
	require.Eventually(t, func() bool {
		resp, err := cli.Get(ctx, n.election, clientv3.WithPrefix())
		if err != nil || len(resp.Kvs) != 2 {
			return false
		}
		waiting = clientv3.LeaseID(resp.Kvs[1].Lease)
		return true
	}, 10*time.Second, 10*time.Millisecond)
	require.NoError(t, etcd.RevokeLease(ctx, waiting))
	require.NoError(t, etcd.RevokeLease(ctx, first.Lease))

	// Both candidates campaign again with new sessions; the winner's term is
	// alive (it was not "elected" with the revoked key) and writes.
	second := nextTerm(ctx, t, elected)
	require.NotContains(t, []clientv3.LeaseID{waiting, first.Lease}, second.Lease)
	n.waitWrites(ctx, t, cli, second.Rev, 2)
	require.Eventually(t, func() bool {
		resp, err := cli.Get(ctx, n.election, clientv3.WithPrefix())
		if err != nil || len(resp.Kvs) != 2 {
			return false
		}
		for _, kv := range resp.Kvs {
			if lease := clientv3.LeaseID(kv.Lease); lease == waiting || lease == first.Lease {
				return false
			}
		}
		return true
	}, 10*time.Second, 10*time.Millisecond, "both candidates campaign again with new sessions")
	stop()
	require.ErrorIs(t, waitA()[0], context.Canceled)
	require.ErrorIs(t, waitB()[0], context.Canceled)
}

func TestTermErrorsEndRunAndResign(t *testing.T) {
	t.Parallel()
	ctx, _ := testContext(t)
	etcd, n := startShared(t), testNames(t)
	errBoom := errors.New("boom")
	failingReactor := func(_ context.Context, _ leader.Term) (leader.Worker, error) {
		reactor := orchestrator.ReactorFunc(func(context.Context, orchestrator.ReactorState) (orchestrator.ReactorState, error) {
			return nil, errBoom
		})
		return leader.Worker{Prefix: n.data, Reactor: reactor, State: &patchesOnly{}}, nil
	}
	var ran bool // a Tick of running's worker ran
	running := func(context.Context, leader.Term) (leader.Worker, error) {
		ran = false
		reactor := orchestrator.ReactorFunc(func(context.Context, orchestrator.ReactorState) (orchestrator.ReactorState, error) {
			ran = true
			return nil, orchestrator.ErrReactorFinished
		})
		return leader.Worker{Prefix: n.data, Reactor: reactor, State: &patchesOnly{}}, nil
	}
	tests := []struct {
		name      string
		newWorker leader.NewWorkerFunc
		opts      []leader.Option
		want      error
		ran       bool // with opts: whether the worker ran a Tick
	}{
		{name: "NewWorkerFunc error", newWorker: func(context.Context, leader.Term) (leader.Worker, error) {
			return leader.Worker{}, errBoom
		}, want: errBoom},
		{name: "NewWorkerFunc panic", newWorker: func(context.Context, leader.Term) (leader.Worker, error) {
			panic("oops")
		}, want: orchestrator.ErrPanic},
		{name: "worker without reactor", newWorker: func(context.Context, leader.Term) (leader.Worker, error) {
			return leader.Worker{Prefix: n.data, State: &patchesOnly{}}, nil
		}, want: orchestrator.ErrInvalidArgument},
		{name: "reactor error", newWorker: failingReactor, want: errBoom},
		{name: "WithOnElected callback panics: the worker never runs", newWorker: running,
			opts: []leader.Option{leader.WithOnElected(func(leader.Term) { panic("elected") })}, want: orchestrator.ErrPanic},
		{name: "WithOnTermEnd callback panics", newWorker: running, ran: true,
			opts: []leader.Option{leader.WithOnTermEnd(func(leader.Term, error) { panic("ended") })}, want: orchestrator.ErrPanic},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := leader.Run(ctx, etcd.Client(), n.election, "c", tt.newWorker,
				append([]leader.Option{leader.WithSessionTTL(2)}, tt.opts...)...)
			require.ErrorIs(t, err, tt.want)
			if tt.opts != nil {
				require.Equal(t, tt.ran, ran, "the worker ran")
			}
			resp, err := etcd.Client().Get(ctx, n.election, clientv3.WithPrefix())
			require.NoError(t, err)
			require.Empty(t, resp.Kvs, "resigned")
		})
	}
}

func TestInvalidArguments(t *testing.T) {
	t.Parallel()
	ctx, _ := testContext(t)
	cli, n := startShared(t).Client(), testNames(t)
	worker := n.countingWorker(1)
	tests := []struct {
		name      string
		client    *clientv3.Client
		prefix    string
		candidate string
		newWorker leader.NewWorkerFunc
		opts      []leader.Option
	}{
		{"nil client", nil, n.election, "c", worker, nil},
		{"empty election prefix", cli, "", "c", worker, nil},
		{"empty candidate", cli, n.election, "", worker, nil},
		{"nil NewWorkerFunc", cli, n.election, "c", nil, nil},
		{"zero session TTL", cli, n.election, "c", worker, []leader.Option{leader.WithSessionTTL(0)}},
		// etcd never grants it: the campaign would retry the grant forever.
		{"session TTL over etcd's longest lease", cli, n.election, "c", worker, []leader.Option{leader.WithSessionTTL(9_000_000_001)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := leader.Run(ctx, tt.client, tt.prefix, tt.candidate, tt.newWorker, tt.opts...)
			require.ErrorIs(t, err, orchestrator.ErrInvalidArgument)
		})
	}
}

// TestCancelWhileCampaigningLeavesNoLease: a candidate waiting behind
// a leader returns ctx's error promptly when ctx ends, and leaves neither an
// election key nor a lease behind.
func TestCancelWhileCampaigningLeavesNoLease(t *testing.T) {
	t.Parallel()
	etcd, n := orchestratortest.StartEtcdServer(t), testNames(t) // it counts every lease: a server of its own
	ctx, runCtx, stop := runContexts(t)
	cli := etcd.Client()
	elected := make(chan leader.Term, 4)
	waitLeader := n.runCandidates(runCtx, t, etcd, n.countingWorker(0), []string{"leader"},
		leader.WithSessionTTL(5), leader.WithOnElected(func(term leader.Term) { elected <- term }))
	first := nextTerm(ctx, t, elected)

	waiterCtx, cancelWaiter := context.WithCancel(ctx)
	waitWaiter := n.runCandidates(waiterCtx, t, etcd, n.countingWorker(0), []string{"waiter"}, leader.WithSessionTTL(5))
	require.Eventually(t, func() bool {
		resp, err := cli.Get(ctx, n.election, clientv3.WithPrefix(), clientv3.WithCountOnly())
		return err == nil && resp.Count == 2
	}, 5*time.Second, 10*time.Millisecond, "the waiter campaigns")
	start := time.Now()
	cancelWaiter()
	require.ErrorIs(t, waitWaiter()[0], context.Canceled)
	require.Less(t, time.Since(start), 3*time.Second, "a waiting candidate stops promptly")

	resp, err := cli.Get(ctx, n.election, clientv3.WithPrefix())
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
	t.Parallel()
	etcd, n, ctx, runCtx, stop := startRunTest(t)
	cli := etcd.Client()
	elected := make(chan leader.Term, 32)
	wait := n.runCandidates(runCtx, t, etcd, n.countingWorker(0), []string{"a", "b"},
		leader.WithSessionTTL(2), leader.WithOnElected(func(term leader.Term) { elected <- term }))
	revoked := revocations{}
	for range 8 {
		revoked.revoke(ctx, t, cli, nextTerm(ctx, t, elected))
	}
	last := nextTerm(ctx, t, elected)
	n.waitWrites(ctx, t, cli, last.Rev, 2)
	stopCandidates(t, stop, wait)
	revoked.requireFencedLedger(ctx, t, cli, n)
}

// TestOverlappingPrefixesAreRejected: an election prefix inside the
// worker's prefix puts the election keys in the worker's state; a worker
// prefix inside the election prefix makes the worker's keys block every
// later campaign (a candidate waits for all older keys under the election
// prefix to go). Both are invalid arguments, reported when the term starts.
func TestOverlappingPrefixesAreRejected(t *testing.T) {
	t.Parallel()
	etcd, n := startShared(t), testNames(t)
	for _, tt := range []struct{ name, election, worker string }{
		{"election inside the worker prefix", n.base + "/data/election", n.base + "/data"},
		{"worker inside the election prefix", n.base + "/election", n.base + "/election/data"},
		{"same prefix", n.base + "/same", n.base + "/same/"},
		{"root worker prefix", n.base + "/e", "/"},
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

// TestClosingTheClientMidTermEndsRunPromptly: a leader whose client is
// closed during a term ends Run about as fast as a worker whose client is
// closed (the root package's closed-client cases require under a second):
// the worker returns at once with ErrEtcdRejected, and nothing the leader
// sends after that may wait for a closed client. Its resign was not bound
// to the client (etcdreq.Context), and clientv3 retried it on the closed
// connection 100 times, about 25 ms apart: Run returned 2.5 s late.
func TestClosingTheClientMidTermEndsRunPromptly(t *testing.T) {
	t.Parallel()
	etcd, n, ctx, runCtx, _ := startRunTest(t)
	cli, err := etcd.NewClient()
	require.NoError(t, err)
	elected := make(chan leader.Term, 1)
	errc := make(chan error, 1)
	go func() {
		errc <- leader.Run(runCtx, cli, n.election, "a", n.countingWorker(0),
			leader.WithOnElected(func(term leader.Term) { elected <- term }))
	}()
	term := nextTerm(ctx, t, elected)
	n.waitWrites(ctx, t, etcd.Client(), term.Rev, 2)

	start := time.Now()
	require.NoError(t, cli.Close())
	select {
	case err := <-errc:
		took := time.Since(start)
		t.Logf("Run returned %v after the client closed: %v", took, err)
		require.ErrorIs(t, err, orchestrator.ErrEtcdRejected)
		require.Less(t, took, time.Second, "Run waited for requests on a closed client")
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return after its client closed")
	}
}
