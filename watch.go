package orchestrator

import (
	"bytes"
	"context"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/etcdworker/orchestrator/util"
)

// watchStream owns the worker's watch on its prefix: a watcher of its own (so
// that progress requests and notifications concern this watch only), the
// current watch channel, and a goroutine that asks etcd for progress
// notifications. close joins everything.
type watchStream struct {
	r       *run
	watcher clientv3.Watcher
	base    context.Context // watch and progress requests share its metadata
	stop    context.CancelFunc
	cancel  context.CancelFunc      // of the current watch
	ch      clientv3.WatchChan      // nil while no watch is open
	opened  chan clientv3.WatchChan // non-nil while a watch is being opened
	retryAt time.Time
	backoff backoff

	kick chan struct{}
	wg   sync.WaitGroup

	// probes carries the results of head probes (see probeHead) to the run
	// loop; lastResponse is when the run loop last handled a watch response
	// (unix nanoseconds of the worker's clock).
	probes       chan headProbe
	lastResponse atomic.Int64
}

// headProbe is the store revision etcd reported to a read sent at sent.
type headProbe struct {
	rev  int64
	sent time.Time
}

func newWatchStream(r *run) *watchStream {
	base, stop := context.WithCancel(clientv3.WithRequireLeader(r.ctx))
	s := &watchStream{
		r:       r,
		watcher: clientv3.NewWatcher(r.w.client),
		base:    base,
		stop:    stop,
		kick:    make(chan struct{}, 1),
		backoff: newBackoff(),
		probes:  make(chan headProbe, 1),
	}
	s.lastResponse.Store(r.now().UnixNano())
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.requestProgressLoop()
	}()
	return s
}

// progressInterval is how often the worker asks etcd to confirm that its
// watch is current: often enough to prove freshness (and that etcd is
// reachable) well within the staleness and outage bounds.
func (s *watchStream) progressInterval() time.Duration {
	d := s.r.w.opts.maxStaleness / 4
	if o := s.r.w.opts.maxOutage; o > 0 {
		d = min(d, o/4)
	}
	return min(max(d, 50*time.Millisecond), 2*time.Second)
}

// requestProgressLoop asks for a progress notification every interval, and
// at once when kicked (after a conflict, to learn when the state has passed
// the conflicting revision).
func (s *watchStream) requestProgressLoop() {
	clock := s.r.w.opts.clock
	ticker := clock.NewTicker(s.progressInterval())
	defer ticker.Stop()
	for {
		select {
		case <-s.base.Done():
			return
		case <-ticker.Chan():
		case <-s.kick:
		}
		ctx, cancel := context.WithTimeout(s.base, s.r.w.opts.requestTimeout)
		_ = s.watcher.RequestProgress(ctx)
		cancel()
		s.probeHead()
	}
}

// probeHead reads the store revision when the watch has been silent for a
// progress interval, and hands it to the run loop. etcd sends no progress
// notification to a watch whose start revision is ahead of the store
// revision, and that is where a watch that has seen everything waits (the
// worker starts it at the loaded revision + 1, and clientv3 resumes it at
// the last revision + 1 after a reconnect). Without the probe an idle worker
// could never prove its state current, nor etcd reachable.
func (s *watchStream) probeHead() {
	clock := s.r.w.opts.clock
	if clock.Since(time.Unix(0, s.lastResponse.Load())) < s.progressInterval() {
		return
	}
	sent := clock.Now()
	ctx, cancel := context.WithTimeout(s.base, s.r.w.opts.requestTimeout)
	resp, err := s.r.w.client.Get(ctx, s.r.w.counterKey, clientv3.WithCountOnly())
	cancel()
	if err != nil {
		return
	}
	select { // keep only the newest probe
	case <-s.probes:
	default:
	}
	s.probes <- headProbe{rev: resp.Header.Revision, sent: sent}
}

// handleProbe records a head probe: etcd answered, and if the state has
// every revision up to the probed one, the state was current when the probe
// was sent.
func (r *run) handleProbe(p headProbe) {
	r.contact()
	r.headRev = max(r.headRev, p.rev)
	if p.rev <= r.appliedRev && p.sent.After(r.lastFresh) {
		r.lastFresh = p.sent
	}
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
		opened <- s.watcher.Watch(ctx, s.r.w.watchKey, clientv3.WithPrefix(), clientv3.WithRev(rev),
			clientv3.WithProgressNotify())
	}()
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

// retryLater closes the current watch and schedules a new one.
func (s *watchStream) retryLater() {
	s.closeWatch()
	s.retryAt = s.r.now().Add(s.backoff.next())
}

func (s *watchStream) close() {
	s.closeWatch()
	s.stop()
	s.wg.Wait()
	_ = s.watcher.Close()
}

// handle applies one watch response (ok == false: the channel closed).
func (s *watchStream) handle(resp clientv3.WatchResponse, ok bool) error {
	r := s.r
	if !ok {
		if r.ctx.Err() == nil {
			r.failure("watch", context.Canceled)
			s.retryLater()
		}
		return nil
	}
	if resp.CompactRevision != 0 {
		r.m.reloads.Inc()
		r.log.Warn("watch revision compacted, reloading the state",
			zap.Int64("revision", r.eventRev+1), zap.Int64("compactRevision", resp.CompactRevision))
		s.closeWatch()
		if err := r.loadWithRetry(); err != nil {
			return err
		}
		s.start(r.eventRev + 1)
		return nil
	}
	if err := resp.Err(); err != nil {
		if r.ctx.Err() == nil {
			r.failure("watch", err)
			s.retryLater()
		}
		return nil
	}
	s.backoff.reset()
	r.contact()
	r.lastFresh = r.now()
	s.lastResponse.Store(r.lastFresh.UnixNano())
	r.headRev = max(r.headRev, resp.Header.Revision)
	if resp.IsProgressNotify() {
		// Every event up to the header revision has been delivered. This
		// only moves appliedRev (the barrier); events are never dropped
		// because of it.
		r.appliedRev = max(r.appliedRev, resp.Header.Revision)
		return nil
	}
	return r.applyEvents(resp.Events)
}

// applyEvents applies the events of one watch response, in order. A response
// holds every event of the revisions it covers, so after it the state is a
// snapshot at its last revision. Events at or below eventRev were applied
// already (a replay) and are skipped.
func (r *run) applyEvents(events []*clientv3.Event) error {
	if len(events) == 0 {
		return nil
	}
	from := r.eventRev
	for _, ev := range events {
		kv := ev.Kv
		rev := kv.ModRevision
		if rev <= from {
			continue
		}
		if bytes.HasPrefix(kv.Key, []byte(r.w.reserved)) {
			if string(kv.Key) == r.w.counterKey {
				if ev.Type == clientv3.EventTypeDelete {
					r.counterRev = 0
				} else {
					r.counterRev = rev
				}
			}
			continue
		}
		key := util.NewEtcdKeyFromBytes(kv.Key)
		var value []byte
		if ev.Type == clientv3.EventTypePut {
			// An empty value arrives as nil: it is still a put.
			value = kv.Value
			if value == nil {
				value = []byte{}
			}
		}
		if err := r.update(key, value, rev, false); err != nil {
			return err
		}
	}
	if last := events[len(events)-1].Kv.ModRevision; last > r.eventRev {
		r.eventRev = last
	}
	r.appliedRev = max(r.appliedRev, r.eventRev)
	r.m.stateKeys.Set(float64(len(r.w.committed)))
	return nil
}
