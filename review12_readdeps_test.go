package orchestrator

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/util"
)

func r12Put(key string) DataPatch {
	return SingleDataPatch{Key: util.NewEtcdKey(key), Func: func([]byte) ([]byte, bool, error) { return []byte("v"), true, nil }}
}

// TestReview12AbsentKeyDependencyCatchesACreate: a group depends on a key
// that is absent when its patch runs; another client creates it before the
// commit. The commit must fail and the group re-run and see the key.
func TestReview12AbsentKeyDependencyCatchesACreate(t *testing.T) {
	t.Parallel()
	const prefix = "/test/rd-absent"
	srv := etcdtest.Shared(t)
	ctx := testContext(t)
	cli := srv.Client(t)
	var runs atomic.Int32
	dep := util.NewEtcdKey(prefix + "/flag")
	decide := rdPatch(func(values map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
		if runs.Add(1) == 1 {
			if _, err := cli.Put(ctx, dep.String(), "on"); err != nil {
				return err
			}
		}
		if _, ok := values[dep]; ok {
			return ErrEtcdSkipGroup // the flag exists: do nothing
		}
		x := util.NewEtcdKey(prefix + "/x")
		values[x], changed[x] = []byte("written without flag"), struct{}{}
		return nil
	})
	require.NoError(t, rdRunOnce(ctx, t, cli, prefix, []DataPatch{ReadDependency{Key: dep}, decide}))
	resp, err := cli.Get(ctx, prefix+"/x")
	require.NoError(t, err)
	require.Empty(t, resp.Kvs, "the group must not land on a state without the flag")
	require.Equal(t, int32(2), runs.Load())
}

// TestReview12DependencyOnlyGroupsWriteNothing: groups made of dependencies
// only (key, range, both) send no Txn and do not fail Run.
func TestReview12DependencyOnlyGroupsWriteNothing(t *testing.T) {
	t.Parallel()
	const prefix = "/test/rd-deponly"
	srv := etcdtest.Shared(t)
	ctx := testContext(t)
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*rdState)
		st.patches = append(st.patches,
			[]DataPatch{ReadDependency{Key: util.NewEtcdKey(prefix + "/a")}},
			[]DataPatch{ReadRangeDependency{Prefix: prefix + "/r/"}},
			[]DataPatch{&ReadDependency{Key: util.NewEtcdKey(prefix + "/a")}, &ReadRangeDependency{Prefix: prefix + "/"}})
		return st, ErrReactorFinished
	})
	w, err := NewEtcdWorker(srv.Client(t), prefix, reactor, &rdState{})
	require.NoError(t, err)
	require.NoError(t, w.Run(ctx, nil, 10*time.Millisecond, "deponly"))
	require.Zero(t, testutil.ToFloat64(w.metrics.commits.WithLabelValues("deponly")))
}

// TestReview12RangeOverTheWholePrefixLands: a range dependency on the worker
// prefix + "/" itself covers the reserved area (the worker's own token and
// delete counter). Repeated commits of one worker, with and without a session,
// must land without livelock, deletes included.
func TestReview12RangeOverTheWholePrefixLands(t *testing.T) {
	t.Parallel()
	const prefix = "/test/rd-whole"
	srv := etcdtest.Shared(t)
	ctx := testContext(t)
	cli := srv.Client(t)
	for _, withSession := range []bool{false, true} {
		t.Run(fmt.Sprintf("session=%v", withSession), func(t *testing.T) {
			rounds := 0
			reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
				st := s.(*rdState)
				if rounds == 6 {
					return st, ErrReactorFinished
				}
				k := fmt.Sprintf("%s/k%d", prefix, rounds%2)
				p := r12Put(k)
				if rounds%3 == 2 {
					p = deletePatch(util.NewEtcdKey(k))
				}
				st.patches = append(st.patches, []DataPatch{ReadRangeDependency{Prefix: prefix + "/"}, p})
				rounds++
				return st, nil
			})
			w, err := NewEtcdWorker(cli, prefix, reactor, &rdState{})
			require.NoError(t, err)
			var session *concurrency.Session
			if withSession {
				session, err = concurrency.NewSession(cli, concurrency.WithTTL(5))
				require.NoError(t, err)
				defer session.Close()
			}
			rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			require.NoError(t, w.Run(rctx, session, 5*time.Millisecond, "whole"))
		})
	}
}

// TestReview12OpEstimateMatchesTheServer: with the server's --max-txn-ops
// equal to the worker's op limit, a fenced worker bound to a session commits
// groups with writes, deletes and growing numbers of dependencies. Each
// either lands or fails with ErrEtcdTxnOpsExceed before sending: never does
// etcd reject the Txn as too large.
func TestReview12OpEstimateMatchesTheServer(t *testing.T) {
	t.Parallel()
	const prefix, limit = "/test/rd-ops", 8
	srv := etcdtest.NewServer(t, etcdtest.WithMaxTxnOps(limit))
	ctx := testContext(t)
	cli := srv.Client(t)
	fence, err := cli.Put(ctx, "/test/rd-ops-fence", "x")
	require.NoError(t, err)
	session, err := concurrency.NewSession(cli, concurrency.WithTTL(5))
	require.NoError(t, err)
	defer session.Close()
	for n := 0; n <= limit; n++ {
		mustPutKV(ctx, t, cli, prefix+"/gone", "1") // the group deletes it: the delete counter is written too
		group := []DataPatch{r12Put(fmt.Sprintf("%s/w%d", prefix, n)), deletePatch(util.NewEtcdKey(prefix + "/gone")),
			ReadRangeDependency{Prefix: prefix + "/r/"}}
		for i := range n {
			group = append(group, ReadDependency{Key: util.NewEtcdKey(fmt.Sprintf("%s/d%d", prefix, i))})
		}
		err := rdRunOnceSession(ctx, t, cli, prefix, session, group,
			WithTxnLimits(limit, DefaultTxnMaxBytes), WithFencingKey("/test/rd-ops-fence", fence.Header.Revision))
		if err != nil {
			require.ErrorIs(t, err, ErrEtcdTxnOpsExceed, "n=%d", n)
			require.NotContains(t, err.Error(), "too many operations", "n=%d", n)
		}
		t.Logf("n=%d deps: %v", n, err)
	}
}

func rdRunOnceSession(ctx context.Context, t *testing.T, cli *clientv3.Client, prefix string,
	session *concurrency.Session, group []DataPatch, opts ...Option) error {
	t.Helper()
	w := rdOnceWorker(t, cli, prefix, group, opts...)
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return w.Run(rctx, session, 10*time.Millisecond, "rd")
}

// TestReview12RangeDependencyRacesAForeignCreator: while another client keeps
// creating keys in the range, a group that counts the range and writes the
// count must only land with the count of the snapshot it ran on: at the
// commit's revision the range holds exactly count keys. The creator pauses
// between keys: a writer that creates keys in the range back to back can
// starve a range dependency for as long as it writes (optimistic
// concurrency; see "Read dependencies" in docs/DESIGN.md).
func TestReview12RangeDependencyRacesAForeignCreator(t *testing.T) {
	t.Parallel()
	const prefix = "/test/rd-race"
	srv := etcdtest.Shared(t)
	ctx := testContext(t)
	cli := srv.Client(t)
	stop, started := make(chan struct{}), make(chan struct{})
	creator := make(chan error, 1)
	go func() {
		for i := 0; ; i++ {
			if i == 1 {
				close(started)
			}
			select {
			case <-stop:
				creator <- nil
				return
			default:
			}
			if _, err := cli.Put(ctx, fmt.Sprintf("%s/r/%04d", prefix, i), "x"); err != nil {
				creator <- err
				return
			}
			time.Sleep(5 * time.Millisecond) // fault timing: a steady, not saturating, writer
		}
	}()
	count := rdPatch(func(values map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
		n := 0
		for k := range values {
			if strings.HasPrefix(k.String(), prefix+"/r/") {
				n++
			}
		}
		x := util.NewEtcdKey(prefix + "/count")
		values[x], changed[x] = []byte(fmt.Sprint(n)), struct{}{}
		return nil
	})
	awaitSignal(ctx, t, started, "the creator's first key")
	err := rdRunOnce(ctx, t, srv.Client(t), prefix, []DataPatch{ReadRangeDependency{Prefix: prefix + "/r/"}, count})
	close(stop)
	require.NoError(t, <-creator)
	require.NoError(t, err)
	resp, err := cli.Get(ctx, prefix+"/count")
	require.NoError(t, err)
	require.Len(t, resp.Kvs, 1)
	at := resp.Kvs[0].ModRevision
	rng, err := cli.Get(ctx, prefix+"/r/", clientv3.WithPrefix(), clientv3.WithCountOnly(), clientv3.WithRev(at))
	require.NoError(t, err)
	require.Equal(t, fmt.Sprint(rng.Count), string(resp.Kvs[0].Value), "count written at revision %d", at)
}

// TestReview12TesterHonoursSkipAndDependencies: the ReactorStateTester
// applies a group with dependencies (writing nothing for them) and drops a
// group whose patch returns ErrEtcdSkipGroup.
func TestReview12TesterHonoursSkipAndDependencies(t *testing.T) {
	t.Parallel()
	const prefix = "/test/rd-tester"
	st := &rdState{}
	tester := NewReactorStateTester(t, st, map[string]string{prefix + "/cap": "1"})
	skip := rdPatch(func(map[util.EtcdKey][]byte, map[util.EtcdKey]struct{}) error { return ErrEtcdSkipGroup })
	st.patches = [][]DataPatch{
		{ReadDependency{Key: util.NewEtcdKey(prefix + "/cap")}, ReadRangeDependency{Prefix: prefix + "/r/"}, r12Put(prefix + "/a")},
		{r12Put(prefix + "/b"), ReadDependency{Key: util.NewEtcdKey(prefix + "/cap")}, skip},
		{ReadDependency{Key: util.NewEtcdKey(prefix + "/none")}},
	}
	_, err := tester.ApplyPatches()
	require.NoError(t, err)
	require.Equal(t, map[string]string{prefix + "/cap": "1", prefix + "/a": "v"}, tester.KVEntries())
}
