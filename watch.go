package orchestrator

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jonboulle/clockwork"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/internal/backoff"
	"github.com/etcdworker/orchestrator/internal/etcdreq"
)

// watchConfig is what a watchStream needs to know.
type watchConfig struct {
	client   *clientv3.Client
	key      string // the watched prefix: prefix + "/"
	probeKey string // a key read count-only to learn the store revision
	// head, when set, gets the newest store revision a probe saw, at once:
	// Status reads it while a slow Tick keeps the loop from the probes.
	head  *atomic.Int64
	clock clockwork.Clock
	// requestTimeout bounds progress requests and probes.
	requestTimeout func() time.Duration
	// progressInterval is how often progress is requested and the head
	// probed; it is asked again before each wait (the workers on a Source
	// may come and go).
	progressInterval func() time.Duration
}

// watchStream owns the worker's watch on its prefix: a watcher of its own
// (so that progress requests and notifications concern this watch only),
// the current watch channel, and a goroutine that asks etcd for progress.
// It never changes the run: handle and the probes report what happened and
// the run decides what follows. close joins every goroutine.
type watchStream struct {
	cfg     watchConfig
	watcher clientv3.Watcher
	base    context.Context // watch and progress requests share its metadata
	stop    context.CancelFunc
	cancel  context.CancelFunc      // of the current watch
	ch      clientv3.WatchChan      // nil while no watch is open
	opened  chan clientv3.WatchChan // non-nil while a watch is being opened
	retryAt time.Time
	backoff backoff.Backoff

	kick chan struct{}
	wg   sync.WaitGroup

	// probes carries head probe results to the run loop.
	probes chan headProbe
}

// watchResultKind says what one watch response (or its absence) meant.
type watchResultKind int

const (
	watchEvents    watchResultKind = iota // events of whole revisions, to apply
	watchProgress                         // every event up to rev was delivered
	watchCompacted                        // the resume revision was compacted: reload
	watchFailed                           // the watch broke; a new one is scheduled
)

// watchResult is what handle made of one watch response.
type watchResult struct {
	kind   watchResultKind
	rev    int64 // header revision (events, progress) or compact revision
	events []*clientv3.Event
	err    error // watchFailed: why
}

// headProbe is the store revision etcd reported to a read sent at sent, or
// the error the read got.
type headProbe struct {
	rev  int64
	sent time.Time
	err  error
}

func newWatchStream(ctx context.Context, cfg watchConfig) *watchStream {
	base, stop := context.WithCancel(clientv3.WithRequireLeader(ctx))
	s := &watchStream{
		cfg:     cfg,
		watcher: clientv3.NewWatcher(cfg.client),
		base:    base,
		stop:    stop,
		kick:    make(chan struct{}, 1),
		backoff: newBackoff(),
		probes:  make(chan headProbe, 1),
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.requestProgressLoop(s.base)
	}()
	return s
}

// requestProgressLoop probes the head and asks for a progress notification
// every interval, and at once when kicked (after a conflict, to learn when
// the state has passed the conflicting revision). The probe goes first and
// the progress request waits at most half an interval: while the watch
// stream reconnects, clientv3 holds a progress request until its context
// ends, and a probe queued behind it would start the outage (see "Outages"
// in docs/DESIGN.md) a whole request timeout late.
func (s *watchStream) requestProgressLoop(ctx context.Context) {
	for {
		interval := s.cfg.progressInterval()
		timer := s.cfg.clock.NewTimer(interval)
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-timer.Chan():
		case <-s.kick:
			timer.Stop()
		}
		s.probeHead(ctx)
		rctx, cancel := etcdreq.Context(ctx, interval/2, s.cfg.client)
		_ = s.watcher.RequestProgress(rctx)
		cancel()
	}
}

// probeHead reads the store revision and hands it (or the error) to the run
// loop. etcd sends no progress notification to a watch whose start revision
// is ahead of the store revision, and that is where a watch that has seen
// everything waits. Without the probe an idle worker could never prove its
// state current, nor notice that etcd stopped answering. It runs every
// progress interval, even while the watch delivers: etcd checks a watch's
// read permission only when the watch is created, so the probe is also how
// a worker whose read permission was revoked finds out. See "Progress
// probe" in docs/DESIGN.md.
func (s *watchStream) probeHead(ctx context.Context) {
	p := headProbe{sent: s.cfg.clock.Now()}
	rctx, cancel := etcdreq.Context(ctx, s.cfg.requestTimeout(), s.cfg.client)
	resp, err := s.cfg.client.Get(rctx, s.cfg.probeKey, clientv3.WithCountOnly())
	cancel()
	if ctx.Err() != nil {
		return // stopping: the error is ours
	}
	if err != nil {
		p.err = err
	} else {
		p.rev = resp.Header.Revision
		if h := s.cfg.head; h != nil {
			storeMax(h, p.rev)
		}
	}
	select { // keep only the newest probe
	case <-s.probes:
	default:
	}
	s.probes <- p
}

// requestProgress asks the progress goroutine for a notification soon.
func (s *watchStream) requestProgress() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// start opens a watch from rev. clientv3's Watch blocks until etcd confirms
// the watch, which never happens while etcd is unreachable, so it runs in a
// goroutine of its own and hands the channel over through opened; the run
// loop keeps serving ctx, the session and the outage limit meanwhile.
func (s *watchStream) start(rev int64) {
	s.closeWatch()
	ctx, cancel := context.WithCancel(s.base)
	s.cancel = cancel
	opened := make(chan clientv3.WatchChan, 1)
	s.opened = opened
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		// WithFragment: the server splits a response over its request
		// limit (many events at once) and the client puts it together
		// again, so a client whose receive limit is below a whole response
		// but above that limit can still watch.
		opened <- s.watcher.Watch(ctx, s.cfg.key, clientv3.WithPrefix(), clientv3.WithRev(rev),
			clientv3.WithProgressNotify(), clientv3.WithFragment())
	}()
}

// startIfDue opens a new watch from rev when none is open or being opened
// and the back-off has passed, and reports whether it did.
func (s *watchStream) startIfDue(now time.Time, rev int64) bool {
	if !s.idle() || now.Before(s.retryAt) {
		return false
	}
	s.start(rev)
	return true
}

// idle reports whether no watch is open or being opened.
func (s *watchStream) idle() bool { return s.ch == nil && s.opened == nil }

// established records the channel of the watch start opened.
func (s *watchStream) established(ch clientv3.WatchChan) {
	s.opened = nil
	s.ch = ch
}

func (s *watchStream) closeWatch() {
	if s.cancel != nil {
		s.cancel()
		s.cancel = nil
	}
	s.ch = nil
	s.opened = nil
}

func (s *watchStream) close() {
	s.closeWatch()
	s.stop()
	s.wg.Wait()
	_ = s.watcher.Close()
}

// handle reads one watch response (ok == false: the channel closed). A
// broken or compacted watch is closed here; a broken one is scheduled to
// reopen after a back-off.
func (s *watchStream) handle(resp clientv3.WatchResponse, ok bool) watchResult {
	if !ok {
		s.retryLater()
		return watchResult{kind: watchFailed, err: context.Canceled}
	}
	if resp.CompactRevision != 0 {
		s.closeWatch()
		return watchResult{kind: watchCompacted, rev: resp.CompactRevision}
	}
	if err := resp.Err(); err != nil {
		s.retryLater()
		return watchResult{kind: watchFailed, err: err}
	}
	s.backoff.Reset()
	if resp.IsProgressNotify() {
		return watchResult{kind: watchProgress, rev: resp.Header.Revision}
	}
	return watchResult{kind: watchEvents, rev: resp.Header.Revision, events: resp.Events}
}

// retryLater closes the current watch and schedules a new one.
func (s *watchStream) retryLater() {
	s.closeWatch()
	s.retryAt = s.cfg.clock.Now().Add(s.backoff.Next())
}

// storeMax stores v in a unless a holds more.
func storeMax(a *atomic.Int64, v int64) {
	for {
		old := a.Load()
		if old >= v || a.CompareAndSwap(old, v) {
			return
		}
	}
}
