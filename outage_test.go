package orchestrator

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// TestMaxOutageCountsOnlyFailedRequests: WithMaxOutage counts only time
// during which etcd failed to answer. A Tick longer than the limit while
// etcd is healthy is not an outage; a real outage ends Run with
// ErrEtcdUnavailable about WithMaxOutage after it started, not after a
// whole request timeout (default 5s), whether the worker is idle or has a
// commit in flight.
func TestMaxOutageCountsOnlyFailedRequests(t *testing.T) {
	t.Parallel()
	t.Run("busy tick", func(t *testing.T) {
		t.Parallel()
		busyTickIsNoOutage(t)
	})
	for i, tc := range []struct {
		name     string
		fault    func(p *etcdtest.Proxy)
		inFlight bool
	}{
		{"idle, blackhole", (*etcdtest.Proxy).Blackhole, false},
		{"idle, pause", (*etcdtest.Proxy).Pause, false},
		{"commit in flight, blackhole", (*etcdtest.Proxy).Blackhole, true},
	} {
		prefix := fmt.Sprintf("/test/outage-%d", i)
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel() // mostly waiting: keeps the test short
			outageEndsRun(t, tc.fault, tc.inFlight, prefix)
		})
	}
}

func busyTickIsNoOutage(t *testing.T) {
	const prefix = "/test/outage-busy"
	ctx := contextWithin(t, 20*time.Second)
	var ticks atomic.Int64
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		st.patches = append(st.patches, []DataPatch{incrPatch(st.key("/n"), 1)})
		if ticks.Add(1) == 3 {
			time.Sleep(2 * time.Second) // busy in user code, etcd healthy
		}
		return st, nil
	})
	w, err := NewEtcdWorker(sharedClient(t), prefix, reactor, newMapState(prefix), WithMaxOutage(time.Second))
	require.NoError(t, err)
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	errc := runAsync(runCtx, w, nil, 20*time.Millisecond, "run")
	deadline := time.After(10 * time.Second)
	for ticks.Load() < 8 {
		select {
		case err := <-errc:
			t.Fatalf("Run returned after %d ticks: %v", ticks.Load(), err)
		case <-deadline:
			t.Fatalf("only %d ticks", ticks.Load())
		case <-time.After(10 * time.Millisecond):
		}
	}
	stop()
	require.ErrorIs(t, recvErr(ctx, t, errc), context.Canceled)
}

func outageEndsRun(t *testing.T, fault func(*etcdtest.Proxy), inFlight bool, prefix string) {
	const maxOutage = 3 * time.Second
	ctx := contextWithin(t, 20*time.Second)
	env := newTestEnv(t, withProxy())
	var (
		armed    atomic.Bool
		faulted  = make(chan time.Time, 1)
		ticks    atomic.Int64
		cutTxnAt = func() {
			if armed.CompareAndSwap(true, false) {
				fault(env.proxy)
				faulted <- time.Now()
			}
		}
	)
	cli := env.client(t, grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string,
		req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption,
	) error {
		if _, ok := asCommitTxn(req); ok {
			cutTxnAt() // the commit is sent into the outage
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}))
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		if inFlight || ticks.Load() == 0 {
			st.patches = append(st.patches, []DataPatch{incrPatch(st.key("/n"), 1)})
		}
		ticks.Add(1)
		return st, nil
	})
	// Default request timeout (5s): Run must not wait for it.
	w, err := NewEtcdWorker(cli, prefix, reactor, newMapState(prefix), WithMaxOutage(maxOutage))
	require.NoError(t, err)
	errc := runAsync(ctx, w, nil, 20*time.Millisecond, "run")
	waitWithin(t, 10*time.Second, "five ticks", nil, func() bool { return ticks.Load() >= 5 })
	var start time.Time
	if inFlight {
		armed.Store(true)
		select {
		case start = <-faulted:
		case <-time.After(5 * time.Second):
			t.Fatal("no commit was sent")
		}
	} else {
		start = time.Now()
		fault(env.proxy)
	}
	defer env.proxy.Resume()
	err = recvErr(contextWithin(t, maxOutage+5*time.Second), t, errc)
	took := time.Since(start)
	t.Logf("Run returned after %v: %v", took, err)
	require.ErrorIs(t, err, ErrEtcdUnavailable)
	require.Greater(t, took, maxOutage-500*time.Millisecond, "gave up before the limit")
	require.Less(t, took, maxOutage+1500*time.Millisecond, "gave up too late")
}

// slowStream delays every message of a client stream, as a slow link does,
// and counts them.
type slowStream struct {
	grpc.ClientStream
	delay    time.Duration
	messages *atomic.Int64
}

func (s *slowStream) RecvMsg(m any) error {
	time.Sleep(s.delay) // the message is on its way
	err := s.ClientStream.RecvMsg(m)
	if err == nil {
		s.messages.Add(1)
	}
	return err
}

// TestALoadThatStreamsSlowlyAfterAFailureIsNoOutage: the first load fails
// (an outage starts); the next one streams its chunks one every 150 ms,
// each well within the request timeout, for longer than WithMaxOutage. Every
// chunk is an answer of etcd, so the outage ended with the first one: Run
// ticks and finishes. The follower recorded the chunks in a health of its
// own and published it to the workers only once the load was complete, so
// the worker ended Run with ErrEtcdUnavailable while data was arriving.
func TestALoadThatStreamsSlowlyAfterAFailureIsNoOutage(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, ownServer(etcdtest.WithMaxRequestBytes(64<<10))) // chunks of about 64 KiB
	ctx := contextWithin(t, 30*time.Second)
	const prefix = "/test/slow-stream-after-failure"
	value := strings.Repeat("v", 1000)
	for i := 0; i < 600; i += 50 {
		var ops []clientv3.Op
		for j := i; j < i+50; j++ {
			ops = append(ops, clientv3.OpPut(fmt.Sprintf("%s/k%04d", prefix, j), value))
		}
		_, err := env.cli.Txn(ctx).Then(ops...).Commit()
		require.NoError(t, err)
	}
	var streams, chunks atomic.Int64
	slow := grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn,
		method string, streamer grpc.Streamer, opts ...grpc.CallOption,
	) (grpc.ClientStream, error) {
		if method != etcdserverpb.KV_RangeStream_FullMethodName {
			return streamer(ctx, desc, cc, method, opts...)
		}
		if streams.Add(1) == 1 {
			return nil, status.Error(codes.Unavailable, "the first load fails")
		}
		cs, err := streamer(ctx, desc, cc, method, opts...)
		if err != nil {
			return cs, err
		}
		return &slowStream{ClientStream: cs, delay: 150 * time.Millisecond, messages: &chunks}, nil
	})
	var ticks atomic.Int64
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		ticks.Add(1)
		return s, ErrReactorFinished
	})
	w := mustNewEtcdWorker(t, env.client(t, slow), prefix, reactor, newMapState(prefix),
		WithMaxOutage(time.Second), WithRequestTimeout(500*time.Millisecond))
	start := time.Now()
	err := w.Run(ctx, nil, behaviourTick, "slow-stream")
	took := time.Since(start)
	require.NoError(t, err, "after %v, %d streams, %d chunks", took, streams.Load(), chunks.Load())
	require.EqualValues(t, 1, ticks.Load())
	require.Greater(t, took, 1500*time.Millisecond, "the load outlasted the outage limit")
}
