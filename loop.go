package orchestrator

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"

	"github.com/etcdworker/orchestrator/internal/etcdreq"
)

// slowTickThreshold is how long a Tick may take before it is logged as slow.
const slowTickThreshold = time.Second

// run is the state of one Run call: the loop of one worker. It follows its
// Source (catch-ups into the state), ticks the reactor through the tick
// gate, keeps the read-your-writes barrier and the pending patches, and
// hands those to the committer's flush (commit.go). Its parts own their
// invariants: the cursor and view (where the state stands in the Source),
// the commit token, the tick gate and the health record; the run connects
// them and acts on what they report.
type run struct {
	w      *EtcdWorker
	ctx    context.Context
	cancel context.CancelFunc
	// caller is Run's own ctx, whose Err is set before any of its children
	// (ctx, a session made with it) is cancelled: see ended.
	caller context.Context
	// shutdown ends WithShutdownTimeout after ctx: the requests that run to
	// their outcome through a cancel (commits, their resolution) end with
	// it at the latest. releaseShutdown releases it.
	shutdown        context.Context
	releaseShutdown func()
	// sessionLostLive: the session ended while ctx was alive (watchSession),
	// a loss that a later cancel does not make a stop.
	sessionLostLive atomic.Bool
	sessionWatch    sync.WaitGroup
	session         *concurrency.Session
	// clientDone is closed when the worker's client is closed (nil: never).
	// The Source's follower watches its own client; a worker on a shared
	// Source may run on another, which it must watch itself, since an idle
	// worker sends no request that would fail.
	clientDone <-chan struct{}
	interval   time.Duration
	log        *zap.Logger
	m          *roleMetrics
	state      ReactorState
	ks         keyspace

	src    *Source
	cur    *cursor
	view   *view       // the worker's: it outlives the run
	fence  *fenceCheck // nil without a fencing key
	token  *commitToken
	lease  *tokenLease // nil with a session
	gate   *tickGate
	health health
	// spacing is the pause between the sends of two links of a chain, so
	// that etcd receives them in order (see chain.send).
	spacing time.Duration

	barrierRev  int64 // revision of the worker's last commit
	pending     pendingPatches
	reads       flushReads // the buffers of what a flush reads
	finishing   bool
	synced      bool  // the first snapshot is in the state
	reloadsSeen int64 // the Source's reloads when the state last caught up
}

// pendingPatches are the groups of the last Tick not committed yet, and
// what they wait for before they run again.
type pendingPatches struct {
	groups        [][]DataPatch
	fresh         *freshValues // run at once on these values (a conflict read them)
	retryAtRev    int64        // run once the state reaches this revision
	tryAgain      bool         // a patch returned ErrEtcdTryAgain: wait for ...
	tryAgainRev   int64        // ... a revision newer than this ...
	tryAgainUntil time.Time    // ... or this time
}

func (w *EtcdWorker) newRun(ctx context.Context, session *concurrency.Session,
	interval time.Duration, role string,
) *run {
	rctx, cancel := context.WithCancel(ctx)
	shutdown, releaseShutdown := etcdreq.Outlive(rctx, w.opts.shutdownTimeout)
	r := &run{
		w:               w,
		ctx:             rctx,
		cancel:          cancel,
		caller:          ctx,
		shutdown:        shutdown,
		releaseShutdown: releaseShutdown,
		session:         session,
		interval:        interval,
		state:           w.state,
		ks:              w.ks,
		src:             w.src,
		cur:             w.cur,
		view:            &w.view,
		m:               w.metrics.forRole(labelValue(role)),
		gate:            newTickGate(interval),
		health:          health{maxOutage: w.opts.maxOutage},
		token:           &commitToken{key: w.ks.tokenKey(randomID())},
		spacing:         initialSpacing,
	}
	if cctx := w.client.Ctx(); cctx != nil {
		r.clientDone = cctx.Done()
	}
	r.log = w.opts.logger.With(zap.String("role", role), zap.String("prefix", w.prefix.String()))
	if session != nil {
		r.token.lease = session.Lease()
	} else {
		r.lease = newTokenLease(w.client, w.opts.tokenTTL)
	}
	r.cur.progressInterval, r.cur.maxOutage = progressInterval(&w.opts), w.opts.maxOutage
	return r
}

// progressInterval is how often a worker with options o wants its Source to
// probe the head and ask for progress: often enough for its staleness bound
// and its outage limit.
func progressInterval(o *options) time.Duration {
	interval := o.maxStaleness / 4
	if o.maxOutage > 0 {
		interval = min(interval, o.maxOutage/4)
	}
	return min(max(interval, 50*time.Millisecond), 2*time.Second)
}

// randomID returns tokenIDLen hex digits.
func randomID() string {
	var b [tokenIDLen / 2]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// close releases what the run holds: its place in the Source (the last
// worker stops the Source's watch) and the commit token (revoking its lease
// deletes it; best effort).
func (r *run) close() {
	r.src.detach(r.cur)
	r.fence.close()
	r.cancel()
	r.sessionWatch.Wait()
	r.releaseShutdown()
	ctx, cancel := etcdreq.Context(context.WithoutCancel(r.ctx), min(time.Second, r.w.opts.requestTimeout), r.w.client)
	defer cancel()
	if !r.health.since().IsZero() {
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
	// A patch that failed may have left changes it did not record in the
	// value map; the next Run builds it again if needed.
	r.view.dropValues()
	r.w.board.publish(Status{})
	r.m.forget()
}

// loop is the body of Run: join the Source, take a first snapshot, then
// follow, tick and commit until it must return.
func (r *run) loop() error {
	// The first snapshot must be proven current after Run began, as a load
	// would be: a Source that already runs has its copy, which may not hold
	// a write that ended just before; a probe asked for now proves it. start
	// is taken before attach, so that the load attach may start (in the
	// follower's goroutine, which may run first) proves it too.
	start := r.now()
	r.publishStatus()
	r.fence = r.startFenceCheck()
	r.watchSession()
	r.src.attach(r.cur)
	r.src.requestProgress()
	for !r.synced {
		if err := r.checkStop(); err != nil {
			return err
		}
		b, ok, err := r.catchUp(nil)
		if err != nil {
			return err
		}
		if ok && !b.provenAt.Before(start) {
			r.synced = true
			break
		}
		if err := r.wait(r.now().Add(r.interval)); err != nil {
			return err
		}
	}
	for {
		r.publishStatus()
		if err := r.checkStop(); err != nil {
			return err
		}
		now := r.now()
		wake, acted, err := r.step(now)
		if acted && err == nil {
			err = r.poll() // a slow Tick must not keep the state from moving on
		}
		if err != nil || r.finishing && len(r.pending.groups) == 0 {
			return err
		}
		if acted {
			continue
		}
		if err := r.wait(wake); err != nil {
			return err
		}
	}
}

// step commits pending patches or ticks, whichever is due. It reports
// whether it did something, and otherwise when to look again.
func (r *run) step(now time.Time) (wake time.Time, acted bool, err error) {
	wake = now.Add(r.interval)
	// Pending groups re-run once the state has the worker's own last commit,
	// or at once on the values a conflict read back (they include what the
	// flush's landed Txns wrote); a Tick always waits for the state.
	if len(r.pending.groups) > 0 && (r.pending.fresh != nil || r.view.completeRev >= r.barrierRev) {
		if ok, retryAt := r.readyToCommit(now); !ok {
			return earliest(wake, retryAt), false, nil
		}
		return wake, true, r.commitPending(now)
	}
	if r.view.completeRev < r.barrierRev {
		return wake, false, nil // the state lacks the worker's own last commit
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
	rev := r.view.completeRev
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
	if err := r.stopped(false); err != nil {
		return err
	}
	if r.health.tooLong(r.now()) {
		return fmt.Errorf("%w: etcd has not answered since %v", ErrEtcdUnavailable, r.health.since())
	}
	return nil
}

// stopped returns the error Run must end with when its ctx is done, its
// client was closed, its session is gone or its fencing key was lost (see
// fenceCheck), nil while none of them happened; with ignoreCtx it looks at
// the session alone (see sleep). It never blocks: each of them is a channel that stays closed once
// closed, so a wait that selected one of them learns with stopped which it
// was.
func (r *run) stopped(ignoreCtx bool) error {
	if ignoreCtx {
		if r.ended() && !r.sessionLostLive.Load() {
			return nil // see sleep
		}
		return r.sessionLost()
	}
	if r.ended() {
		return r.stopErr()
	}
	select {
	case <-r.clientDone:
		// A closed client never heals. It also ends the keep-alive of a
		// session on it, so it goes before the session: a new session on
		// that client would not help.
		return rejected(r.w.client, "run", errClientClosed)
	default:
	}
	if err := r.sessionLost(); err != nil {
		return err
	}
	return r.fence.result()
}

// watchSession records, in sessionLostLive, a session that ends while
// Run's ctx is alive. Its goroutine ends with ctx (close joins it).
func (r *run) watchSession() {
	done := r.sessionDone()
	if done == nil {
		return
	}
	r.sessionWatch.Add(1)
	go func() {
		defer r.sessionWatch.Done()
		select {
		case <-done:
			if !r.ended() {
				r.sessionLostLive.Store(true)
			}
		case <-r.ctx.Done():
		}
	}()
}

// sessionLost returns ErrEtcdSessionDone once the session is gone, nil
// before (and without a session).
func (r *run) sessionLost() error {
	select {
	case <-r.sessionDone():
		return ErrEtcdSessionDone
	default:
		return nil
	}
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
	if err == nil { // the caller's ctx ended, and the cancel is on its way to r.ctx
		err = r.caller.Err()
	}
	if cause := context.Cause(r.caller); cause != nil && !errors.Is(cause, err) {
		return fmt.Errorf("orchestrator: worker stopped: %w: %w", err, cause)
	}
	return fmt.Errorf("orchestrator: worker stopped: %w", err)
}

// userFailure marks err, returned by user code, as a failure (runFailure)
// when Run's ctx was still alive as it returned: a cancel that comes
// before Run returns must not make it a stop (IsCleanStop). An error
// returned after the cancel may be caused by it, and is left as it is.
func (r *run) userFailure(err error) error { return failureIf(!r.ended(), err) }

// failureIf marks err a failure (runFailure) when live: Run's ctx was alive
// as the user code that returned it did (see userFailure).
func failureIf(live bool, err error) error {
	if err != nil && live {
		return &runFailure{err: err}
	}
	return err
}

// stopErr is the error Run ends with once its ctx is done: ctx's (see
// ctxErr), unless a loss was seen while ctx was alive, which is a failure
// whatever came after it (the fencing check records a loss only while ctx
// is alive; watchSession marks a session that ended then).
func (r *run) stopErr() error {
	if err := r.fence.result(); err != nil {
		return err
	}
	if r.sessionLostLive.Load() {
		return ErrEtcdSessionDone
	}
	return r.ctxErr()
}

// ended reports whether Run's ctx has ended. It asks the caller's ctx too:
// a cancel sets its error first, then cancels its children one by one,
// so a session made with the same ctx may end before r.ctx does, and its
// end must not pass for a loss.
func (r *run) ended() bool { return r.caller.Err() != nil || r.ctx.Err() != nil }

// ctxDone reports whether Run's ctx is done. It is cheap enough to ask
// before every call of user code in a loop (a catch-up's Updates, a flush's
// patches), so that a cancel is not held up by many slow callbacks.
func (r *run) ctxDone() bool {
	select {
	case <-r.ctx.Done():
		return true
	default:
		return false
	}
}

// sleep waits for d. With ignoreCtx it waits through a done ctx, a closed
// client and a lost fencing key (a commit must be resolved first), never
// through a lost session.
func (r *run) sleep(d time.Duration, ignoreCtx bool) error {
	timer := r.w.opts.clock.NewTimer(d)
	defer timer.Stop()
	done, fence, closed, session := r.ctx.Done(), r.fence.done(), r.clientDone, r.sessionDone()
	if ignoreCtx {
		done, fence, closed = r.shutdown.Done(), nil, nil // its requests would fail at once
		if r.ended() && !r.sessionLostLive.Load() {
			session = nil // a session made with Run's ctx ends with it: no loss
		}
	}
	select {
	case <-done:
	case <-session:
	case <-fence:
	case <-closed:
	case <-timer.Chan():
		return nil
	}
	return r.stopped(ignoreCtx)
}

// wait blocks until the Source has news, the wake time comes, the outage
// limit passes, or Run must stop; it acts on what came.
func (r *run) wait(wake time.Time) error {
	wake = earliest(wake, r.health.outageDeadline())
	d := max(wake.Sub(r.now()), time.Millisecond)
	timer := r.w.opts.clock.NewTimer(d)
	defer timer.Stop()
	select {
	case <-r.ctx.Done():
	case <-r.sessionDone():
	case <-r.fence.done():
	case <-r.clientDone:
	case <-r.cur.notify:
		if !r.synced {
			return nil // the first snapshot is taken by loop
		}
		_, _, err := r.catchUp(nil)
		return err
	case <-timer.Chan():
		return nil
	}
	return r.stopped(false)
}

// poll catches up when the Source has news, without blocking. The loop
// calls it after acting (a Tick, a commit): a reactor slower than the timer
// interval is admitted again at once, and without poll the loop would never
// reach wait, so the state would never move on.
func (r *run) poll() error {
	select {
	case <-r.cur.notify:
		_, _, err := r.catchUp(nil)
		return err
	default:
		return nil
	}
}

// tick calls the reactor once and collects its patches. It never calls it
// once the fencing check found the key lost.
func (r *run) tick(start time.Time) error {
	if err := r.fence.result(); err != nil {
		return err
	}
	r.m.ticks.Inc()
	r.m.lastTick.Set(float64(start.UnixNano()) / 1e9)
	r.m.revisionLag.Set(float64(max(r.health.headRev-r.view.completeRev, 0)))
	r.m.sourceLag.Set(float64(max(r.src.copyRev()-r.view.completeRev, 0)))
	next, err := guard("Reactor.Tick", func() (ReactorState, error) { return r.w.reactor.Tick(r.ctx, r.state) })
	live := !r.ended() // as Tick returned (see userFailure)
	elapsed := r.now().Sub(start)
	r.m.tickDuration.Observe(elapsed.Seconds())
	if elapsed > slowTickThreshold {
		r.log.Warn("reactor Tick is slow", zap.Duration("duration", elapsed), zap.Int64("revision", r.view.completeRev))
	}
	finished := errors.Is(err, ErrReactorFinished)
	if err != nil && !finished {
		return failureIf(live, fmt.Errorf("orchestrator: reactor Tick: %w", err))
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
		return r.userFailure(err)
	}
	r.pending = pendingPatches{groups: groups}
	return nil
}
