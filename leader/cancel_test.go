package leader_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/leader"
)

// TestCancelWhileCampaigningDuringOutage: a follower waits in its campaign,
// its connection to etcd is blackholed, and then its ctx ends (also after its
// session expired during the outage). Run returns within its documented bound
// (a few seconds plus the TTL) although etcd does not answer, and leaves no
// goroutine behind (goleak, TestMain).
func TestCancelWhileCampaigningDuringOutage(t *testing.T) {
	t.Parallel()
	const ttl = 2
	bound := ttl*time.Second + 3*time.Second
	for _, tc := range []struct {
		name          string
		sessionExpiry bool // wait until the follower saw its session expire
	}{
		{name: "cancelled while waiting"},
		{name: "cancelled after the session expired", sessionExpiry: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			etcd, n, ctx, runCtx, stop := startRunTest(t)
			cli := etcd.Client()
			elected := make(chan leader.Term, 1)
			waitLeader := n.runCandidates(runCtx, t, etcd, n.countingWorker(0), []string{"leader"},
				leader.WithSessionTTL(ttl), leader.WithOnElected(func(term leader.Term) { elected <- term }))
			nextTerm(ctx, t, elected)

			proxy := etcdtest.NewProxy(t, etcd.Endpoints()[0])
			followerCli := etcdtest.NewClient(t, proxy.Endpoint())
			core, logs := observer.New(zap.WarnLevel)
			followerCtx, cancelFollower := context.WithCancel(ctx)
			defer cancelFollower()
			done := make(chan error, 1)
			go func() {
				done <- leader.Run(followerCtx, followerCli, n.election, "follower", n.countingWorker(0),
					leader.WithSessionTTL(ttl), leader.WithLogger(zap.New(core)))
			}()
			defer func() { proxy.Resume(); <-done }() // joins Run even when the test fails
			require.Eventually(t, func() bool {
				resp, err := cli.Get(ctx, n.election, clientv3.WithPrefix(), clientv3.WithCountOnly())
				return err == nil && resp.Count == 2
			}, 10*time.Second, 10*time.Millisecond, "the follower campaigns")

			proxy.Blackhole()
			if tc.sessionExpiry {
				require.Eventually(t, func() bool {
					return logs.FilterMessage("campaign failed, retrying").Len() > 0
				}, 3*ttl*time.Second+5*time.Second, 10*time.Millisecond, "the follower sees its session expire")
			}
			start := time.Now()
			cancelFollower()
			select {
			case err := <-done:
				done <- err // for the deferred join
				took := time.Since(start)
				require.ErrorIs(t, err, context.Canceled)
				require.Less(t, took, bound, "Run returned too late")
				t.Logf("Run returned %v after %v", err, took)
			case <-time.After(bound + 2*time.Second):
				t.Fatalf("Run did not return within %v of the cancellation while etcd did not answer", bound)
			}
			stop()
			require.ErrorIs(t, waitLeader()[0], context.Canceled)
		})
	}
}
