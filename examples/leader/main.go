// Command leader shows leader election with fencing: several controllers
// campaign with the library's leader package (concurrency.Election
// underneath), and only the leader runs an EtcdWorker, fenced with the
// election key and its create revision and bound to the term's session. Every Tick the leader bumps a
// counter and appends a log entry in one patch. Every --kill-after the
// current leader's lease is revoked (as when it crashes or is partitioned
// away): it stops, another controller takes over, and the deposed leader
// rejoins the queue.
//
// At the end the counter must equal the number of log entries, the entries
// must hold every value 1..counter exactly once (no lost or doubled write),
// and their leader terms must only grow (no write by a deposed leader after
// its successor's).
//
//	go run ./examples/leader --duration 6s
//
// Without --endpoints it runs an embedded etcd in a temporary directory; see
// --help for TLS and authentication. It exits 1 if a check failed or etcd
// cannot be reached, and 2 for a bad flag.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/examples/internal/demo"
	"github.com/etcdworker/orchestrator/leader"
	"github.com/etcdworker/orchestrator/util"
)

// about is the first line of --help.
const about = "leader shows leader election with fencing: only the elected controller's EtcdWorker writes, and a deposed leader's writes are refused."

type config struct {
	conn        demo.ConnConfig
	prefix      string
	controllers int
	duration    time.Duration
	killAfter   time.Duration
	interval    time.Duration
	ttl         int
	metricsAddr string
}

// Conn implements demo.Config.
func (c *config) Conn() *demo.ConnConfig { return &c.conn }

// Define implements demo.Config.
func (c *config) Define(fs *flag.FlagSet) {
	fs.StringVar(&c.prefix, "prefix", "/orchestrator-example/leader", "etcd prefix (election and data live under it)")
	fs.IntVar(&c.controllers, "controllers", 3, "number of controllers campaigning")
	fs.DurationVar(&c.duration, "duration", 10*time.Second, "how long to run")
	fs.DurationVar(&c.killAfter, "kill-after", 3*time.Second, "revoke each leader's lease this long after it won (0: never)")
	fs.DurationVar(&c.interval, "interval", 50*time.Millisecond, "the leader worker's timer interval (one write per Tick)")
	fs.IntVar(&c.ttl, "ttl", 5, "session lease TTL in seconds")
	fs.StringVar(&c.metricsAddr, "metrics-addr", "", "serve /metrics on this address, e.g. 127.0.0.1:9090 (default: off)")
}

// Check implements demo.Config; it also normalizes --prefix.
func (c *config) Check() error {
	c.prefix = util.NormalizePrefix(c.prefix).String()
	return demo.FirstError(
		demo.AtLeast("--controllers", c.controllers, 1),
		demo.Positive("--duration", c.duration),
		demo.NotNegative("--kill-after", c.killAfter),
		demo.Positive("--interval", c.interval),
		demo.AtLeast("--ttl", c.ttl, 1), // seconds
	)
}

func main() {
	os.Exit(runMain(os.Args[1:], os.Stdout, os.Stderr))
}

// runMain is the whole program: it parses args, runs the demo and returns the
// exit code (0 OK, 1 error or broken invariant, 2 bad flags).
func runMain(args []string, stdout, stderr io.Writer) int {
	return demo.Program[config]("leader", about, args, stdout, stderr, run)
}

// run runs the controllers for cfg.duration, printing to out, then verifies
// the log.
func run(ctx context.Context, cfg config, out io.Writer) (bool, error) {
	env, err := demo.Setup(ctx, cfg.conn, cfg.metricsAddr, out, fmt.Sprintf("leader: %d controllers under %s, %v, leaders killed after %v",
		cfg.controllers, cfg.prefix, cfg.duration, cfg.killAfter))
	if err != nil {
		return false, err
	}
	defer env.Close()
	cluster, reg := env.Cluster, env.Registry

	runCtx, cancel := context.WithTimeout(ctx, cfg.duration)
	defer cancel()
	h := &history{start: time.Now(), out: out}
	var wg sync.WaitGroup
	for i := range cfg.controllers {
		cli, err := cluster.NewClient() // one client per controller, as in separate processes
		if err != nil {
			cancel()
			wg.Wait()
			return false, err
		}
		c := &controller{name: fmt.Sprintf("c%d", i+1), cli: cli, cfg: cfg, reg: reg, history: h}
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.run(runCtx)
		}()
	}
	wg.Wait()

	vctx, vcancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer vcancel()
	ok, err := verify(vctx, cluster.Client, cfg.prefix, h)
	if err != nil {
		return false, err
	}
	commits := demo.SumBy(reg, "orchestrator_commits_total")
	var parts []string
	for role, n := range commits {
		if role != "" {
			parts = append(parts, fmt.Sprintf("%s=%.0f", role, n))
		}
	}
	sort.Strings(parts)
	fmt.Fprintf(out, "commits by role (metrics): %s\n", strings.Join(parts, " "))
	return ok && h.violations.Load() == 0, nil
}

// history records who led, for the report.
type history struct {
	start      time.Time
	out        io.Writer
	mu         sync.Mutex
	reigns     []reign
	violations atomic.Int64
}

type reign struct {
	name string
	term int64
}

func (h *history) logf(format string, args ...any) {
	fmt.Fprintf(h.out, "[%5.2fs] %s\n", time.Since(h.start).Seconds(), fmt.Sprintf(format, args...))
}

func (h *history) won(name string, term int64) {
	h.mu.Lock()
	h.reigns = append(h.reigns, reign{name: name, term: term})
	h.mu.Unlock()
	h.logf("%s leads (term %d)", name, term)
}

// controller campaigns with leader.Run, leads while it can, and campaigns
// again.
type controller struct {
	name    string
	cli     *clientv3.Client
	cfg     config
	reg     prometheus.Registerer
	history *history

	mu      sync.Mutex
	reactor *leaderReactor // of the current term
	kill    *time.Timer    // revokes the current term's lease
}

// run campaigns and leads until ctx is done.
func (c *controller) run(ctx context.Context) {
	err := leader.Run(ctx, c.cli, c.cfg.prefix+"/election", c.name, c.newTerm,
		leader.WithSessionTTL(c.cfg.ttl),
		leader.WithOnElected(func(term leader.Term) { c.elected(ctx, term) }),
		leader.WithOnTermEnd(c.termEnded))
	if !orchestrator.IsCleanStop(err) {
		c.history.logf("%s: %v", c.name, err)
	}
}

// newTerm builds the worker of a term: a fresh state and reactor.
func (c *controller) newTerm(_ context.Context, term leader.Term) (leader.Worker, error) {
	state := newLedgerState(c.cfg.prefix + "/data")
	reactor := &leaderReactor{name: c.name, term: term.Rev, state: state, history: c.history}
	c.mu.Lock()
	c.reactor = reactor
	c.mu.Unlock()
	return leader.Worker{
		Prefix: c.cfg.prefix + "/data", Reactor: reactor, State: state,
		TimerInterval: c.cfg.interval, Role: c.name,
		Options: []orchestrator.Option{orchestrator.WithMetrics(c.reg)},
	}, nil
}

// elected records the term and arms the simulated crash.
func (c *controller) elected(ctx context.Context, term leader.Term) {
	c.history.won(c.name, term.Rev)
	if c.cfg.killAfter <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.kill = time.AfterFunc(c.cfg.killAfter, func() {
		c.history.logf("%s: revoking its lease (simulated crash)", c.name)
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_, _ = c.cli.Revoke(rctx, term.Lease)
	})
}

// termEnded reports why the term ended.
func (c *controller) termEnded(_ leader.Term, err error) {
	c.mu.Lock()
	if c.kill != nil {
		c.kill.Stop()
	}
	ticks := c.reactor.seq
	c.mu.Unlock()
	switch {
	case orchestrator.IsCleanStop(err):
		c.history.logf("%s stops leading after %d ticks: stopped", c.name, ticks)
	case errors.Is(err, orchestrator.ErrNotOwner):
		c.history.logf("%s stops leading after %d ticks: fenced off (%v)", c.name, ticks, orchestrator.ErrNotOwner)
	case errors.Is(err, orchestrator.ErrEtcdSessionDone):
		c.history.logf("%s stops leading after %d ticks: session lost (%v)", c.name, ticks, orchestrator.ErrEtcdSessionDone)
	default:
		c.history.logf("%s stops leading after %d ticks: %v", c.name, ticks, err)
	}
}

// ledgerState is a hand-written ReactorState: a counter key and a set of log
// keys.
type ledgerState struct {
	counterKey util.EtcdKey
	logDir     string
	counter    int64
	logs       map[util.EtcdKey]struct{}
	patches    [][]orchestrator.DataPatch
}

func newLedgerState(prefix string) *ledgerState {
	return &ledgerState{
		counterKey: util.NewEtcdKey(prefix + "/counter"),
		logDir:     prefix + "/log/",
		logs:       make(map[util.EtcdKey]struct{}),
	}
}

// Update implements orchestrator.ReactorState.
func (s *ledgerState) Update(key util.EtcdKey, value []byte, _ bool) error {
	switch {
	case key == s.counterKey:
		s.counter = 0
		if value != nil {
			n, err := strconv.ParseInt(string(value), 10, 64)
			if err != nil {
				return fmt.Errorf("counter: %w", err)
			}
			s.counter = n
		}
	case strings.HasPrefix(key.String(), s.logDir):
		if value == nil {
			delete(s.logs, key)
		} else {
			s.logs[key] = struct{}{}
		}
	}
	return nil
}

// GetPatches implements orchestrator.ReactorState.
func (s *ledgerState) GetPatches() [][]orchestrator.DataPatch {
	p := s.patches
	s.patches = nil
	return p
}

// appendEntry is a DataPatch over two keys: it bumps the counter and writes
// the new value to a log key named at Tick time. If it ever landed twice, the
// counter would run ahead of the log.
type appendEntry struct {
	counter, log util.EtcdKey
}

// Patch implements orchestrator.DataPatch.
func (p appendEntry) Patch(values map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
	var n int64
	if v := values[p.counter]; v != nil {
		var err error
		if n, err = strconv.ParseInt(string(v), 10, 64); err != nil {
			return fmt.Errorf("counter: %w", err)
		}
	}
	next := []byte(strconv.FormatInt(n+1, 10))
	values[p.counter], values[p.log] = next, next
	changed[p.counter], changed[p.log] = struct{}{}, struct{}{}
	return nil
}

// leaderReactor is the leader's Reactor: one log entry per Tick.
type leaderReactor struct {
	name    string
	term    int64
	seq     int
	state   *ledgerState
	history *history
}

// Tick checks the invariant on the snapshot and queues the next entry.
func (r *leaderReactor) Tick(_ context.Context, s orchestrator.ReactorState) (orchestrator.ReactorState, error) {
	if got := int64(len(r.state.logs)); got != r.state.counter {
		if r.history.violations.Add(1) <= 5 {
			r.history.logf("%s: INVARIANT BROKEN: counter %d, %d log keys", r.name, r.state.counter, got)
		}
	}
	r.seq++
	log := fmt.Sprintf("%s%012d/%s/%06d", r.state.logDir, r.term, r.name, r.seq)
	r.state.patches = append(r.state.patches, []orchestrator.DataPatch{
		appendEntry{counter: r.state.counterKey, log: util.NewEtcdKey(log)},
	})
	return s, nil
}
