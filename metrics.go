package orchestrator

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
)

// metricsNamespace is the namespace of every metric the worker exports.
const metricsNamespace = "orchestrator"

// WithMetrics registers the worker's metrics with reg (all labelled by the
// role given to Run). Several workers may share one registerer: collectors
// already registered by another worker are reused, so give each worker of a
// registerer its own role, or their gauges overwrite each other. A nil reg is
// ignored. Default: no metrics, nothing registered anywhere.
func WithMetrics(reg prometheus.Registerer) Option {
	return optionFunc(func(o *options) {
		if reg != nil {
			o.metricsRegisterer = reg
		}
	})
}

// metrics are the collectors of one registerer, shared by every worker that
// registered with it.
type metrics struct {
	txnBytes      *prometheus.HistogramVec
	txnDuration   *prometheus.HistogramVec
	tickDuration  *prometheus.HistogramVec
	commits       *prometheus.CounterVec
	conflicts     *prometheus.CounterVec
	retries       *prometheus.CounterVec
	patches       *prometheus.CounterVec
	stateKeys     *prometheus.GaugeVec
	revisionLag   *prometheus.GaugeVec
	outages       *prometheus.CounterVec
	reloads       *prometheus.CounterVec
	ticks         *prometheus.CounterVec
	unknownCommit *prometheus.CounterVec
	resends       *prometheus.CounterVec
	lastTick      *prometheus.GaugeVec
	revision      *liveGaugeVec
	sourceLag     *prometheus.GaugeVec

	// Of a Source, labelled by its prefix.
	sourceKeys     *prometheus.GaugeVec
	sourceReloads  *prometheus.CounterVec
	sourceRetries  *prometheus.CounterVec
	sourceWatchLag *prometheus.GaugeVec
}

// newMetrics makes the collectors and registers them with reg; with a nil reg
// they record into collectors nobody scrapes.
func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	rg := &registrar{reg: reg}
	m := &metrics{
		txnBytes: histogram(rg, "txn_size_bytes", "Size of the keys and values of each commit Txn.",
			prometheus.ExponentialBuckets(64, 4, 10)),
		txnDuration: histogram(rg, "txn_duration_seconds", "Duration of each commit Txn round trip.",
			prometheus.ExponentialBuckets(0.0005, 2, 16)),
		tickDuration: histogram(rg, "tick_duration_seconds", "Duration of each Reactor.Tick call.",
			prometheus.ExponentialBuckets(0.0001, 2, 18)),
		commits:   counter(rg, "commits_total", "Commit Txns that landed."),
		conflicts: counter(rg, "conflicts_total", "Commit Txns whose compares failed; their patches are re-run."),
		retries: counter(rg, "retries_total",
			"Retried etcd requests (load pages, watches, commit resolutions) after an error."),
		patches: counter(rg, "patch_groups_applied_total",
			"Patch groups whose changes landed in etcd (no-op groups excluded)."),
		stateKeys: gauge(rg, "state_keys", "Keys in the worker's state."),
		revisionLag: gauge(rg, "revision_lag",
			"Revisions between the newest watch revision seen and the state shown to the last Tick."),
		outages: counter(rg, "outages_total",
			"Times etcd became unreachable (a request or the watch failed and had to be retried)."),
		reloads: counter(rg, "reloads_total", "Full reloads of the state after a compacted watch revision."),
		ticks:   counter(rg, "ticks_total", "Reactor.Tick calls."),
		unknownCommit: counter(rg, "unknown_commit_outcomes_total",
			"Commit Txns whose outcome was unknown and had to be resolved."),
		resends: counter(rg, "commit_resends_total",
			"Commit Txns of a pipelined chain sent again unchanged: etcd evaluated them before the Txn before them landed."),
		lastTick: gauge(rg, "last_tick_timestamp_seconds",
			"Unix time when Reactor.Tick last started; absent while the worker is not running."),
		revision: register(rg, &liveGaugeVec{
			GaugeVec: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: metricsNamespace, Name: "applied_revision",
				Help: "Revision the state is known complete up to; absent while the worker is not running."}, []string{roleLabel}),
			runs: map[string]int{},
		}),
		sourceLag: gauge(rg, "source_lag_revisions",
			"Revisions between the worker's Source's copy and the state shown to the last Tick."),
		sourceKeys: sourceVec(rg, gaugeVec, "source_keys", "Keys in the Source's copy."),
		sourceReloads: sourceVec(rg, counterVec, "source_reloads_total",
			"Reloads of the Source's copy after a compacted watch revision."),
		sourceRetries: sourceVec(rg, counterVec, "source_retries_total",
			"Retried reads of the Source (loads, watches, probes) after an error."),
		sourceWatchLag: sourceVec(rg, gaugeVec, "source_watch_lag_revisions",
			"Revisions between the newest revision etcd reported to the Source and its copy."),
	}
	if rg.err != nil {
		rg.rollback()
		return nil, rg.err
	}
	return m, nil
}

// labelValue returns s as the value of a metric label. Prometheus takes
// only UTF-8 and panics on anything else, while a role is any string and a
// prefix any bytes (etcd keys are). Valid UTF-8 is kept as it is; each byte
// that is not becomes \xNN, so two prefixes that differ only there keep
// series of their own.
func labelValue(s string) string {
	if utf8.ValidString(s) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && n == 1 {
			fmt.Fprintf(&b, `\x%02x`, s[i])
		} else {
			b.WriteString(s[i : i+n])
		}
		i += n
	}
	return b.String()
}

// roleLabel is the label of a worker's metrics.
const roleLabel = "role"

// gaugeVec and counterVec make a Source's collectors, labelled by its prefix.
func gaugeVec(name, help string) *prometheus.GaugeVec {
	return prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: metricsNamespace, Name: name, Help: help},
		[]string{"source"})
}

func counterVec(name, help string) *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: metricsNamespace, Name: name, Help: help},
		[]string{"source"})
}

func sourceVec[C prometheus.Collector](rg *registrar, mk func(name, help string) C, name, help string) C {
	return register(rg, mk(name, help))
}

func counter(rg *registrar, name, help string) *prometheus.CounterVec {
	return register(rg, prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metricsNamespace, Name: name, Help: help}, []string{roleLabel}))
}

func gauge(rg *registrar, name, help string) *prometheus.GaugeVec {
	return register(rg, prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: metricsNamespace, Name: name, Help: help}, []string{roleLabel}))
}

func histogram(rg *registrar, name, help string, buckets []float64) *prometheus.HistogramVec {
	return register(rg, prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: metricsNamespace, Name: name, Help: help, Buckets: buckets}, []string{roleLabel}))
}

// registrar registers collectors with a registerer (nil: none), remembering
// the first error and what it registered so that a failure can be undone.
type registrar struct {
	reg   prometheus.Registerer
	err   error
	added []prometheus.Collector
}

// register registers c, or returns the collector of the same description
// that another worker already registered.
func register[C prometheus.Collector](rg *registrar, c C) C {
	if rg.err != nil || rg.reg == nil {
		return c
	}
	if err := rg.reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing
			}
		}
		rg.err = err
		return c
	}
	rg.added = append(rg.added, c)
	return c
}

// rollback unregisters what this registrar registered.
func (rg *registrar) rollback() {
	for _, c := range rg.added {
		rg.reg.Unregister(c)
	}
}

// roleMetrics are the metrics of one Run, curried with its role.
type roleMetrics struct {
	txnBytes, txnDuration, tickDuration                    prometheus.Observer
	commits, conflicts, retries, patches, outages, reloads prometheus.Counter
	ticks, unknownCommit, resends                          prometheus.Counter
	stateKeys, revisionLag, lastTick, appliedRevision      prometheus.Gauge
	sourceLag                                              prometheus.Gauge

	// forget removes the role's gauge series that describe a running worker
	// (lag, last Tick, applied revision), so that they do not stay at stale
	// values after Run returns (once no other running worker of the same
	// registerer has the same role). state_keys stays: the worker keeps its state
	// across runs.
	forget func()
}

func (m *metrics) forRole(role string) *roleMetrics {
	l := prometheus.Labels{roleLabel: role}
	m.revision.join(role)
	return &roleMetrics{
		txnBytes:        m.txnBytes.With(l),
		txnDuration:     m.txnDuration.With(l),
		tickDuration:    m.tickDuration.With(l),
		commits:         m.commits.With(l),
		conflicts:       m.conflicts.With(l),
		retries:         m.retries.With(l),
		patches:         m.patches.With(l),
		outages:         m.outages.With(l),
		reloads:         m.reloads.With(l),
		ticks:           m.ticks.With(l),
		unknownCommit:   m.unknownCommit.With(l),
		resends:         m.resends.With(l),
		stateKeys:       m.stateKeys.With(l),
		revisionLag:     m.revisionLag.With(l),
		lastTick:        m.lastTick.With(l),
		appliedRevision: m.revision.With(l),
		sourceLag:       m.sourceLag.With(l),
		forget: func() {
			if m.revision.leave(role) {
				for _, g := range []*prometheus.GaugeVec{m.revisionLag, m.lastTick, m.revision.GaugeVec, m.sourceLag} {
					g.Delete(l)
				}
			}
		},
	}
}

// liveGaugeVec is the applied_revision gauge with a count of the running
// workers of each role that publish it. The workers of one registerer share
// it (see register), so a Run that returns removes the live gauges only when
// no other Run with the same role still publishes them: a deleted series
// would detach the other Run's gauges, which then never reappear.
type liveGaugeVec struct {
	*prometheus.GaugeVec
	mu   sync.Mutex
	runs map[string]int
}

func (v *liveGaugeVec) join(role string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.runs[role]++
}

// leave reports whether the last Run of role left.
func (v *liveGaugeVec) leave(role string) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.runs[role]--
	if v.runs[role] > 0 {
		return false
	}
	delete(v.runs, role)
	return true
}
