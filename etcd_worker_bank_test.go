package orchestrator

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"

	"github.com/etcdworker/orchestrator/util"
)

const bankPrefix = "/test/bank"

// bankState mirrors the accounts (/acct/<i>, integers) and the transfer log
// (/log/<worker>-<run>-<n> = "from,to,amount") under bankPrefix.
type bankState struct {
	accounts []int64
	present  []bool
	logs     int
}

func newBankState(accounts int) *bankState {
	return &bankState{accounts: make([]int64, accounts), present: make([]bool, accounts)}
}

func (s *bankState) Update(key util.EtcdKey, value []byte, _ bool) error {
	k := key.String()
	if strings.Contains(k, reservedDir) {
		return fmt.Errorf("reserved key %q reached the ReactorState", k)
	}
	rel, ok := strings.CutPrefix(k, bankPrefix+"/")
	if !ok {
		return fmt.Errorf("key %q outside the prefix reached the ReactorState", k)
	}
	if idx, ok := strings.CutPrefix(rel, "acct/"); ok {
		i, err := strconv.Atoi(idx)
		if err != nil || i < 0 || i >= len(s.accounts) {
			return fmt.Errorf("bad account key %q", k)
		}
		if value == nil {
			return fmt.Errorf("account %d deleted", i)
		}
		n, err := strconv.ParseInt(string(value), 10, 64)
		if err != nil {
			return fmt.Errorf("account %d: %w", i, err)
		}
		s.accounts[i], s.present[i] = n, true
		return nil
	}
	if strings.HasPrefix(rel, "log/") {
		if value == nil {
			return fmt.Errorf("log entry %q deleted", k)
		}
		s.logs++
		return nil
	}
	return fmt.Errorf("unexpected key %q", k)
}

// GetPatches is not used: bankReactor leaves its patch group in pending.
func (s *bankState) GetPatches() [][]DataPatch { return nil }

// bankReactor checks on every Tick that money is conserved in the snapshot
// (Σ accounts == 0) and then moves a random amount between two random
// accounts, with non-idempotent add patches, plus a log entry, in one group.
// After transfers transfers it returns ErrReactorFinished together with the
// last one.
type bankReactor struct {
	name      string
	transfers int
	done      int
	pending   []DataPatch
}

// bankPatchingState wraps bankState to hand out the reactor's group.
type bankPatchingState struct {
	*bankState
	r *bankReactor
}

func (s bankPatchingState) GetPatches() [][]DataPatch {
	p := s.r.pending
	s.r.pending = nil
	if p == nil {
		return nil
	}
	return [][]DataPatch{p}
}

func (r *bankReactor) Tick(_ context.Context, state ReactorState) (ReactorState, error) {
	st := state.(bankPatchingState)
	var sum int64
	for i, n := range st.accounts {
		if !st.present[i] {
			return st, fmt.Errorf("%s: account %d missing from the snapshot", r.name, i)
		}
		sum += n
	}
	if sum != 0 {
		return st, fmt.Errorf("%s: torn or wrong snapshot: Σ accounts = %d, want 0 (%v)", r.name, sum, st.accounts)
	}
	from, to := rand.IntN(len(st.accounts)), rand.IntN(len(st.accounts))
	amount := int64(1 + rand.IntN(100))
	r.pending = []DataPatch{
		bankAdd(from, -amount),
		bankAdd(to, amount),
		SingleDataPatch{
			Key: util.NewEtcdKey(fmt.Sprintf("%s/log/%s-%d", bankPrefix, r.name, r.done)),
			Func: func(old []byte) ([]byte, bool, error) {
				if old != nil {
					return nil, false, fmt.Errorf("log entry written twice")
				}
				return []byte(fmt.Sprintf("%d,%d,%d", from, to, amount)), true, nil
			},
		},
	}
	r.done++
	if r.done == r.transfers {
		return st, ErrReactorFinished
	}
	return st, nil
}

// bankAdd adds delta to account i: running it twice on the same value
// counts twice.
func bankAdd(i int, delta int64) DataPatch {
	return SingleDataPatch{
		Key: util.NewEtcdKey(fmt.Sprintf("%s/acct/%d", bankPrefix, i)),
		Func: func(old []byte) ([]byte, bool, error) {
			n, err := strconv.ParseInt(string(old), 10, 64)
			if err != nil {
				return nil, false, fmt.Errorf("account %d = %q: %w", i, old, err)
			}
			return []byte(strconv.FormatInt(n+delta, 10)), true, nil
		},
	}
}

// TestEtcdWorkerBank ports the original bank test: 25 accounts starting at
// 0, 10 workers transferring random amounts between random accounts. Every
// Tick asserts Σ accounts == 0 on its snapshot (a torn snapshot, a lost or a
// doubled add breaks it). Each worker runs twice (a fresh worker and state
// each time, like the original's random restarts) with a fixed number of
// transfers, the last one returned with ErrReactorFinished. At the end etcd
// holds exactly one log entry per transfer, and replaying the log gives
// exactly etcd's balances (so every transfer landed exactly once).
func TestEtcdWorkerBank(t *testing.T) {
	t.Parallel()
	runBank(t, newTestEnv(t))
}

// runBank runs TestEtcdWorkerBank against env's server.
func runBank(t *testing.T, env *testEnv) {
	const (
		accounts  = 25
		workers   = 10
		runs      = 2
		transfers = 15 // per run
	)
	ctx := testContext(t)
	cli := env.cli
	for i := 0; i < accounts; i++ {
		mustPutKV(ctx, t, cli, fmt.Sprintf("%s/acct/%d", bankPrefix, i), "0")
	}

	start := time.Now()
	g, gctx := errgroup.WithContext(ctx)
	for i := 0; i < workers; i++ {
		wcli := env.client(t)
		g.Go(func() error {
			for run := 0; run < runs; run++ {
				r := &bankReactor{name: fmt.Sprintf("w%d-r%d", i, run), transfers: transfers}
				w, err := NewEtcdWorker(wcli, bankPrefix, r, bankPatchingState{bankState: newBankState(accounts), r: r})
				if err != nil {
					return err
				}
				if err := w.Run(gctx, nil, behaviourTick, r.name); err != nil {
					return fmt.Errorf("%s: %w", r.name, err)
				}
				if r.done != transfers {
					return fmt.Errorf("%s: finished after %d transfers", r.name, r.done)
				}
			}
			return nil
		})
	}
	require.NoError(t, g.Wait())
	t.Logf("%d transfers in %v", workers*runs*transfers, time.Since(start))

	resp, err := cli.Get(ctx, bankPrefix+"/", clientv3.WithPrefix())
	require.NoError(t, err)
	balances := make([]int64, accounts)
	replayed := make([]int64, accounts)
	logs := 0
	for _, kv := range resp.Kvs {
		rel := strings.TrimPrefix(string(kv.Key), bankPrefix+"/")
		switch {
		case strings.HasPrefix(rel, "acct/"):
			i, err := strconv.Atoi(strings.TrimPrefix(rel, "acct/"))
			require.NoError(t, err)
			balances[i] = mustInt(t, kv.Value)
		case strings.HasPrefix(rel, "log/"):
			logs++
			var from, to int
			var amount int64
			_, err := fmt.Sscanf(string(kv.Value), "%d,%d,%d", &from, &to, &amount)
			require.NoError(t, err, "log entry %q", kv.Value)
			replayed[from] -= amount
			replayed[to] += amount
		}
	}
	require.Equal(t, workers*runs*transfers, logs, "committed transfers")
	var sum int64
	for _, n := range balances {
		sum += n
	}
	require.Zero(t, sum, "money created or destroyed: %v", balances)
	require.Equal(t, replayed, balances, "balances differ from the replayed transfer log")
}
