package leader_test

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/leader"
	"github.com/etcdworker/orchestrator/util"
)

const tickInterval = 20 * time.Millisecond

// names are the keys of one test: its election prefix and, beside it, the
// prefix its workers write under (a counter and a log), unique per test so
// that the tests share the package's etcd.
type names struct{ base, election, data, counter, logDir string }

func testNames(t testing.TB) names {
	base := "/test/" + strings.NewReplacer("/", "-", " ", "_").Replace(t.Name())
	return names{base: base, election: base + "/election", data: base + "/data", counter: base + "/data/counter",
		logDir: base + "/data/log/"}
}

// testEtcd is what the tests use of an etcd: the package's shared server
// (sharedEtcd) or one of their own (orchestratortest.Etcd, the server
// matrix's processes).
type testEtcd interface {
	clientMaker
	Client() *clientv3.Client
	Endpoints() []string
	RevokeLease(ctx context.Context, id clientv3.LeaseID) error
}

// sharedEtcd is the package's shared etcd as a testEtcd.
type sharedEtcd struct {
	t   testing.TB
	srv *etcdtest.Server
	cli *clientv3.Client
}

func startShared(t testing.TB) *sharedEtcd {
	t.Helper()
	srv := etcdtest.Shared(t)
	return &sharedEtcd{t: t, srv: srv, cli: srv.Client(t)}
}

func (e *sharedEtcd) Client() *clientv3.Client { return e.cli }
func (e *sharedEtcd) Endpoints() []string      { return e.srv.Endpoints() }

// NewClient returns a client of its own, closed by the test's cleanup.
func (e *sharedEtcd) NewClient() (*clientv3.Client, error) {
	return etcdtest.NewClient(e.t, e.srv.Endpoints()...), nil
}

func (e *sharedEtcd) RevokeLease(ctx context.Context, id clientv3.LeaseID) error {
	return etcdtest.RevokeLease(ctx, e.cli, id)
}

func testContext(t *testing.T) (context.Context, context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx, cancel
}

// startRunTest returns the shared etcd for a test of Run, the test's names,
// its context and runCtx, a child of it for the candidates that stop cancels
// (at the latest when the test function returns).
func startRunTest(t *testing.T) (etcd testEtcd, n names, ctx, runCtx context.Context, stop context.CancelFunc) {
	t.Helper()
	etcd = startShared(t)
	ctx, runCtx, stop = runContexts(t)
	return etcd, testNames(t), ctx, runCtx, stop
}

// runContexts returns the test's context and runCtx, a child of it for the
// candidates that stop cancels (at the latest when the test function
// returns, before etcd stops).
func runContexts(t *testing.T) (ctx, runCtx context.Context, stop context.CancelFunc) {
	t.Helper()
	ctx, _ = testContext(t)
	runCtx, stop = context.WithCancel(ctx)
	t.Cleanup(stop)
	return ctx, runCtx, stop
}

// clientMaker makes the clients of candidates: an orchestratortest.Etcd,
// or processClients.
type clientMaker interface {
	NewClient() (*clientv3.Client, error)
}

// patchesOnly is a ReactorState that ignores etcd's content and only queues
// patches: the patches read what they need at commit time.
type patchesOnly struct{ patches [][]orchestrator.DataPatch }

// Update implements orchestrator.ReactorState.
func (*patchesOnly) Update(util.EtcdKey, []byte, bool) error { return nil }

// GetPatches implements orchestrator.ReactorState.
func (s *patchesOnly) GetPatches() [][]orchestrator.DataPatch {
	p := s.patches
	s.patches = nil
	return p
}

// appendGroup is one Tick's write: bump the counter and add a log key named
// after the term, in one atomic group.
func (n names) appendGroup(term leader.Term, seq int) []orchestrator.DataPatch {
	logKey := fmt.Sprintf("%s%012d-%s-%06d", n.logDir, term.Rev, term.Candidate, seq)
	return []orchestrator.DataPatch{
		orchestrator.SingleDataPatch{Key: util.NewEtcdKey(n.counter), Func: func(old []byte) ([]byte, bool, error) {
			n := 0
			if old != nil {
				var err error
				if n, err = strconv.Atoi(string(old)); err != nil {
					return nil, false, err
				}
			}
			return []byte(strconv.Itoa(n + 1)), true, nil
		}},
		orchestrator.SingleDataPatch{Key: util.NewEtcdKey(logKey), Func: func([]byte) ([]byte, bool, error) {
			return []byte("x"), true, nil
		}},
	}
}

// countingWorker returns a NewWorkerFunc whose reactor appends one group per
// Tick, and finishes after finishAfter Ticks when finishAfter > 0.
func (n names) countingWorker(finishAfter int) leader.NewWorkerFunc {
	return func(_ context.Context, term leader.Term) (leader.Worker, error) {
		state := &patchesOnly{}
		seq := 0
		reactor := orchestrator.ReactorFunc(func(_ context.Context, s orchestrator.ReactorState) (orchestrator.ReactorState, error) {
			seq++
			state.patches = append(state.patches, n.appendGroup(term, seq))
			if finishAfter > 0 && seq >= finishAfter {
				return s, orchestrator.ErrReactorFinished
			}
			return s, nil
		})
		return leader.Worker{Prefix: n.data, Reactor: reactor, State: state, TimerInterval: tickInterval}, nil
	}
}

// logEntry is one log key read back from etcd.
type logEntry struct {
	term      int64
	createRev int64
}

// readLedger returns the counter and the log entries.
func (n names) readLedger(ctx context.Context, t *testing.T, cli *clientv3.Client) (int, []logEntry) {
	t.Helper()
	resp, err := cli.Get(ctx, n.counter)
	require.NoError(t, err)
	counter := 0
	if len(resp.Kvs) == 1 {
		counter, err = strconv.Atoi(string(resp.Kvs[0].Value))
		require.NoError(t, err)
	}
	resp, err = cli.Get(ctx, n.logDir, clientv3.WithPrefix())
	require.NoError(t, err)
	entries := make([]logEntry, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		termStr, _, _ := strings.Cut(strings.TrimPrefix(string(kv.Key), n.logDir), "-")
		term, err := strconv.ParseInt(termStr, 10, 64)
		require.NoError(t, err)
		entries = append(entries, logEntry{term: term, createRev: kv.CreateRevision})
	}
	return counter, entries
}

// waitWrites waits until term has written at least n log entries.
func (n names) waitWrites(ctx context.Context, t *testing.T, cli *clientv3.Client, term int64, count int) {
	t.Helper()
	require.Eventually(t, func() bool {
		resp, err := cli.Get(ctx, fmt.Sprintf("%s%012d-", n.logDir, term), clientv3.WithPrefix(), clientv3.WithCountOnly())
		return err == nil && resp.Count >= int64(count)
	}, 10*time.Second, 10*time.Millisecond, "term %d did not write %d entries", term, count)
}

// nextTerm waits for the next election.
func nextTerm(ctx context.Context, t *testing.T, elected <-chan leader.Term) leader.Term {
	t.Helper()
	select {
	case term := <-elected:
		return term
	case <-ctx.Done():
		t.Fatal("no candidate was elected")
		return leader.Term{}
	}
}

// runCandidates starts one leader.Run per name, each with its own client,
// and returns a function that waits for them and returns their errors.
func (n names) runCandidates(ctx context.Context, t *testing.T, etcd clientMaker,
	newWorker leader.NewWorkerFunc, names []string, opts ...leader.Option) func() []error {
	t.Helper()
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	for i, name := range names {
		cli, err := etcd.NewClient()
		require.NoError(t, err)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = leader.Run(ctx, cli, n.election, name, newWorker, opts...)
		}()
	}
	return func() []error { wg.Wait(); return errs }
}
