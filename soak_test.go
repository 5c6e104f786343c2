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
	"google.golang.org/grpc"

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
	rng := rand.New(rand.NewPCG(seed, 7))
	t.Logf("soak for %v, seed %d", duration, seed)

	c := etcdtest.NewCluster(t, 3)
	direct := c.Client(t)
	reg := prometheus.NewRegistry()
	probe := newTxnProbe()
	newClient := func(int) *clientv3.Client {
		return faultClient(t, []grpc.DialOption{probe.dialOption()}, c.Endpoints()...)
	}
	opts := faultOptions(reg, zap.NewNop())
	bank := newBankWorld("/soak/bank", 6, 10)
	bank.tolerate = true
	counter := newCounterWorld("/soak/counter", 3, false)
	counter.tolerate = true
	runFor := duration + 5*time.Minute
	bankWorkers := startBank(t, bank, newClient, reg, zap.NewNop(), runFor)
	counterWorkers := startCounter(t, counter, newClient, opts, runFor)

	var violations []string
	violate := func(format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		violations = append(violations, msg)
		t.Logf("VIOLATION: %s", msg)
	}
	// progressed waits until both worlds emitted a few more groups.
	progressed := func(what string) bool {
		b, n := bank.emitted.Load()+5, counter.emitted.Load()+3
		deadline := time.Now().Add(time.Minute)
		for bank.emitted.Load() < b || counter.emitted.Load() < n {
			if err := bankWorkers.failed(); err != nil {
				violate("a bank worker stopped: %v", err)
				return false
			}
			if err := counterWorkers.failed(); err != nil {
				violate("a counter worker stopped: %v", err)
				return false
			}
			if time.Now().After(deadline) {
				violate("no progress within a minute after %s", what)
				return false
			}
			time.Sleep(10 * time.Millisecond)
		}
		return true
	}
	ctx, cancel := context.WithTimeout(context.Background(), runFor)
	defer cancel()
	proxies := func() []*etcdtest.Proxy {
		ps := make([]*etcdtest.Proxy, c.Size())
		for i := range ps {
			ps[i] = c.Member(i).Proxy()
		}
		return ps
	}()
	between := func(lo, hi time.Duration) time.Duration { return lo + rand.N(hi-lo) }
	// external writes and compaction through the leader's embedded server,
	// which the cut proxies do not stop.
	compact := func(noise bool) {
		lead := c.Member(c.Leader(t))
		if noise {
			for _, prefix := range []string{bank.prefix, counter.prefix} {
				_, err := lead.Etcd().Server.Put(ctx, &etcdserverpb.PutRequest{
					Key: []byte(fmt.Sprintf("%s/noise/%d", prefix, rng.IntN(5))), Value: []byte("x"),
				})
				require.NoError(t, err)
			}
		}
		_, err := lead.Server().CompactAll(ctx)
		require.NoError(t, err)
	}

	faults := map[string]int{}
	kinds := []struct {
		name   string
		inject func()
	}{
		{"cut one member", func() {
			p := proxies[rng.IntN(len(proxies))]
			p.Pause()
			time.Sleep(between(300*time.Millisecond, 2*time.Second))
			p.Resume()
		}},
		{"cut all members", func() {
			for _, p := range proxies {
				p.Pause()
			}
			time.Sleep(between(300*time.Millisecond, 2*time.Second))
			for _, p := range proxies {
				p.Resume()
			}
		}},
		{"delay", func() {
			d := between(20*time.Millisecond, 150*time.Millisecond)
			for _, p := range proxies {
				p.SetDelay(d)
			}
			time.Sleep(between(time.Second, 3*time.Second))
			for _, p := range proxies {
				p.SetDelay(0)
			}
		}},
		{"commit cut", func() {
			f := commitFaults[rng.IntN(len(commitFaults))]
			for _, p := range proxies {
				p.SetDelay(commitFaultDelay)
			}
			t0 := probe.next(t, time.Minute)
			sleepUntil(t0.Add(f.at))
			for _, p := range proxies {
				if f.blackhole {
					p.Blackhole()
				} else {
					p.Pause()
				}
				p.SetDelay(0)
			}
			time.Sleep(f.outage)
			for _, p := range proxies {
				p.Resume()
			}
		}},
		{"compaction", func() { compact(false) }},
		{"compaction during an outage", func() {
			for _, p := range proxies {
				p.Pause()
			}
			compact(true)
			time.Sleep(between(100*time.Millisecond, time.Second))
			for _, p := range proxies {
				p.Resume()
			}
		}},
		{"leader stop and restart", func() {
			lead := c.Leader(t)
			c.StopMember(t, lead)
			time.Sleep(between(500*time.Millisecond, 3*time.Second))
			c.RestartMember(t, lead)
		}},
	}

	start := time.Now()
	lastReport := start
	if progressed("the start") {
		for time.Since(start) < duration {
			k := kinds[rng.IntN(len(kinds))]
			k.inject()
			faults[k.name]++
			if !progressed(k.name) {
				break
			}
			if time.Since(lastReport) > 30*time.Second {
				lastReport = time.Now()
				t.Logf("%v: %d faults, bank groups %d, counter groups %d, violations %d",
					time.Since(start).Round(time.Second), total(faults), bank.emitted.Load(), counter.emitted.Load(),
					len(violations)+int(bank.violations.count()+counter.violations.count()))
			}
		}
	}

	// Stop, and check etcd's contents against what the workers emitted.
	bank.stop.Store(true)
	counter.stop.Store(true)
	for name, err := range bankWorkers.wait(t, 2*time.Minute) {
		if err != nil {
			violate("%s returned %v", name, err)
		}
	}
	for name, err := range counterWorkers.wait(t, 2*time.Minute) {
		if err != nil {
			violate("%s returned %v", name, err)
		}
	}
	checkCtx, checkCancel := context.WithTimeout(context.Background(), time.Minute)
	defer checkCancel()
	if err := bank.checkEtcd(checkCtx, t, direct); err != nil {
		violate("etcd's final bank contents: %v", err)
	}
	if err := counter.check(checkCtx, t, direct); err != nil {
		violate("etcd's final counter contents: %v", err)
	}
	if n := bank.violations.count(); n > 0 {
		violate("%d bank invariant violations in Ticks, first: %v", n, bank.violations.firstErr())
	}
	if n := counter.violations.count(); n > 0 {
		violate("%d counter invariant violations in Ticks, first: %v", n, counter.violations.firstErr())
	}

	var kindLines []string
	for k, n := range faults {
		kindLines = append(kindLines, fmt.Sprintf("  %-30s %d", k, n))
	}
	sort.Strings(kindLines)
	report := fmt.Sprintf(`soak report (seed %d, %v):
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
		bank.emitted.Load(), counter.emitted.Load(),
		metricSum(t, reg, "orchestrator_conflicts_total"),
		metricSum(t, reg, "orchestrator_unknown_commit_outcomes_total"),
		metricSum(t, reg, "orchestrator_reloads_total"),
		metricSum(t, reg, "orchestrator_outages_total"),
		total(faults), strings.Join(kindLines, "\n"), len(violations))
	t.Log(report)
	require.Empty(t, violations, "invariant violations")
}

func total(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}
