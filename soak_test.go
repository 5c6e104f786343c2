package orchestrator

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// soakEnv is the variable that enables TestSoak: a duration such as "10m"
// (make soak DURATION=10m sets it).
const soakEnv = "ORCHESTRATOR_SOAK"

// TestSoak repeats the fault suite with random faults for the duration in
// $ORCHESTRATOR_SOAK: six bank workers and three exactly-once counter
// workers on a 3-node cluster (each member behind a proxy) while members'
// links are cut, all links are cut, delayed, or cut while a commit is in
// flight, the history is compacted (also during an outage, past the
// workers' revision), and the leader is stopped and restarted. It prints
// the commits, the faults injected by kind and the invariant violations,
// and fails if there is any violation: a broken invariant in a Tick, a
// worker that stopped, no progress after a fault, or etcd's final contents
// not matching what the workers emitted.
func TestSoak(t *testing.T) {
	spec := os.Getenv(soakEnv)
	if spec == "" {
		t.Skipf("set %s to a duration (make soak DURATION=10m) to run the soak test", soakEnv)
	}
	duration, err := time.ParseDuration(spec)
	require.NoError(t, err, "%s=%q", soakEnv, spec)

	seed := uint64(time.Now().UnixNano())
	t.Logf("soak for %v, seed %d", duration, seed)
	runFor := duration + 5*time.Minute
	ctx, cancel := context.WithTimeout(context.Background(), runFor)
	defer cancel()
	s := newSoakRun(ctx, t, seed, runFor)

	start := time.Now()
	lastReport := start
	kinds := s.faultKinds()
	if s.progressed("the start") {
		for time.Since(start) < duration {
			k := kinds[s.rng.IntN(len(kinds))]
			k.inject()
			s.faults[k.name]++
			if !s.progressed(k.name) {
				break
			}
			if time.Since(lastReport) > 30*time.Second {
				lastReport = time.Now()
				t.Logf("%v: %d faults, bank groups %d, counter groups %d, violations %d",
					time.Since(start).Round(time.Second), total(s.faults), s.bank.emitted.Load(), s.counter.emitted.Load(),
					len(s.violations)+int(s.bank.violations.count()+s.counter.violations.count()))
			}
		}
	}

	s.stopAndCheck()
	t.Log(s.report(seed, start))
	require.Empty(t, s.violations, "invariant violations")
}

// soakRun is the world of TestSoak: a 3-node cluster, each member behind a
// proxy, the bank and counter workers on it, the faults injected and the
// violations seen.
type soakRun struct {
	t       *testing.T
	ctx     context.Context
	rng     *rand.Rand
	c       *etcdtest.Cluster
	direct  *clientv3.Client
	reg     *prometheus.Registry
	probe   *txnProbe
	proxies []*etcdtest.Proxy

	bank           *bankWorld
	counter        *counterWorld
	bankWorkers    *workerGroup
	counterWorkers *workerGroup

	faults     map[string]int
	violations []string
}

// newSoakRun starts the cluster and the workers, for at most runFor.
func newSoakRun(ctx context.Context, t *testing.T, seed uint64, runFor time.Duration) *soakRun {
	c := etcdtest.NewCluster(t, 3)    //nolint:contextcheck // the cluster lives as long as the test
	env := newTestEnv(t, onServer(c)) //nolint:contextcheck // the clients live as long as the test

	s := &soakRun{
		t: t, ctx: ctx, rng: rand.New(rand.NewPCG(seed, 7)), c: c, direct: env.cli,
		reg: env.reg, probe: newTxnProbe(), faults: map[string]int{},
	}
	newClient := func(int) *clientv3.Client {
		return env.client(t, s.probe.dialOption())
	}
	s.proxies = make([]*etcdtest.Proxy, c.Size())
	for i := range s.proxies {
		s.proxies[i] = c.Member(i).Proxy()
	}
	s.bank = newBankWorld("/soak/bank", 6, 10)
	s.bank.tolerate = true
	s.counter = newCounterWorld("/soak/counter", 3, false)
	s.counter.tolerate = true
	s.bankWorkers = startBank(t, s.bank, newClient, s.reg, zap.NewNop(), runFor)
	s.counterWorkers = startCounter(t, s.counter, newClient, faultOptions(s.reg, zap.NewNop()), runFor)
	return s
}

func (s *soakRun) violate(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	s.violations = append(s.violations, msg)
	s.t.Logf("VIOLATION: %s", msg)
}

// progressed waits until both worlds emitted a few more groups.
func (s *soakRun) progressed(what string) bool {
	b, n := s.bank.emitted.Load()+5, s.counter.emitted.Load()+3
	deadline := time.Now().Add(time.Minute)
	for s.bank.emitted.Load() < b || s.counter.emitted.Load() < n {
		if err := s.bankWorkers.failed(); err != nil {
			s.violate("a bank worker stopped: %v", err)
			return false
		}
		if err := s.counterWorkers.failed(); err != nil {
			s.violate("a counter worker stopped: %v", err)
			return false
		}
		if time.Now().After(deadline) {
			s.violate("no progress within a minute after %s", what)
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

// eachProxy calls fn on every member's proxy.
func (s *soakRun) eachProxy(fn func(p *etcdtest.Proxy)) {
	for _, p := range s.proxies {
		fn(p)
	}
}

func between(lo, hi time.Duration) time.Duration { return lo + rand.N(hi-lo) }

// compact compacts the history (after noise writes, if asked) through the
// leader's embedded server, which the cut proxies do not stop.
func (s *soakRun) compact(noise bool) {
	lead := s.c.Member(s.c.Leader(s.t))
	if noise {
		for _, prefix := range []string{s.bank.prefix, s.counter.prefix} {
			_, err := lead.Etcd().Server.Put(s.ctx, &etcdserverpb.PutRequest{
				Key: []byte(fmt.Sprintf("%s/noise/%d", prefix, s.rng.IntN(5))), Value: []byte("x"),
			})
			require.NoError(s.t, err)
		}
	}
	_, err := lead.Server().CompactAll(s.ctx)
	require.NoError(s.t, err)
}

// soakFault is one kind of fault the soak test injects.
type soakFault struct {
	name   string
	inject func()
}

// faultKinds returns the faults the soak test picks from.
func (s *soakRun) faultKinds() []soakFault {
	pause := func(p *etcdtest.Proxy) { p.Pause() }
	resume := func(p *etcdtest.Proxy) { p.Resume() }
	return []soakFault{
		{"cut one member", func() {
			p := s.proxies[s.rng.IntN(len(s.proxies))]
			p.Pause()
			time.Sleep(between(300*time.Millisecond, 2*time.Second))
			p.Resume()
		}},
		{"cut all members", func() {
			s.eachProxy(pause)
			time.Sleep(between(300*time.Millisecond, 2*time.Second))
			s.eachProxy(resume)
		}},
		{"delay", func() {
			d := between(20*time.Millisecond, 150*time.Millisecond)
			s.eachProxy(func(p *etcdtest.Proxy) { p.SetDelay(d) })
			time.Sleep(between(time.Second, 3*time.Second))
			s.eachProxy(func(p *etcdtest.Proxy) { p.SetDelay(0) })
		}},
		{"commit cut", s.commitCut},
		{"compaction", func() { s.compact(false) }},
		{"compaction during an outage", func() {
			s.eachProxy(pause)
			s.compact(true)
			time.Sleep(between(100*time.Millisecond, time.Second))
			s.eachProxy(resume)
		}},
		{"leader stop and restart", func() {
			lead := s.c.Leader(s.t)
			s.c.StopMember(s.t, lead)
			time.Sleep(between(500*time.Millisecond, 3*time.Second))
			s.c.RestartMember(s.t, lead)
		}},
	}
}

// commitCut cuts or stalls every link while a commit Txn is in flight.
func (s *soakRun) commitCut() {
	f := commitFaults[s.rng.IntN(len(commitFaults))]
	s.eachProxy(func(p *etcdtest.Proxy) { p.SetDelay(commitFaultDelay) })
	t0 := s.probe.next(s.t, time.Minute)
	sleepUntil(t0.Add(f.at))
	s.eachProxy(func(p *etcdtest.Proxy) {
		if f.blackhole {
			p.Blackhole()
		} else {
			p.Pause()
		}
		p.SetDelay(0)
	})
	time.Sleep(f.outage)
	s.eachProxy(func(p *etcdtest.Proxy) { p.Resume() })
}

// stopAndCheck stops the workers and checks etcd's contents against what
// they emitted.
func (s *soakRun) stopAndCheck() {
	s.bank.stop.Store(true)
	s.counter.stop.Store(true)
	for _, g := range []*workerGroup{s.bankWorkers, s.counterWorkers} {
		for name, err := range g.wait(s.t, 2*time.Minute) {
			if err != nil {
				s.violate("%s returned %v", name, err)
			}
		}
	}
	checkCtx, checkCancel := context.WithTimeout(context.Background(), time.Minute)
	defer checkCancel()
	if err := s.bank.checkEtcd(checkCtx, s.t, s.direct); err != nil {
		s.violate("etcd's final bank contents: %v", err)
	}
	if err := s.counter.check(checkCtx, s.t, s.direct); err != nil {
		s.violate("etcd's final counter contents: %v", err)
	}
	if n := s.bank.violations.count(); n > 0 {
		s.violate("%d bank invariant violations in Ticks, first: %v", n, s.bank.violations.firstErr())
	}
	if n := s.counter.violations.count(); n > 0 {
		s.violate("%d counter invariant violations in Ticks, first: %v", n, s.counter.violations.firstErr())
	}
}

// report is the soak test's summary.
func (s *soakRun) report(seed uint64, start time.Time) string {
	var kindLines []string
	for k, n := range s.faults {
		kindLines = append(kindLines, fmt.Sprintf("  %-30s %d", k, n))
	}
	sort.Strings(kindLines)
	t, reg := s.t, s.reg
	return fmt.Sprintf(`soak report (seed %d, %v):
commits (landed Txns):        %v
patch groups applied:         %v
bank groups emitted:          %d
counter groups emitted:       %d
conflicts:                    %v
unknown commit outcomes:      %v
reloads after compaction:     %v
outages noticed:              %v
faults injected:              %d
%s
invariant violations:         %d`,
		seed, time.Since(start).Round(time.Second),
		metricSum(t, reg, "orchestrator_commits_total"),
		metricSum(t, reg, "orchestrator_patch_groups_applied_total"),
		s.bank.emitted.Load(), s.counter.emitted.Load(),
		metricSum(t, reg, "orchestrator_conflicts_total"),
		metricSum(t, reg, "orchestrator_unknown_commit_outcomes_total"),
		metricSum(t, reg, "orchestrator_reloads_total"),
		metricSum(t, reg, "orchestrator_outages_total"),
		total(s.faults), strings.Join(kindLines, "\n"), len(s.violations))
}

func total(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}
