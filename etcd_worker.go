package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"

	"github.com/etcdworker/orchestrator/util"
)

// EtcdWorker keeps a ReactorState in sync with the keys under a prefix in
// etcd, ticks a Reactor on consistent snapshots and commits the patches it
// leaves. Create it with NewEtcdWorker and start it with Run.
type EtcdWorker struct {
	client  *clientv3.Client
	prefix  util.EtcdPrefix
	ks      keyspace
	reactor Reactor
	state   ReactorState
	opts    options
	metrics *metrics
	limits  txnLimits

	running atomic.Bool
	board   *statusBoard

	// src is the Source the worker follows: WithSource's, or one of its
	// own. cur and view are where the state stands in it; they are kept
	// across runs so that a second Run only tells the state what changed.
	src  *Source
	cur  *cursor
	view view
}

// NewEtcdWorker returns a worker for the keys under prefix + "/". The prefix
// is normalized with util.NormalizePrefix. client, reactor and initState must
// not be nil; the options are validated here and a bad one is reported as an
// error wrapping ErrInvalidArgument whose message names the option (for
// example "WithRequestTimeout").
func NewEtcdWorker(client *clientv3.Client, prefix string, reactor Reactor,
	initState ReactorState, opts ...Option,
) (*EtcdWorker, error) {
	switch {
	case client == nil:
		return nil, fmt.Errorf("%w: nil etcd client", ErrInvalidArgument)
	case isNil(reactor):
		return nil, fmt.Errorf("%w: nil reactor", ErrInvalidArgument)
	case isNil(initState):
		return nil, fmt.Errorf("%w: nil initial state", ErrInvalidArgument)
	}
	o := defaultOptions()
	for _, opt := range opts {
		if opt != nil {
			opt.apply(&o)
		}
	}
	p := util.NormalizePrefix(prefix)
	if err := checkPrefix(p); err != nil {
		return nil, err
	}
	ks := newKeyspace(p)
	if err := o.validate(); err != nil {
		return nil, err
	}
	if sc, ok := initState.(ScopedState); ok {
		if err := sc.CheckScope(p); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalidArgument, err)
		}
	}
	limits, err := newTxnLimits(&o, ks)
	if err != nil {
		return nil, err
	}
	src := o.source
	if src != nil {
		if err := src.checkWorkerPrefix(p); err != nil {
			return nil, err
		}
		// One clock for the Source and its workers: the worker measures
		// the Source's proofs of freshness against its own now.
		o.clock = src.opts.clock
	} else {
		src, err = newSource(client, p, sourceOptions{
			logger:            o.logger,
			requestTimeout:    o.requestTimeout,
			pageSize:          o.pageSize,
			metricsRegisterer: o.metricsRegisterer,
			clock:             o.clock,
		})
		if err != nil {
			return nil, err
		}
	}
	m, err := newMetrics(o.metricsRegisterer)
	if err != nil {
		return nil, fmt.Errorf("orchestrator: register metrics: %w", err)
	}
	return &EtcdWorker{
		client:  client,
		prefix:  p,
		ks:      ks,
		reactor: reactor,
		state:   initState,
		opts:    o,
		limits:  limits,
		metrics: m,
		board:   newStatusBoard(),
		src:     src,
		cur:     src.newCursor(ks),
		view:    view{keys: -1},
	}, nil
}

// Run loads the state, then watches the prefix, ticks the reactor and
// commits its patches until one of the conditions below. It blocks; every
// goroutine it starts has ended when it returns.
//
// The worker follows its Source (WithSource's, or one of its own): the
// Source reads every key under its prefix at one revision, then watches it,
// applying every watch response whole to its copy of the keys. The worker
// takes a first snapshot from that copy (ReactorState.Update with isInit =
// true), proven current by a read sent after Run began, and then catches
// up to the copy's newest revision whenever it has news: each changed key
// once, with its newest value, so Tick always sees one revision. See
// Source.
//
// Tick runs when all of these hold: the initial load is done; no patches are
// pending; the state includes the worker's last commit; the newest proof
// that the state is current (a watch response, a progress notification or
// the load) is younger than the staleness bound (WithMaxStaleness, default
// 10s); and either the state changed since the last Tick or timerInterval has
// passed since it. Ticks are also rate limited by a token bucket of rate
// 1/timerInterval and burst 2: a Tick that is due but over the rate is
// delayed, not dropped. A timer Tick (no change) also
// waits until the bucket is full, so that timer Ticks never delay the Tick
// of a change: an idle worker ticks every timerInterval, a change is ticked
// at once unless changes already come faster than one per timerInterval,
// and the gap between two Ticks never exceeds two timerIntervals while the
// state is fresh.
//
// After each Tick the patches left in the state are committed, many groups
// per Txn, before the next Tick; when they need several Txns, up to
// WithPipelineDepth of them are in flight at once, still landing in order.
// Each Txn compares the keys its groups write and those they declare as read
// dependencies (ReadDependency, ReadRangeDependency); keys a group only reads
// without declaring them are not compared. A failed compare re-runs the
// remaining groups: at once on the values the failed Txn read back when its
// groups read only the keys they name (SingleDataPatch, ReadDependency), else
// once the watch has passed the conflicting revision. A Txn whose
// outcome is unknown (timeout, lost connection) is resolved through the
// worker's commit token before anything else happens, so every patch lands
// exactly once for each time it reports a change.
//
// Run returns:
//   - nil after the reactor returned ErrReactorFinished and the patches it
//     returned with it were committed;
//   - an error matching ctx.Err() when ctx is done (an in-flight commit is
//     resolved first; if etcd cannot tell within WithShutdownTimeout the
//     error also matches ErrCommitUnresolved), also when user code then
//     failed with an error of its own, which it matches too; a cancel
//     stops a catch-up between two Updates and a flush between two
//     groups' patches (nothing of that flush is sent);
//   - ErrEtcdSessionDone when session is non-nil and its lease is gone
//     (also ErrCommitUnresolved when a commit's outcome was unknown then:
//     the lease took the commit token, which would have told);
//   - ErrNotOwner when the fencing key (WithFencingKey) is gone, learnt
//     from a failed commit compare or from the fencing check, which reads
//     the key every progress interval: within about that interval of the
//     loss whether the worker commits or not, and no Tick runs once the
//     loss was seen;
//   - ErrEtcdTxnOpsExceed / ErrEtcdTxnSizeExceed when one group alone does
//     not fit a Txn (nothing of that commit is written);
//   - ErrKeyOutsidePrefix when a patch writes a key outside prefix + "/";
//   - the error of Tick, Update or Patch, wrapped; ErrPanic for a panic in
//     them;
//   - ErrEtcdUnavailable when etcd stayed unreachable for longer than
//     WithMaxOutage (default: no limit), counted from the send time of the
//     first request that failed (time spent in Tick or in successful reads
//     is not an outage); Run returns within about WithMaxOutage of the
//     outage's start, not after a whole request timeout;
//   - an error matching ErrEtcdRejected and etcd's own error (for example
//     errors.Is(err, rpctypes.ErrPermissionDenied)) when etcd rejected a
//     request in a way retrying cannot heal: permission denied (also a read
//     right revoked while running, found by the periodic head probe),
//     authentication failed, invalid argument, a request too large, or a
//     closed client; a commit cut by closing the client also matches
//     ErrCommitUnresolved;
//   - ErrCommitUnresolved when the outcome of a commit cannot be found out
//     because its commit token vanished (its lease expired during an
//     outage longer than WithCommitTokenTTL, or someone deleted it); Run
//     never guesses;
//   - ErrInvalidArgument for a non-positive timerInterval, ErrWorkerRunning
//     when the worker is already running.
//
// Compaction of the watched revision, lost connections, unknown commit
// outcomes and CAS conflicts are handled inside Run and do not end it.
func (w *EtcdWorker) Run(ctx context.Context, session *concurrency.Session,
	timerInterval time.Duration, role string,
) error {
	if ctx == nil {
		return fmt.Errorf("%w: nil context", ErrInvalidArgument)
	}
	if timerInterval <= 0 {
		return fmt.Errorf("%w: timer interval %v must be positive", ErrInvalidArgument, timerInterval)
	}
	if !w.running.CompareAndSwap(false, true) {
		return ErrWorkerRunning
	}
	defer w.running.Store(false)

	r := w.newRun(ctx, session, timerInterval, role)
	defer r.close() //nolint:contextcheck // the run carries Run's ctx
	err := r.loop() //nolint:contextcheck // the run carries Run's ctx
	switch {
	case err == nil:
	case ctx.Err() == nil:
		err = &runFailure{err: err} // not a stop, even if err matches a ctx error
	case !errors.Is(err, ctx.Err()):
		// The ctx ended and something failed on the way out, often because
		// of it (a Tick whose gRPC call returned codes.Canceled): Run's
		// error matches both.
		err = fmt.Errorf("%w (Run's ctx ended: %w)", err, ctx.Err())
	}
	if err != nil {
		r.log.Info("etcd worker stopped", zap.Error(err))
	} else {
		r.log.Info("etcd worker finished")
	}
	return err
}
