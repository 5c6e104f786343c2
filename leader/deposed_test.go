package leader_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/leader"
)

// tickLog counts the Ticks of every term.
type tickLog struct {
	mu    sync.Mutex
	ticks map[int64]int // term (Rev) -> Ticks
}

func (l *tickLog) count(term int64) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ticks[term]
}

// idleWorker returns a NewWorkerFunc on n.data whose reactor only counts
// its Ticks: it never commits.
func (l *tickLog) idleWorker(n names) leader.NewWorkerFunc {
	return func(_ context.Context, term leader.Term) (leader.Worker, error) {
		reactor := orchestrator.ReactorFunc(func(_ context.Context, s orchestrator.ReactorState) (orchestrator.ReactorState, error) {
			l.mu.Lock()
			l.ticks[term.Rev]++
			l.mu.Unlock()
			return s, nil
		})
		return leader.Worker{Prefix: n.data, Reactor: reactor, State: &patchesOnly{}, TimerInterval: tickInterval}, nil
	}
}

// TestDeletedElectionKeyDeposesTheIdleLeader: an operator deletes the
// election key of a leader that never commits, while its session lives.
// The other candidate is elected at once; the old leader's term ends with
// ErrNotOwner within about one progress interval of the worker (default
// 2s), it ticks no more, the new leader alone ticks, and the old leader
// campaigns again.
func TestDeletedElectionKeyDeposesTheIdleLeader(t *testing.T) {
	t.Parallel()
	const bound = 4 * time.Second // the progress interval (2s) plus slack
	etcd, n, ctx, runCtx, stop := startRunTest(t)
	cli := etcd.Client()
	log := &tickLog{ticks: map[int64]int{}}
	elected := make(chan leader.Term, 4)
	type termEnd struct {
		term leader.Term
		err  error
	}
	ended := make(chan termEnd, 4)
	wait := n.runCandidates(runCtx, t, etcd, log.idleWorker(n), []string{"a", "b"},
		leader.WithSessionTTL(10),
		leader.WithOnElected(func(term leader.Term) { elected <- term }),
		leader.WithOnTermEnd(func(term leader.Term, err error) { ended <- termEnd{term, err} }))

	first := nextTerm(ctx, t, elected)
	require.Eventually(t, func() bool { return log.count(first.Rev) >= 5 }, 10*time.Second, 5*time.Millisecond)
	_, err := cli.Delete(ctx, first.Key)
	require.NoError(t, err)
	deletedAt := time.Now()

	second := nextTerm(ctx, t, elected)
	require.NotEqual(t, first.Candidate, second.Candidate, "the other candidate is elected")
	select {
	case end := <-ended:
		took := time.Since(deletedAt)
		require.Equal(t, first.Rev, end.term.Rev)
		require.ErrorIs(t, end.err, orchestrator.ErrNotOwner)
		require.Less(t, took, bound, "the deposed leader's term ended too late")
		t.Logf("the deposed leader's term ended %v after the deletion, after %d Ticks", took, log.count(first.Rev))
	case <-time.After(bound + 5*time.Second):
		t.Fatalf("the deposed leader still runs %v after the deletion (%d Ticks)", bound+5*time.Second, log.count(first.Rev))
	}

	// From now on only the new leader ticks; the old one campaigns again,
	// with a new session.
	stopped := log.count(first.Rev)
	since := log.count(second.Rev)
	require.Eventually(t, func() bool { return log.count(second.Rev) >= since+10 }, 10*time.Second, 5*time.Millisecond,
		"the new leader ticks")
	require.Equal(t, stopped, log.count(first.Rev), "the deposed leader ticked after its term ended")
	require.Eventually(t, func() bool {
		resp, err := cli.Get(ctx, n.election, clientv3.WithPrefix())
		if err != nil || len(resp.Kvs) != 2 {
			return false
		}
		for _, kv := range resp.Kvs {
			if string(kv.Value) == first.Candidate {
				return clientv3.LeaseID(kv.Lease) != first.Lease
			}
		}
		return false
	}, 10*time.Second, 10*time.Millisecond, "the deposed leader campaigns again")
	select {
	case end := <-ended:
		t.Fatalf("term %d ended: %v", end.term.Rev, end.err)
	default:
	}
	stop()
	for _, err := range wait() {
		require.ErrorIs(t, err, context.Canceled)
	}
}
