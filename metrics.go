package orchestrator

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// MetricsNamespace is the namespace of every metric the worker exports.
const MetricsNamespace = "orchestrator"

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
	lastTick      *prometheus.GaugeVec
	revision      *prometheus.GaugeVec
}

// newMetrics makes the collectors and registers them with reg; with a nil reg
// they record into collectors nobody scrapes.
func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	labels := []string{"role"}
	m := &metrics{
		txnBytes: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: MetricsNamespace, Name: "txn_size_bytes",
			Help:    "Size of the keys and values of each commit Txn.",
			Buckets: prometheus.ExponentialBuckets(64, 4, 10),
		}, labels),
		txnDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: MetricsNamespace, Name: "txn_duration_seconds",
			Help:    "Duration of each commit Txn round trip.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, labels),
		tickDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: MetricsNamespace, Name: "tick_duration_seconds",
			Help:    "Duration of each Reactor.Tick call.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 18),
		}, labels),
		commits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: MetricsNamespace, Name: "commits_total",
			Help: "Commit Txns that landed.",
		}, labels),
		conflicts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: MetricsNamespace, Name: "conflicts_total",
			Help: "Commit Txns whose compares failed; their patches are re-run.",
		}, labels),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: MetricsNamespace, Name: "retries_total",
			Help: "Retried etcd requests (load pages, watches, commit resolutions) after an error.",
		}, labels),
		patches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: MetricsNamespace, Name: "patch_groups_applied_total",
			Help: "Patch groups whose changes landed in etcd (no-op groups excluded).",
		}, labels),
		stateKeys: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: MetricsNamespace, Name: "state_keys",
			Help: "Keys in the worker's state.",
		}, labels),
		revisionLag: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: MetricsNamespace, Name: "revision_lag",
			Help: "Revisions between the newest watch revision seen and the state shown to the last Tick.",
		}, labels),
		outages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: MetricsNamespace, Name: "outages_total",
			Help: "Times etcd became unreachable (a request or the watch failed and had to be retried).",
		}, labels),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: MetricsNamespace, Name: "reloads_total",
			Help: "Full reloads of the state after a compacted watch revision.",
		}, labels),
		ticks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: MetricsNamespace, Name: "ticks_total",
			Help: "Reactor.Tick calls.",
		}, labels),
		unknownCommit: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: MetricsNamespace, Name: "unknown_commit_outcomes_total",
			Help: "Commit Txns whose outcome was unknown and had to be resolved.",
		}, labels),
		lastTick: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: MetricsNamespace, Name: "last_tick_timestamp_seconds",
			Help: "Unix time when Reactor.Tick last started; absent while the worker is not running.",
		}, labels),
		revision: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: MetricsNamespace, Name: "applied_revision",
			Help: "Revision the state is known complete up to; absent while the worker is not running.",
		}, labels),
	}
	rg := &registrar{reg: reg}
	m.txnBytes = register(rg, m.txnBytes)
	m.txnDuration = register(rg, m.txnDuration)
	m.tickDuration = register(rg, m.tickDuration)
	m.commits = register(rg, m.commits)
	m.conflicts = register(rg, m.conflicts)
	m.retries = register(rg, m.retries)
	m.patches = register(rg, m.patches)
	m.stateKeys = register(rg, m.stateKeys)
	m.revisionLag = register(rg, m.revisionLag)
	m.outages = register(rg, m.outages)
	m.reloads = register(rg, m.reloads)
	m.ticks = register(rg, m.ticks)
	m.unknownCommit = register(rg, m.unknownCommit)
	m.lastTick = register(rg, m.lastTick)
	m.revision = register(rg, m.revision)
	if rg.err != nil {
		rg.rollback()
		return nil, rg.err
	}
	return m, nil
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
	ticks, unknownCommit                                   prometheus.Counter
	stateKeys, revisionLag, lastTick, appliedRevision      prometheus.Gauge

	// forget removes the role's gauge series that describe a running worker
	// (lag, last Tick, applied revision), so that they do not stay at stale
	// values after Run returns. state_keys stays: the worker keeps its state
	// across runs.
	forget func()
}

func (m *metrics) forRole(role string) *roleMetrics {
	l := prometheus.Labels{"role": role}
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
		stateKeys:       m.stateKeys.With(l),
		revisionLag:     m.revisionLag.With(l),
		lastTick:        m.lastTick.With(l),
		appliedRevision: m.revision.With(l),
		forget: func() {
			for _, g := range []*prometheus.GaugeVec{m.revisionLag, m.lastTick, m.revision} {
				g.Delete(l)
			}
		},
	}
}
