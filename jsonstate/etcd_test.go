package jsonstate_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/jsonstate"
)

func testContext(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

type account struct {
	Balance int64 `json:"balance"`
}

type ledger struct {
	Transfers int `json:"transfers"`
}

// TestStateWithEtcdWorker runs three workers that move money between
// accounts stored as JSON documents, each transfer a group that also bumps a
// single-document counter. Every Tick checks the total on its snapshot; at
// the end etcd must hold the same total and exactly one counted transfer per
// Tick that asked for one.
func TestStateWithEtcdWorker(t *testing.T) {
	t.Parallel()
	const (
		prefix   = "/jsonstate-test"
		accounts = 5
		initial  = 100
		workers  = 3
		cycles   = 20
	)
	srv := etcdtest.Shared(t)
	ctx := testContext(t)
	cli := srv.Client(t)
	for i := range accounts {
		_, err := cli.Put(ctx, fmt.Sprintf("%s/accounts/%d", prefix, i), mustJSON(t, account{Balance: initial}))
		require.NoError(t, err)
	}
	_, err := cli.Put(ctx, prefix+"/notes/x", "not json, not ours")
	require.NoError(t, err)

	g, gctx := errgroup.WithContext(ctx)
	for w := range workers {
		accts := jsonstate.New[account](prefix + "/accounts")
		book := jsonstate.NewDoc[ledger](prefix + "/ledger")
		done := 0
		reactor := orchestrator.ReactorFunc(func(context.Context, orchestrator.ReactorState) (orchestrator.ReactorState, error) {
			var sum int64
			for _, a := range accts.All() {
				sum += a.Balance
			}
			if accts.Len() != accounts || sum != accounts*initial {
				return nil, fmt.Errorf("torn snapshot: %d accounts, sum %d", accts.Len(), sum)
			}
			if done == cycles {
				return jsonstate.Multi{accts, book}, orchestrator.ErrReactorFinished
			}
			from, to := strconv.Itoa((w+done)%accounts), strconv.Itoa((w+2*done+1)%accounts)
			amount := int64(done + 1)
			done++
			accts.Group(func(g *jsonstate.Group[account]) {
				g.Patch(from, func(a *account, _ bool) (bool, error) { a.Balance -= amount; return true, nil })
				g.Patch(to, func(a *account, _ bool) (bool, error) { a.Balance += amount; return true, nil })
				g.Add(book.PatchOp(func(l *ledger, _ bool) (bool, error) { l.Transfers++; return true, nil }))
			})
			return jsonstate.Multi{accts, book}, nil
		})
		worker, err := orchestrator.NewEtcdWorker(srv.Client(t), prefix, reactor, jsonstate.Multi{accts, book})
		require.NoError(t, err)
		g.Go(func() error { return worker.Run(gctx, nil, 5*time.Millisecond, "bank-"+strconv.Itoa(w)) })
	}
	require.NoError(t, g.Wait())

	resp, err := cli.Get(ctx, prefix+"/accounts/", clientv3.WithPrefix())
	require.NoError(t, err)
	require.Len(t, resp.Kvs, accounts)
	var sum int64
	for _, kv := range resp.Kvs {
		var a account
		require.NoError(t, json.Unmarshal(kv.Value, &a))
		sum += a.Balance
	}
	require.EqualValues(t, accounts*initial, sum)
	resp, err = cli.Get(ctx, prefix+"/ledger")
	require.NoError(t, err)
	require.Len(t, resp.Kvs, 1)
	require.JSONEq(t, mustJSON(t, ledger{Transfers: workers * cycles}), string(resp.Kvs[0].Value))
}

// TestDecodeErrorWithEtcdWorker: under the default policy a broken document
// stops Run with an error naming the key; under SkipInvalid the reactor sees
// it in Errors and can repair it.
func TestDecodeErrorWithEtcdWorker(t *testing.T) {
	t.Parallel()
	const prefix = "/jsonstate-decode"
	srv := etcdtest.Shared(t)
	ctx := testContext(t)
	cli := srv.Client(t)
	_, err := cli.Put(ctx, prefix+"/nodes/good", `{"addr":"good"}`)
	require.NoError(t, err)
	_, err = cli.Put(ctx, prefix+"/nodes/bad", `{"addr":`)
	require.NoError(t, err)

	t.Run("fail", func(t *testing.T) {
		s := jsonstate.New[node](prefix + "/nodes")
		ticked := false
		reactor := orchestrator.ReactorFunc(func(_ context.Context, st orchestrator.ReactorState) (orchestrator.ReactorState, error) {
			ticked = true
			return st, nil
		})
		w, err := orchestrator.NewEtcdWorker(cli, prefix, reactor, s)
		require.NoError(t, err)
		err = w.Run(ctx, nil, 10*time.Millisecond, "fail")
		require.ErrorIs(t, err, jsonstate.ErrDecode)
		var derr *jsonstate.DecodeError
		require.ErrorAs(t, err, &derr)
		require.Equal(t, prefix+"/nodes/bad", derr.Key)
		require.False(t, ticked)
	})

	t.Run("skip and repair", func(t *testing.T) {
		s := jsonstate.New[node](prefix+"/nodes", jsonstate.WithDecodePolicy(jsonstate.SkipInvalid))
		var seen []string
		reactor := orchestrator.ReactorFunc(func(_ context.Context, st orchestrator.ReactorState) (orchestrator.ReactorState, error) {
			if errs := s.Errors(); len(errs) > 0 {
				for _, e := range errs {
					seen = append(seen, e.Key)
					s.Put(e.Key[len(s.Prefix())+1:], node{Addr: "repaired"})
				}
				return st, nil
			}
			if n, ok := s.Get("bad"); ok && n.Addr == "repaired" {
				return st, orchestrator.ErrReactorFinished
			}
			return st, errors.New("neither broken nor repaired")
		})
		w, err := orchestrator.NewEtcdWorker(cli, prefix, reactor, s)
		require.NoError(t, err)
		require.NoError(t, w.Run(ctx, nil, 10*time.Millisecond, "skip"))
		require.Equal(t, []string{prefix + "/nodes/bad"}, seen)
		require.Equal(t, []string{"bad", "good"}, s.Names())
	})
}

// TestWritingTheEmptyNameIsAnError: the document named "" would be the key
// prefix + "/" itself, which a State ignores when it loads (a directory
// marker some tools write). Put, Patch and Delete of "" fail with
// ErrEmptyName, a bad argument, and write nothing. Put("") used to write a
// document the State could never read back.
func TestWritingTheEmptyNameIsAnError(t *testing.T) {
	t.Parallel()
	cli := etcdtest.Shared(t).Client(t)
	ops := map[string]func(st *jsonstate.State[account]){
		"put": func(st *jsonstate.State[account]) { st.Put("", account{Balance: 7}) },
		"patch": func(st *jsonstate.State[account]) {
			st.Patch("", func(*account, bool) (bool, error) { return true, nil })
		},
		"delete": func(st *jsonstate.State[account]) { st.Delete("") },
		"in a group": func(st *jsonstate.State[account]) {
			st.Group(func(g *jsonstate.Group[account]) { g.Put("a", account{Balance: 1}); g.Put("", account{}) })
		},
	}
	for name, op := range ops {
		t.Run(name, func(t *testing.T) {
			ctx := testContext(t)
			prefix := "/jsonstate-test/empty-name-" + strings.ReplaceAll(name, " ", "-")
			st := jsonstate.New[account](prefix)
			reactor := orchestrator.ReactorFunc(func(context.Context, orchestrator.ReactorState) (orchestrator.ReactorState, error) {
				op(st)
				return st, nil
			})
			w, err := orchestrator.NewEtcdWorker(cli, prefix, reactor, st)
			require.NoError(t, err)
			err = w.Run(ctx, nil, 10*time.Millisecond, "empty-name")
			require.ErrorIs(t, err, jsonstate.ErrEmptyName)
			require.ErrorIs(t, err, orchestrator.ErrInvalidArgument)
			resp, err := cli.Get(ctx, prefix+"/", clientv3.WithPrefix())
			require.NoError(t, err)
			for _, kv := range resp.Kvs {
				require.Contains(t, string(kv.Key), "/__orchestrator/", "a bad group wrote %s", kv.Key)
			}
		})
	}
}
