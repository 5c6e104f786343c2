// Command bank is a stress demo of the orchestrator: several EtcdWorkers move
// random amounts between accounts stored as JSON documents in etcd. Every
// transfer is one atomic patch group (debit and credit), so the balances
// always sum to zero; every Tick checks that on its snapshot, and at the end
// the sum is read back from etcd.
//
//	go run ./examples/bank --duration 3s
//	go run ./examples/bank --endpoints http://127.0.0.1:2379 --metrics-addr 127.0.0.1:9090
//	go run ./examples/bank --endpoints https://10.0.0.1:2379 --cacert ca.pem \
//		--cert client.pem --key client-key.pem --user bank --password secret
//
// Without --endpoints it runs an embedded etcd in a temporary directory. It
// exits 1 if the invariant ever broke or etcd cannot be reached, and 2 for a
// bad flag. Ctrl-C stops it cleanly.
package main

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/examples/internal/demo"
	"github.com/etcdworker/orchestrator/jsonstate"
	"github.com/etcdworker/orchestrator/util"
)

// about is the first line of --help.
const about = "bank shows EtcdWorkers moving money between accounts in atomic patch groups: the balances always sum to zero."

type config struct {
	conn        demo.ConnConfig
	prefix      string
	workers     int
	accounts    int
	perTick     int
	duration    time.Duration
	interval    time.Duration
	metricsAddr string
}

func main() { os.Exit(runMain(os.Args[1:], os.Stdout, os.Stderr)) }

// runMain is the whole program: it parses args, runs the demo and returns the
// exit code (0 OK, 1 error or broken invariant, 2 bad flags).
func runMain(args []string, stdout, stderr io.Writer) int {
	return demo.Program("bank", about, args, stdout, stderr, defineFlags, run)
}

// defineFlags defines the command line of bank, storing into cfg.
func defineFlags(fs *demo.Flags, cfg *config) {
	cfg.conn.Register(fs)
	fs.StringVar(&cfg.prefix, "prefix", "/orchestrator-example/bank", "etcd prefix of the worker")
	fs.IntAtLeast(&cfg.workers, "workers", 4, 1, "number of EtcdWorkers")
	fs.IntAtLeast(&cfg.accounts, "accounts", 25, 2, "number of accounts")
	fs.IntAtLeast(&cfg.perTick, "transfers-per-tick", 4, 1, "transfers each worker queues per Tick (one atomic group each)")
	fs.PositiveDuration(&cfg.duration, "duration", 10*time.Second, "how long to run")
	fs.PositiveDuration(&cfg.interval, "interval", 2*time.Millisecond, "the workers' timer interval (also their Tick rate limit)")
	fs.MetricsAddr(&cfg.metricsAddr)
}

// account is the JSON document of one account.
type account struct {
	Balance int64 `json:"balance"`
}

// run runs the demo, printing to out, and reports whether the invariant held
// throughout.
func run(ctx context.Context, cfg config, out io.Writer) (bool, error) {
	cfg.prefix = util.NormalizePrefix(cfg.prefix).String() // the keys it reads by hand are the library's
	env, err := demo.Setup(ctx, cfg.conn, cfg.metricsAddr, out, fmt.Sprintf("bank: %d workers, %d accounts under %s, %v",
		cfg.workers, cfg.accounts, cfg.prefix, cfg.duration))
	if err != nil {
		return false, err
	}
	defer env.Close()
	var violations atomic.Int64
	workErr := transfer(ctx, env, cfg, &violations, out)
	if workErr != nil {
		fmt.Fprintln(out, "worker error:", workErr)
	}

	// Verify on a fresh context: ctx may be cancelled by Ctrl-C.
	vctx, vcancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer vcancel()
	sum, n, err := etcdSum(vctx, env.Client, cfg.prefix)
	if err != nil {
		return false, fmt.Errorf("read the final balances: %w", err)
	}
	fmt.Fprintf(out, "done: %s; %d accounts in etcd\n", summary(env.Registry, &violations), n)
	ok := sum == 0 && violations.Load() == 0 && workErr == nil
	verdict := "OK"
	if !ok {
		verdict = "BROKEN"
	}
	fmt.Fprintf(out, "final sum: %d (%s)\n", sum, verdict)
	return ok, nil
}

// transfer runs the workers for cfg.duration, or until ctx is done or one
// fails, reporting their progress to out, and returns the error a worker
// failed with.
func transfer(ctx context.Context, env *demo.Env, cfg config, violations *atomic.Int64, out io.Writer) error {
	ctx, cancel := context.WithTimeout(ctx, cfg.duration)
	defer cancel()
	progressDone := make(chan struct{})
	go func() {
		defer close(progressDone)
		reportProgress(ctx, out, env.Registry, violations)
	}()
	err := runWorkers(ctx, env.Client, cfg, env.Registry, violations, out)
	<-progressDone
	return err
}

// runWorkers runs cfg.workers EtcdWorkers until ctx is done or one fails.
func runWorkers(ctx context.Context, cli *clientv3.Client, cfg config, reg prometheus.Registerer,
	violations *atomic.Int64, out io.Writer,
) error {
	g, gctx := errgroup.WithContext(ctx)
	for i := range cfg.workers {
		state := jsonstate.New[account](cfg.prefix + "/accounts")
		teller := &teller{
			accounts:   state,
			n:          cfg.accounts,
			perTick:    cfg.perTick,
			rng:        rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(i))),
			violations: violations,
			name:       fmt.Sprintf("teller-%d", i),
			out:        out,
		}
		w, err := orchestrator.NewEtcdWorker(cli, cfg.prefix, teller, state, orchestrator.WithMetrics(reg))
		if err != nil {
			return err
		}
		g.Go(func() error {
			err := w.Run(gctx, nil, cfg.interval, teller.name)
			if orchestrator.IsCleanStop(err) {
				return nil
			}
			return fmt.Errorf("%s: %w", teller.name, err)
		})
	}
	return g.Wait()
}

// teller is the Reactor of one worker.
type teller struct {
	name       string
	accounts   *jsonstate.State[account]
	n          int
	perTick    int
	rng        *rand.Rand
	violations *atomic.Int64
	out        io.Writer
}

// Tick checks the invariant on the snapshot, then queues perTick transfers.
func (t *teller) Tick(_ context.Context, state orchestrator.ReactorState) (orchestrator.ReactorState, error) {
	var sum int64
	for _, a := range t.accounts.All() {
		sum += a.Balance
	}
	if sum != 0 {
		if t.violations.Add(1) <= 5 {
			fmt.Fprintf(t.out, "%s: INVARIANT BROKEN: the snapshot sums to %d\n", t.name, sum)
		}
	}
	for range t.perTick {
		from := t.rng.IntN(t.n)
		to := (from + 1 + t.rng.IntN(t.n-1)) % t.n
		amount := int64(1 + t.rng.IntN(100))
		t.accounts.Group(func(g *jsonstate.Group[account]) {
			g.Patch(accountName(from), func(a *account, _ bool) (bool, error) { a.Balance -= amount; return true, nil })
			g.Patch(accountName(to), func(a *account, _ bool) (bool, error) { a.Balance += amount; return true, nil })
		})
	}
	return state, nil
}

func accountName(i int) string { return fmt.Sprintf("%04d", i) }

// reportProgress prints one line per second until ctx is done.
func reportProgress(ctx context.Context, out io.Writer, g prometheus.Gatherer, violations *atomic.Int64) {
	ticker := time.NewTicker(time.Second)
	defer ticker.Stop()
	start := time.Now()
	var lastCommits, lastTransfers float64
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		commits := demo.Sum(g, "orchestrator_commits_total")
		transfers := demo.Sum(g, "orchestrator_patch_groups_applied_total")
		fmt.Fprintf(out, "%5.1fs  commits %6.0f/s  transfers %6.0f/s  conflicts %6.0f  ticks %7.0f  torn snapshots %d\n",
			time.Since(start).Seconds(), commits-lastCommits, transfers-lastTransfers,
			demo.Sum(g, "orchestrator_conflicts_total"), demo.Sum(g, "orchestrator_ticks_total"), violations.Load())
		lastCommits, lastTransfers = commits, transfers
	}
}

// summary is the totals line.
func summary(g prometheus.Gatherer, violations *atomic.Int64) string {
	return fmt.Sprintf("%.0f commits, %.0f transfers, %.0f conflicts, %.0f ticks, %d torn snapshots",
		demo.Sum(g, "orchestrator_commits_total"), demo.Sum(g, "orchestrator_patch_groups_applied_total"),
		demo.Sum(g, "orchestrator_conflicts_total"), demo.Sum(g, "orchestrator_ticks_total"), violations.Load())
}

// etcdSum reads every account from etcd and returns the sum of the balances
// and the number of accounts.
func etcdSum(ctx context.Context, cli *clientv3.Client, prefix string) (int64, int, error) {
	state := jsonstate.New[account](prefix + "/accounts")
	resp, err := cli.Get(ctx, state.Prefix()+"/", clientv3.WithPrefix())
	if err != nil {
		return 0, 0, err
	}
	for _, kv := range resp.Kvs {
		if err := state.Update(util.NewEtcdKeyFromBytes(kv.Key), kv.Value, true); err != nil {
			return 0, 0, err
		}
	}
	var sum int64
	for _, a := range state.All() {
		sum += a.Balance
	}
	return sum, state.Len(), nil
}
