package orchestrator

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
)

// slowTickThreshold is how long a Tick may take before it is logged as slow.
const slowTickThreshold = time.Second

// run is the state of one Run call. Its parts own their invariants: the
// mirror (what the state has been told), the watch, the commit token, the
// tick gate and the health record; the run connects them and acts on what
// they report.
type run struct {
	w        *EtcdWorker
	ctx      context.Context
	cancel   context.CancelFunc
	session  *concurrency.Session
	interval time.Duration
	log      *zap.Logger
	m        *roleMetrics
	state    ReactorState
	mirror   *mirror

	watch  *watchStream
	fence  *fenceCheck // nil without a fencing key
	token  *commitToken
	lease  *tokenLease // nil with a session
	gate   *tickGate
	health health

	barrierRev int64 // revision of the worker's last commit
	pending    pendingPatches
	finishing  bool
	synced     bool      // the initial load is done
	lastData   time.Time // when the load in progress last received data
}

// pendingPatches are the groups of the last Tick not committed yet, and
// what they wait for before they run again.
type pendingPatches struct {
	groups        [][]DataPatch
	retryAtRev    int64     // run once the state reaches this revision
	tryAgain      bool      // a patch returned ErrEtcdTryAgain: wait for ...
	tryAgainRev   int64     // ... a revision newer than this ...
	tryAgainUntil time.Time // ... or this time
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
		mirror:   w.mirror,
		m:        w.metrics.forRole(strings.ToValidUTF8(role, "\uFFFD")), // label values must be UTF-8
		gate:     newTickGate(interval),
		health:   health{maxOutage: w.opts.maxOutage},
		token:    &commitToken{key: w.prefix.String() + reservedDir + "token/" + randomID()},
	}
	r.log = w.opts.logger.With(zap.String("role", role), zap.String("prefix", w.prefix.String()))
	if session != nil {
		r.token.lease = session.Lease()
	} else {
		r.lease = newTokenLease(w.client, w.opts.tokenTTL)
	}
	return r
}

// randomID returns tokenIDLen hex digits.
func randomID() string {
	var b [tokenIDLen / 2]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// close releases what the run holds: the watch and its goroutines, and the
// commit token (revoking its lease deletes it; best effort).
func (r *run) close() {
	if r.watch != nil {
		r.watch.close()
	}
	r.fence.close()
	r.cancel()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.ctx), min(time.Second, r.w.opts.requestTimeout))
	ctx, cancel = boundToClient(ctx, cancel, r.w.client)
	defer cancel()
	if !r.health.outageSince.IsZero() {
		// etcd is not answering: waiting for it would delay Run's return
		// (an outage must end Run within about WithMaxOutage). Without a
		// session the token goes with its lease, whose keep-alive stops.
		cancel()
	}
	var err error
	switch {
	case r.lease != nil:
		err = r.lease.close(ctx)
	case r.token.rev != 0:
		_, err = r.w.client.Delete(ctx, r.token.key)
	}
	if err != nil {
		r.log.Debug("could not remove the commit token", zap.String("key", r.token.key), zap.Error(err))
	}
	r.w.state = r.state
	r.w.board.publish(Status{})
	r.m.forget()
	// A patch that failed may have left changes it did not record in the
	// value map; the next Run rebuilds it if needed.
	r.mirror.dropValueMap()
}

// loop is the body of Run: load, then watch, tick and commit until it must return.
func (r *run) loop() error {
	r.publishStatus()
	r.fence = r.startFenceCheck()
	if err := r.loadWithRetry(); err != nil {
		return err
	}
	r.synced = true
	r.watch = newWatchStream(r.ctx, r.watchConfig())
	r.watch.start(r.mirror.eventRev + 1)
	for {
		r.publishStatus()
		if err := r.checkStop(); err != nil {
			return err
		}
		now := r.now()
		r.restartWatchIfDue(now)
		wake, acted, err := r.step(now)
		if acted && err == nil {
			err = r.poll() // a slow Tick must not starve the watch
		}
		if err != nil || r.finishing && len(r.pending.groups) == 0 {
			return err
		}
		if acted {
			continue
		}
		if r.watch.idle() {
			wake = earliest(wake, r.watch.retryAt)
		}
		if err := r.wait(wake); err != nil {
			return err
		}
	}
}

// restartWatchIfDue opens a new watch when none is open and its back-off
// has passed, and reports whether it did. The watch resumes after the last
// applied event (eventRev + 1), never at a revision a progress notification
// or a probe moved past: those prove completeness, not delivery.
func (r *run) restartWatchIfDue(now time.Time) bool {
	return r.watch.startIfDue(now, r.mirror.eventRev+1)
}

// step commits pending patches or ticks, whichever is due. It reports
// whether it did something, and otherwise when to look again.
func (r *run) step(now time.Time) (wake time.Time, acted bool, err error) {
	wake = now.Add(r.interval)
	if r.mirror.completeRev < r.barrierRev {
		return wake, false, nil // the state lacks the worker's own last commit
	}
	if len(r.pending.groups) > 0 {
		if ok, retryAt := r.readyToCommit(now); !ok {
			return earliest(wake, retryAt), false, nil
		}
		return wake, true, r.commitPending(now)
	}
	if r.finishing || now.Sub(r.health.lastFresh) > r.w.opts.maxStaleness {
		return wake, false, nil
	}
	ok, gateWake := r.gate.admit(now)
	if !ok {
		if !gateWake.IsZero() {
			wake = earliest(wake, gateWake)
		}
		return wake, false, nil
	}
	return wake, true, r.tick(now)
}

// readyToCommit reports whether the pending patches may run now, and
// otherwise the time to look again (zero: when the state moves).
func (r *run) readyToCommit(now time.Time) (bool, time.Time) {
	p := &r.pending
	rev := r.mirror.completeRev
	if rev < p.retryAtRev {
		return false, time.Time{}
	}
	if p.tryAgain && rev <= p.tryAgainRev && now.Before(p.tryAgainUntil) {
		return false, p.tryAgainUntil
	}
	return true, time.Time{}
}

func earliest(a, b time.Time) time.Time {
	if !b.IsZero() && b.Before(a) {
		return b
	}
	return a
}

func (r *run) now() time.Time { return r.w.opts.clock.Now() }

// checkStop returns the error Run should return now, if any.
func (r *run) checkStop() error {
	select {
	case <-r.ctx.Done():
		return r.ctxErr()
	case <-r.sessionDone():
		return ErrEtcdSessionDone
	case <-r.fence.done():
		return r.fence.result()
	default:
	}
	if r.health.tooLong(r.now()) {
		return fmt.Errorf("%w: etcd has not answered since %v", ErrEtcdUnavailable, r.health.outageSince)
	}
	return nil
}

// sessionDone returns the session's done channel, or nil without a session.
func (r *run) sessionDone() <-chan struct{} {
	if r.session == nil {
		return nil
	}
	return r.session.Done()
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

// sleep waits for d. With ignoreCtx it waits through a done ctx and a lost
// fencing key (a commit must be resolved first), never through a lost
// session.
func (r *run) sleep(d time.Duration, ignoreCtx bool) error {
	timer := r.w.opts.clock.NewTimer(d)
	defer timer.Stop()
	done, fence := r.ctx.Done(), r.fence.done()
	if ignoreCtx {
		done, fence = nil, nil
	}
	select {
	case <-done:
		return r.ctxErr()
	case <-r.sessionDone():
		return ErrEtcdSessionDone
	case <-fence:
		return r.fence.result()
	case <-timer.Chan():
		return nil
	}
}

// wait blocks until the watch or a probe delivers something, the wake time
// comes, the outage limit passes, or Run must stop; it acts on what came.
func (r *run) wait(wake time.Time) error {
	wake = earliest(wake, r.health.outageDeadline())
	d := max(wake.Sub(r.now()), time.Millisecond)
	timer := r.w.opts.clock.NewTimer(d)
	defer timer.Stop()
	select {
	case <-r.ctx.Done():
		return r.ctxErr()
	case <-r.sessionDone():
		return ErrEtcdSessionDone
	case <-r.fence.done():
		return r.fence.result()
	case resp, ok := <-r.watch.ch:
		return r.onWatch(r.watch.handle(resp, ok))
	case ch := <-r.watch.opened:
		r.watch.established(ch)
		return nil
	case p := <-r.watch.probes:
		return r.onProbe(p)
	case <-timer.Chan():
		return nil
	}
}

// onWatch acts on what one watch response meant. See "Snapshot and
// barrier" in docs/DESIGN.md.
func (r *run) onWatch(res watchResult) error {
	switch res.kind {
	case watchFailed:
		if r.ctx.Err() != nil {
			return nil // the watch ended because Run is stopping
		}
		return r.failed("watch", r.now(), res.err)
	case watchCompacted:
		r.m.reloads.Inc()
		r.log.Warn("watch revision compacted, reloading the state",
			zap.Int64("revision", r.mirror.eventRev+1), zap.Int64("compactRevision", res.rev))
		if err := r.loadWithRetry(); err != nil {
			return err
		}
		r.watch.start(r.mirror.eventRev + 1)
		return nil
	}
	r.answered(res.rev)
	r.health.fresh(r.now())
	if res.kind == watchProgress {
		// Every event up to the header revision has been delivered. This
		// only moves the barrier; events are never dropped because of it.
		r.mirror.progressed(res.rev)
		return nil
	}
	return r.applyEvents(res.events)
}

// applyEvents applies the events of one watch response, in order. A response
// holds every event of the revisions it covers, so after it the state is a
// snapshot at its last revision. Events at or below eventRev were applied
// already (a replay) and are skipped.
func (r *run) applyEvents(events []*clientv3.Event) error {
	if len(events) == 0 {
		return nil
	}
	from := r.mirror.eventRev
	for _, ev := range events {
		if ev.Kv.ModRevision <= from {
			continue
		}
		c, visible := r.mirror.apply(ev.Kv, ev.Type == clientv3.EventTypeDelete)
		if !visible {
			continue
		}
		if err := r.update(c, false); err != nil {
			return err
		}
	}
	r.mirror.eventsApplied(events[len(events)-1].Kv.ModRevision)
	r.m.stateKeys.Set(float64(r.mirror.len()))
	return nil
}

// update tells the state about one change and, when the state took it,
// records it in the mirror. When the state did not, the mirror keeps the key
// so that the next load passes it again (mirror.forget).
func (r *run) update(c keyChange, isInit bool) error {
	_, err := guard("ReactorState.Update", func() (struct{}, error) {
		return struct{}{}, r.state.Update(c.key, c.value, isInit)
	})
	if err != nil {
		r.mirror.forget(c)
		r.log.Error("ReactorState.Update failed", zap.String("key", c.key.String()), zap.Error(err))
		return fmt.Errorf("orchestrator: ReactorState.Update(%q): %w", c.key.String(), err)
	}
	r.mirror.set(c)
	r.gate.changedState()
	return nil
}

// tick calls the reactor once and collects its patches. It never calls it
// once the fencing check found the key lost.
func (r *run) tick(start time.Time) error {
	if err := r.fence.result(); err != nil {
		return err
	}
	r.m.ticks.Inc()
	r.m.lastTick.Set(float64(start.UnixNano()) / 1e9)
	r.m.revisionLag.Set(float64(max(r.health.headRev-r.mirror.completeRev, 0)))
	next, err := guard("Reactor.Tick", func() (ReactorState, error) { return r.w.reactor.Tick(r.ctx, r.state) })
	elapsed := r.now().Sub(start)
	r.m.tickDuration.Observe(elapsed.Seconds())
	if elapsed > slowTickThreshold {
		r.log.Warn("reactor Tick is slow", zap.Duration("duration", elapsed), zap.Int64("revision", r.mirror.completeRev))
	}
	finished := errors.Is(err, ErrReactorFinished)
	if err != nil && !finished {
		return fmt.Errorf("orchestrator: reactor Tick: %w", err)
	}
	r.finishing = finished
	if isNil(next) {
		if finished {
			return nil // finished with no state, so with no patches to commit
		}
		return fmt.Errorf("%w: reactor Tick returned a nil state", ErrInvalidArgument)
	}
	r.state = next
	groups, err := guard("ReactorState.GetPatches", func() ([][]DataPatch, error) { return r.state.GetPatches(), nil })
	if err != nil {
		return err
	}
	r.pending = pendingPatches{groups: groups}
	return nil
}
