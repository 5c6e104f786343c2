package orchestrator

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
	"golang.org/x/time/rate"

	"github.com/etcdworker/orchestrator/util"
)

// reservedDir is the area under the prefix that the worker keeps for its own
// keys (the delete counter and the commit tokens). Keys there never reach the
// ReactorState and patches may not write them.
const reservedDir = "/__orchestrator/"

// slowTickThreshold is how long a Tick may take before it is logged as slow.
const slowTickThreshold = time.Second

// EtcdWorker keeps a ReactorState in sync with the keys under a prefix in
// etcd, ticks a Reactor on consistent snapshots and commits the patches it
// leaves. Create it with NewEtcdWorker and start it with Run.
type EtcdWorker struct {
	client  *clientv3.Client
	prefix  util.EtcdPrefix
	reactor Reactor
	state   ReactorState
	opts    options
	metrics *metrics
	limits  txnLimits

	// Derived key names under the prefix.
	watchKey   string // prefix + "/"
	reserved   string // prefix + reservedDir
	counterKey string

	running atomic.Bool

	// committed mirrors what the state has been told: every visible key with
	// its value and mod revision. It is kept across runs so that a second Run
	// only tells the state what changed.
	committed map[util.EtcdKey]kvEntry
	// values is the map of every committed value handed to DataPatch
	// implementations other than SingleDataPatch (which need the whole map);
	// nil until the first such patch runs, then kept in step with committed
	// (outside of a commit) by update. A worker whose patches are all
	// SingleDataPatch never pays for it.
	values map[util.EtcdKey][]byte
}

type kvEntry struct {
	value  []byte
	modRev int64
}

// NewEtcdWorker returns a worker for the keys under prefix + "/". The prefix
// is normalized with util.NormalizePrefix. client, reactor and initState must
// not be nil; the options are validated here and a bad one is reported as an
// error wrapping ErrInvalidArgument.
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
	w := &EtcdWorker{
		client:     client,
		prefix:     p,
		reactor:    reactor,
		state:      initState,
		opts:       o,
		watchKey:   p.String() + "/",
		reserved:   p.String() + reservedDir,
		counterKey: p.String() + reservedDir + "delete-counter",
		committed:  make(map[util.EtcdKey]kvEntry),
	}
	if err := w.validateOptions(); err != nil {
		return nil, err
	}
	m, err := newMetrics(o.metricsRegisterer)
	if err != nil {
		return nil, fmt.Errorf("orchestrator: register metrics: %w", err)
	}
	w.metrics = m
	return w, nil
}

// tokenValueMaxLen bounds the decimal commit sequence written to the token.
const tokenValueMaxLen = 20

// tokenKeyLen is the length of a commit token key (see newRun).
func (w *EtcdWorker) tokenKeyLen() int { return len(w.reserved) + len("token/") + 16 }

func (w *EtcdWorker) validateOptions() error {
	o := &w.opts
	if o.pageSize <= 0 {
		return fmt.Errorf("%w: page size %d must be positive", ErrInvalidArgument, o.pageSize)
	}
	if o.requestTimeout <= 0 || o.shutdownTimeout < 0 || o.maxOutage < 0 || o.maxStaleness <= 0 {
		return fmt.Errorf("%w: timeouts must be positive", ErrInvalidArgument)
	}
	if o.hasFencing && (o.fencingKey == "" || o.fencingRev <= 0) {
		return fmt.Errorf("%w: fencing key %q with create revision %d", ErrInvalidArgument, o.fencingKey, o.fencingRev)
	}
	// Every Txn compares the delete counter and the commit token and puts the
	// token; fencing adds a compare and a get. So max(compares, then, else) is
	// keys + 2 (+1 with fencing).
	l := txnLimits{maxOps: o.txnMaxOps, maxBytes: o.txnMaxBytes, overheadOps: 2}
	tokenLen := w.tokenKeyLen()
	l.overheadBytes = 3*tokenLen + tokenValueMaxLen + len(w.counterKey)
	l.deleteBytes = len(w.counterKey)
	if o.hasFencing {
		l.overheadOps++
		l.overheadBytes += 2 * len(o.fencingKey)
	}
	if l.maxOps < l.overheadOps+1 {
		return fmt.Errorf("%w: txn op limit %d leaves no room for a key (the worker needs %d)", ErrInvalidArgument, l.maxOps, l.overheadOps)
	}
	if l.maxBytes <= l.overheadBytes+l.deleteBytes {
		return fmt.Errorf("%w: txn byte limit %d leaves no room for a key (the worker needs %d)", ErrInvalidArgument, l.maxBytes, l.overheadBytes+l.deleteBytes)
	}
	w.limits = l
	return nil
}

// Run loads the state, then watches the prefix, ticks the reactor and
// commits its patches until one of the conditions below. It blocks; every
// goroutine it starts has ended when it returns.
//
// Loading reads every key under the prefix in pages pinned at one revision
// and feeds them to ReactorState.Update with isInit = true. The watch then
// resumes from the next revision; every watch response is applied whole
// before the reactor may tick, so Tick always sees one revision.
//
// Tick runs when all of these hold: the initial load is done; no patches are
// pending; the state includes the worker's last commit; the newest proof
// that the state is current (a watch response, a progress notification or
// the load) is younger than the staleness bound (WithMaxStaleness, default
// 10s); and either the state changed since the last Tick or timerInterval has
// passed since it. Ticks are also rate limited by a token bucket of rate
// 1/timerInterval and burst 2 (golang.org/x/time/rate): a Tick that is due
// but over the rate is delayed, not dropped. A timer Tick (no change) also
// waits until the bucket is full, so that timer Ticks never delay the Tick
// of a change: an idle worker ticks every timerInterval, a change is ticked
// at once unless changes already come faster than one per timerInterval,
// and the gap between two Ticks never exceeds two timerIntervals while the
// state is fresh.
//
// After each Tick the patches left in the state are committed, many groups
// per Txn, before the next Tick. A failed compare re-runs the remaining
// groups once the watch has passed the conflicting revision. A Txn whose
// outcome is unknown (timeout, lost connection) is resolved through the
// worker's commit token before anything else happens, so every patch lands
// exactly once for each time it reports a change.
//
// Run returns:
//   - nil after the reactor returned ErrReactorFinished and the patches it
//     returned with it were committed;
//   - an error matching ctx.Err() when ctx is done (an in-flight commit is
//     resolved first; if etcd cannot tell within WithShutdownTimeout the
//     error also matches ErrCommitUnresolved);
//   - ErrEtcdSessionDone when session is non-nil and its lease is gone;
//   - ErrNotOwner when the fencing key (WithFencingKey) is gone;
//   - ErrEtcdTxnOpsExceed / ErrEtcdTxnSizeExceed when one group alone does
//     not fit a Txn (nothing of that commit is written);
//   - ErrKeyOutsidePrefix when a patch writes a key outside prefix + "/";
//   - the error of Tick, Update or Patch, wrapped; ErrPanic for a panic in
//     them;
//   - ErrEtcdUnavailable when etcd stayed unreachable for longer than
//     WithMaxOutage (default: no limit);
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
	if err != nil {
		r.log.Info("etcd worker stopped", zap.Error(err))
	} else {
		r.log.Info("etcd worker finished")
	}
	return err
}

// randomID returns 16 hex digits.
func randomID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// inPrefix reports whether the worker may write key.
func (w *EtcdWorker) checkWritable(key util.EtcdKey) error {
	s := key.String()
	if !strings.HasPrefix(s, w.watchKey) {
		return fmt.Errorf("%w: key %q is not under %q", ErrKeyOutsidePrefix, s, w.watchKey)
	}
	if strings.HasPrefix(s, w.reserved) {
		return fmt.Errorf("%w: key %q is in the worker's reserved area %q", ErrKeyOutsidePrefix, s, w.reserved)
	}
	return nil
}

// liveValues returns the value map for general DataPatches, building it
// from committed on first use (once per worker, not per commit).
func (w *EtcdWorker) liveValues() map[util.EtcdKey][]byte {
	if w.values == nil {
		w.values = make(map[util.EtcdKey][]byte, len(w.committed))
		for k, e := range w.committed {
			w.values[k] = e.value
		}
	}
	return w.values
}

// committedValue is the committed value of key, for patchView.
func (w *EtcdWorker) committedValue(key util.EtcdKey) ([]byte, bool) {
	e, ok := w.committed[key]
	return e.value, ok
}

// run is the state of one Run call.
type run struct {
	w        *EtcdWorker
	ctx      context.Context
	cancel   context.CancelFunc
	session  *concurrency.Session
	interval time.Duration
	log      *zap.Logger
	m        *roleMetrics
	state    ReactorState

	watch *watchStream

	// Revisions. eventRev: every event up to it is applied (from the watch or
	// a load). appliedRev: the state is known complete up to it (eventRev or
	// a progress notification). barrierRev: the last commit's revision.
	eventRev   int64
	appliedRev int64
	barrierRev int64
	counterRev int64 // mod revision of the delete counter (0: absent)
	headRev    int64 // newest revision etcd reported anywhere, for the lag metric

	lastFresh   time.Time // newest proof that the state is current
	lastContact time.Time // last successful etcd response
	outage      bool

	// Commit token.
	tokenKey string
	tokenRev int64
	tokenSeq uint64
	lease    clientv3.LeaseID

	pending       [][]DataPatch
	retryAtRev    int64     // pending waits until appliedRev >= retryAtRev
	tryAgainRev   int64     // after ErrEtcdTryAgain: wait for appliedRev > tryAgainRev ...
	tryAgainUntil time.Time // ... or this time
	tryAgain      bool
	finishing     bool

	changed  bool
	lastTick time.Time
	limiter  *rate.Limiter
}

func (w *EtcdWorker) newRun(ctx context.Context, session *concurrency.Session,
	interval time.Duration, role string,
) *run {
	rctx, cancel := context.WithCancel(ctx)
	r := &run{
		w:        w,
		ctx:      rctx,
		cancel:   cancel,
		session:  session,
		interval: interval,
		state:    w.state,
		m:        w.metrics.forRole(strings.ToValidUTF8(role, "\uFFFD")), // label values must be UTF-8
		limiter:  rate.NewLimiter(rate.Every(interval), 2),
		tokenKey: w.reserved + "token/" + randomID(),
	}
	r.log = w.opts.logger.With(zap.String("role", role), zap.String("prefix", w.prefix.String()))
	if session != nil {
		r.lease = session.Lease()
	}
	now := w.opts.clock.Now()
	r.lastContact = now
	return r
}

// close releases what the run holds: the watch, its goroutines, the commit
// token (best effort).
func (r *run) close() {
	if r.watch != nil {
		r.watch.close()
	}
	r.cancel()
	if r.tokenRev != 0 {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(r.ctx), min(time.Second, r.w.opts.requestTimeout))
		_, err := r.w.client.Delete(ctx, r.tokenKey)
		cancel()
		if err != nil {
			r.log.Debug("could not delete commit token", zap.String("key", r.tokenKey), zap.Error(err))
		}
	}
	r.w.state = r.state
	// A patch that failed may have left changes it did not record in the
	// live value map; the next Run rebuilds it from committed if needed.
	r.w.values = nil
}

// sessionDone returns the session's done channel, or nil without a session.
func (r *run) sessionDone() <-chan struct{} {
	if r.session == nil {
		return nil
	}
	return r.session.Done()
}

// checkStop returns the error Run should return now, if any.
func (r *run) checkStop() error {
	select {
	case <-r.ctx.Done():
		return r.ctxErr()
	case <-r.sessionDone():
		return ErrEtcdSessionDone
	default:
	}
	if r.w.opts.maxOutage > 0 && r.now().Sub(r.lastContact) > r.w.opts.maxOutage {
		return fmt.Errorf("%w: no successful etcd request since %v", ErrEtcdUnavailable, r.lastContact)
	}
	return nil
}

func (r *run) ctxErr() error {
	// Wrap ctx.Err() (Run's contract: errors.Is(err, ctx.Err())) and, when
	// the caller gave one (context.WithCancelCause...), the cause as well.
	err := r.ctx.Err()
	if cause := context.Cause(r.ctx); cause != nil && !errors.Is(cause, err) {
		return fmt.Errorf("orchestrator: worker stopped: %w: %w", err, cause)
	}
	return fmt.Errorf("orchestrator: worker stopped: %w", err)
}

func (r *run) now() time.Time { return r.w.opts.clock.Now() }

// contact records a successful etcd response.
func (r *run) contact() {
	r.lastContact = r.now()
	if r.outage {
		r.outage = false
		r.log.Info("etcd reachable again")
	}
}

// failure records a failed etcd request that will be retried.
func (r *run) failure(what string, err error) {
	r.m.retries.Inc()
	if !r.outage {
		r.outage = true
		r.m.outages.Inc()
		r.log.Warn("etcd request failed, retrying", zap.String("request", what), zap.Error(err))
	} else {
		r.log.Debug("etcd request failed again", zap.String("request", what), zap.Error(err))
	}
}

// loop is the body of Run.
func (r *run) loop() error {
	if err := r.loadWithRetry(); err != nil {
		return err
	}
	r.changed = true
	r.watch = newWatchStream(r)
	r.watch.start(r.eventRev + 1)

	for {
		if err := r.checkStop(); err != nil {
			return err
		}
		now := r.now()
		wake := now.Add(r.interval)
		r.restartWatchIfDue(now)
		if r.watch.idle() {
			wake = earliest(wake, r.watch.retryAt)
		}

		caughtUp := r.appliedRev >= r.barrierRev
		switch {
		case len(r.pending) > 0:
			if r.readyToCommit(now) {
				if err := r.commitPending(); err != nil {
					return err
				}
				continue
			}
			if r.tryAgain {
				wake = earliest(wake, r.tryAgainUntil)
			}
		case r.finishing:
			return nil
		case caughtUp:
			due := r.changed || !now.Before(r.lastTick.Add(r.interval))
			if due && r.fresh(now) {
				if !r.changed {
					// A timer Tick waits for a full bucket, so that timer
					// Ticks never use up the budget and delay the Tick of a
					// change that comes next.
					burst := float64(r.limiter.Burst())
					if tokens := r.limiter.TokensAt(now); tokens < burst {
						wake = earliest(wake, now.Add(time.Duration((burst-tokens)*float64(r.interval))))
						break
					}
				}
				res := r.limiter.ReserveN(now, 1)
				if d := res.DelayFrom(now); d > 0 {
					res.CancelAt(now)
					wake = earliest(wake, now.Add(d))
					break
				}
				if err := r.tick(); err != nil {
					return err
				}
				continue
			}
		}
		if err := r.wait(wake); err != nil {
			return err
		}
	}
}

// restartWatchIfDue opens a new watch when none is open or being opened and
// its back-off has passed (retryAt, now included), and reports whether it
// did. The watch resumes at the revision after the last applied event
// (eventRev + 1): not at appliedRev or headRev, which a progress
// notification or a head probe may have moved past events the state has
// not seen (PITFALLS.md item 3).
func (r *run) restartWatchIfDue(now time.Time) bool {
	if !r.watch.idle() || now.Before(r.watch.retryAt) {
		return false
	}
	r.watch.start(r.eventRev + 1)
	return true
}

func earliest(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// fresh reports whether the state may be ticked: its newest proof of
// freshness is younger than the staleness bound.
func (r *run) fresh(now time.Time) bool {
	return now.Sub(r.lastFresh) <= r.w.opts.maxStaleness
}

// readyToCommit reports whether the pending patches may run now.
func (r *run) readyToCommit(now time.Time) bool {
	if r.appliedRev < r.barrierRev || r.appliedRev < r.retryAtRev {
		return false
	}
	if r.tryAgain {
		return r.appliedRev > r.tryAgainRev || !now.Before(r.tryAgainUntil)
	}
	return true
}

// wait blocks until the watch delivers something, the wake time comes, or
// Run must stop.
func (r *run) wait(wake time.Time) error {
	d := wake.Sub(r.now())
	if d < time.Millisecond {
		d = time.Millisecond
	}
	if r.w.opts.maxOutage > 0 {
		d = min(d, r.lastContact.Add(r.w.opts.maxOutage).Sub(r.now())+time.Millisecond)
	}
	timer := r.w.opts.clock.NewTimer(d)
	defer timer.Stop()
	select {
	case <-r.ctx.Done():
		return r.ctxErr()
	case <-r.sessionDone():
		return ErrEtcdSessionDone
	case resp, ok := <-r.watch.ch:
		return r.watch.handle(resp, ok)
	case ch := <-r.watch.opened:
		r.watch.established(ch)
		return nil
	case p := <-r.watch.probes:
		r.handleProbe(p)
		return nil
	case <-timer.Chan():
		return nil
	}
}

// tick calls the reactor once and collects its patches.
func (r *run) tick() error {
	r.changed = false
	start := r.now()
	r.lastTick = start
	r.m.ticks.Inc()
	r.m.revisionLag.Set(float64(max(r.headRev-r.appliedRev, 0)))
	next, err := r.callTick()
	elapsed := r.now().Sub(start)
	r.m.tickDuration.Observe(elapsed.Seconds())
	if elapsed > slowTickThreshold {
		r.log.Warn("reactor Tick is slow", zap.Duration("duration", elapsed), zap.Int64("revision", r.appliedRev))
	}
	finished := false
	if err != nil {
		if !errors.Is(err, ErrReactorFinished) {
			return fmt.Errorf("orchestrator: reactor Tick: %w", err)
		}
		finished = true
	}
	if isNil(next) {
		if finished {
			// Finished with no state, so with no patches to commit.
			r.pending = nil
			r.finishing = true
			return nil
		}
		return fmt.Errorf("%w: reactor Tick returned a nil state", ErrInvalidArgument)
	}
	r.state = next
	patches, err := r.callGetPatches()
	if err != nil {
		return err
	}
	r.pending = patches
	r.finishing = finished
	r.retryAtRev = 0
	r.tryAgain = false
	return nil
}

func (r *run) callTick() (next ReactorState, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = panicError("Reactor.Tick", p)
			r.log.Error("panic in Reactor.Tick", zap.Any("panic", p), zap.Stack("stack"))
		}
	}()
	return r.w.reactor.Tick(r.ctx, r.state)
}

func (r *run) callGetPatches() (patches [][]DataPatch, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = panicError("ReactorState.GetPatches", p)
			r.log.Error("panic in ReactorState.GetPatches", zap.Any("panic", p), zap.Stack("stack"))
		}
	}()
	return r.state.GetPatches(), nil
}

// update feeds one change to the state and the worker's mirror of it.
func (r *run) update(key util.EtcdKey, value []byte, modRev int64, isInit bool) error {
	w := r.w
	prev, hadPrev := w.committed[key]
	if value == nil {
		delete(w.committed, key)
		if w.values != nil {
			delete(w.values, key)
		}
	} else {
		w.committed[key] = kvEntry{value: value, modRev: modRev}
		if w.values != nil {
			w.values[key] = value
		}
	}
	if err := r.callUpdate(key, value, isInit); err != nil {
		// The state did not take the change: keep the key in the mirror
		// with an impossible revision, so that the load of a later Run
		// passes it again (its value, or nil if it is gone).
		switch {
		case value != nil:
			w.committed[key] = kvEntry{value: value, modRev: -1}
		case hadPrev:
			w.committed[key] = kvEntry{value: prev.value, modRev: -1}
		}
		return err
	}
	r.changed = true
	return nil
}

func (r *run) callUpdate(key util.EtcdKey, value []byte, isInit bool) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = panicError("ReactorState.Update", p)
			r.log.Error("panic in ReactorState.Update", zap.Any("panic", p), zap.Stack("stack"))
		}
	}()
	if err := r.state.Update(key, value, isInit); err != nil {
		return fmt.Errorf("orchestrator: ReactorState.Update(%q): %w", key.String(), err)
	}
	return nil
}
