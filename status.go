package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// Status is where a worker stands, as seen by another goroutine. It is a
// copy: reading it never blocks the worker for longer than a copy.
type Status struct {
	// Running is true between the start of Run and its return.
	Running bool
	// Synced is true once the current Run loaded the state: from then on
	// the state is a snapshot of AppliedRevision.
	Synced bool
	// AppliedRevision is the revision the state is known complete up to.
	AppliedRevision int64
	// HeadRevision is the newest revision etcd reported to the worker: in
	// watch responses, commits, and a head probe every progress interval
	// (WithMaxStaleness/4, at most 2s), which also counts while a slow Tick
	// keeps the worker from reading its watch.
	HeadRevision int64
	// LastTick is when Reactor.Tick last started (zero: never).
	LastTick time.Time
	// LastFresh is the newest proof that the state was current (a watch
	// response, a progress notification, a probe or a load).
	LastFresh time.Time
	// Fresh is true while LastFresh is within the staleness bound
	// (WithMaxStaleness): the worker ticks only then.
	Fresh bool
	// Unreachable is true during an outage: etcd has failed to answer
	// since OutageSince.
	Unreachable bool
	OutageSince time.Time
	// ReadPath is how the worker's last read of the whole prefix (the
	// initial load, a reload after a compaction) went: etcd 3.7's streaming
	// range, or the fallback of servers without it.
	ReadPath ReadPath
}

// ReadPath is how a worker reads the whole prefix: the initial load and the
// reload after a compaction.
type ReadPath string

const (
	// ReadPathNone means the worker has not read the prefix yet.
	ReadPathNone ReadPath = ""
	// ReadPathStream is etcd 3.7's streaming range (RangeStream): one
	// request pinned at one revision, answered in chunks.
	ReadPathStream ReadPath = "stream"
	// ReadPathFallback is unary ranges pinned at one revision, for servers
	// that answer RangeStream Unimplemented (etcd before 3.7, the gRPC
	// proxy): the whole prefix in one response, or pages when it exceeds
	// the client's receive limit.
	ReadPathFallback ReadPath = "fallback"
)

// Lag is how many revisions the state is behind the newest revision etcd
// reported to the worker.
func (s Status) Lag() int64 { return max(s.HeadRevision-s.AppliedRevision, 0) }

// statusBoard is where the run publishes its Status for other goroutines.
type statusBoard struct {
	mu     sync.Mutex
	status Status
	synced chan struct{} // closed when status.Synced becomes true
}

func newStatusBoard() *statusBoard { return &statusBoard{synced: make(chan struct{})} }

// publish replaces the status; it closes the synced channel on the first
// publish with Synced and makes a new one when Synced goes back to false.
func (b *statusBoard) publish(s Status) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case s.Synced && !b.status.Synced:
		close(b.synced)
	case !s.Synced && b.status.Synced:
		b.synced = make(chan struct{})
	}
	b.status = s
}

func (b *statusBoard) get() (Status, <-chan struct{}) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.status, b.synced
}

// Status returns where the worker stands. It is safe to call from any
// goroutine, also while Run is running.
func (w *EtcdWorker) Status() Status {
	s, _ := w.board.get()
	if s.Running {
		s.ReadPath = w.src.streamSupport.readPath()
		s.Fresh = w.opts.clock.Since(s.LastFresh) <= w.opts.maxStaleness
		// The Source follows etcd while a slow Tick keeps the worker busy:
		// its probes and its copy say how far etcd has moved on.
		s.HeadRevision = max(s.HeadRevision, w.src.headSeen.Load(), w.src.copyRev())
	}
	return s
}

// WaitSynced blocks until the worker's current (or next) Run has loaded the
// state, or ctx is done. It is a readiness check for the start of a
// process: once it returns nil, the state holds a snapshot of etcd.
func (w *EtcdWorker) WaitSynced(ctx context.Context) error {
	s, synced := w.board.get()
	if s.Synced {
		return nil
	}
	select {
	case <-synced:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("orchestrator: waiting for the initial load: %w", ctx.Err())
	}
}

// Ready returns nil when the worker is running, loaded, fresh and in touch
// with etcd, and otherwise an error matching ErrNotReady that says why. It
// suits a health or readiness endpoint.
func (w *EtcdWorker) Ready() error {
	s := w.Status()
	switch {
	case !s.Running:
		return fmt.Errorf("%w: not running", ErrNotReady)
	case !s.Synced:
		return fmt.Errorf("%w: initial load not done", ErrNotReady)
	case s.Unreachable:
		return fmt.Errorf("%w: etcd has not answered since %v", ErrNotReady, s.OutageSince)
	case !s.Fresh:
		return fmt.Errorf("%w: state not proven current since %v", ErrNotReady, s.LastFresh)
	}
	return nil
}

// IsCleanStop reports whether an error returned by Run means that Run ended
// the way its caller asked: nil (the reactor finished), or ctx cancelled or
// past its deadline with no commit left unresolved, even when user code
// failed after the cancel with an error of its own (a Tick whose call
// returned codes.Canceled). Any other error is a failure to look at, also
// when it matches ctx's error because ctx ended meanwhile: an error user
// code returned while ctx was still alive (a context error of the
// reactor's own included), a panic in user code, and every failure the
// worker itself reports (stopFailures: ErrCommitUnresolved, a lost fencing
// key or session, a rejection, ...).
func IsCleanStop(err error) bool {
	if err == nil {
		return true
	}
	var failed *runFailure
	if errors.As(err, &failed) {
		return false
	}
	for _, f := range stopFailures {
		if errors.Is(err, f) {
			return false
		}
	}
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// stopFailures are the errors that keep a Run that ended after its ctx
// from being a clean stop (see IsCleanStop).
var stopFailures = []error{
	ErrCommitUnresolved, ErrPanic, ErrNotOwner, ErrEtcdSessionDone, ErrEtcdRejected,
	ErrEtcdTxnOpsExceed, ErrEtcdTxnSizeExceed, ErrEtcdUnavailable, ErrKeyOutsidePrefix,
	ErrInvalidArgument,
}

// runFailure marks an error with which Run ended while its ctx was still
// alive: a failure even when it matches context.Canceled or
// DeadlineExceeded (a Tick that timed out on a context of its own). It says
// how Run ended, whatever part of the worker the error came from (user code
// or etcd); it is not a mark of user code (see guard) nor of a callback's
// error (rangeCallbackError).
type runFailure struct{ err error }

func (f *runFailure) Error() string { return f.err.Error() }
func (f *runFailure) Unwrap() error { return f.err }

// publishStatus publishes where the run stands.
func (r *run) publishStatus() {
	r.w.board.publish(Status{
		Running:         true,
		Synced:          r.synced,
		AppliedRevision: r.view.completeRev,
		HeadRevision:    max(r.health.headRev, r.view.completeRev),
		LastTick:        r.gate.lastTick,
		LastFresh:       r.health.lastFresh,
		Unreachable:     !r.health.since().IsZero(),
		OutageSince:     r.health.since(),
	})
	r.m.appliedRevision.Set(float64(r.view.completeRev))
}
