package orchestrator

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jonboulle/clockwork"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/etcdworker/orchestrator/internal/etcdreq"
)

// follower is the part of a Source that talks to etcd while workers run on
// it: it loads the prefix, watches it, probes the head, and keeps the copy
// and its change log up to date. It never runs user code and never waits
// for a worker, so the watch is always drained. It reports through the
// Source (the copy under mu, the health under hmu) and signals the workers.
type follower struct {
	s      *Source
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	clock  clockwork.Clock
	log    *zap.Logger

	settings atomic.Pointer[followerSettings]
	kick     chan struct{} // a worker asks for a progress notification
	// clientDone is closed when the Source's client is closed (nil: never).
	clientDone <-chan struct{}
	watch      *watchStream
	health     health    // owned by the follower's goroutine
	lastData   time.Time // when the load in progress last received data
}

func startFollower(s *Source) *follower {
	ctx, cancel := context.WithCancel(context.Background())
	f := &follower{s: s, ctx: ctx, cancel: cancel, clock: s.opts.clock, log: s.log,
		kick: make(chan struct{}, 1)}
	if cctx := s.client.Ctx(); cctx != nil {
		f.clientDone = cctx.Done()
	}
	f.settings.Store(&followerSettings{progressInterval: idleProgressInterval})
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		f.run()
	}()
	return f
}

// idleProgressInterval is how often the follower probes the head while no
// attached worker asked for an interval of its own (progressInterval).
const idleProgressInterval = time.Second

// configure takes the attached workers' settings.
func (f *follower) configure(fs followerSettings) {
	if fs.progressInterval <= 0 {
		fs.progressInterval = idleProgressInterval
	}
	f.settings.Store(&fs)
}

// stop ends the follower and joins its goroutines.
func (f *follower) stop() {
	f.cancel()
	f.wg.Wait()
}

func (f *follower) now() time.Time { return f.clock.Now() }

// run loads the prefix, then follows the watch until stopped or etcd
// rejects the Source's reads for good.
func (f *follower) run() {
	defer func() {
		if f.watch != nil {
			f.watch.close()
		}
	}()
	if err := f.loadWithRetry(); err != nil {
		f.fail(err)
		return
	}
	f.watch = newWatchStream(f.ctx, f.watchConfig())
	f.watch.start(f.eventRev() + 1)
	for {
		wake := f.now().Add(f.settings.Load().progressInterval)
		if f.watch.idle() {
			wake = earliest(wake, f.watch.retryAt)
		}
		if err := f.wait(wake); err != nil {
			f.fail(err)
			return
		}
		if f.ctx.Err() != nil {
			return
		}
		f.watch.startIfDue(f.now(), f.eventRev()+1)
	}
}

// eventRev is the revision every event of the copy is known up to. Only
// the follower writes it, so it reads it without the lock.
func (f *follower) eventRev() int64 { return f.s.copy.eventRev }

// wait blocks until the watch or a probe delivers something or wake comes,
// and acts on it.
func (f *follower) wait(wake time.Time) error {
	timer := f.clock.NewTimer(max(wake.Sub(f.now()), time.Millisecond))
	defer timer.Stop()
	select {
	case <-f.ctx.Done():
		return nil
	case <-f.clientDone:
		// A closed client never heals; its watch may take a while to say so.
		return rejected(f.s.client, "watch", errClientClosed)
	case resp, ok := <-f.watch.ch:
		return f.onWatch(f.watch.handle(resp, ok))
	case ch := <-f.watch.opened:
		f.watch.established(ch)
	case p := <-f.watch.probes:
		return f.onProbe(p)
	case <-f.kick:
		f.watch.requestProgress()
	case <-timer.Chan():
	}
	return nil
}

// fail records a permanent rejection: every worker's Run ends with it.
func (f *follower) fail(err error) {
	if err == nil || f.ctx.Err() != nil {
		return
	}
	f.log.Error("etcd rejected the source's reads", zap.Error(err))
	f.s.hmu.Lock()
	f.s.health.fatal = err
	f.s.hmu.Unlock()
	f.s.signal()
}

// publishHealth tells the workers where the follower stands with etcd.
func (f *follower) publishHealth() {
	f.s.hmu.Lock()
	changed := f.s.health.outageSince != f.health.outageSince
	f.s.health.outageSince = f.health.outageSince
	f.s.health.headRev = max(f.s.health.headRev, f.health.headRev)
	f.s.hmu.Unlock()
	if changed {
		f.s.signal()
	}
}

// answered records a successful answer of etcd at rev (0: none).
func (f *follower) answered(rev int64) {
	if f.health.answered(rev) {
		f.log.Info("etcd answers the source again")
	}
	f.publishHealth()
}

// rejectionOrOutage returns the rejection that ends every worker's Run
// when retrying cannot heal err, the error of a read sent at sent (see
// health.rejectionOrOutage); for any other error it counts the retry,
// publishes the outage to the workers and returns nil: the follower
// retries.
func (f *follower) rejectionOrOutage(request string, sent time.Time, err error) error {
	rej, started := f.health.rejectionOrOutage(f.s.client, request, sent, err)
	if rej != nil {
		return rej
	}
	f.s.metrics.sourceRetries.With(f.s.label).Inc()
	if started {
		f.log.Warn("etcd request of the source failed, retrying", zap.String("request", request), zap.Error(err))
	} else {
		f.log.Debug("etcd request of the source failed again", zap.String("request", request), zap.Error(err))
	}
	f.publishHealth()
	return nil
}

// onWatch acts on what one watch response meant.
func (f *follower) onWatch(res watchResult) error {
	switch res.kind {
	case watchFailed:
		if f.ctx.Err() != nil {
			return nil
		}
		return f.rejectionOrOutage("watch", f.now(), res.err)
	case watchCompacted:
		f.s.metrics.sourceReloads.With(f.s.label).Inc()
		f.log.Warn("watch revision compacted, reloading the source",
			zap.Int64("revision", f.eventRev()+1), zap.Int64("compactRevision", res.rev))
		if err := f.loadWithRetry(); err != nil {
			return err
		}
		f.watch.start(f.eventRev() + 1)
		return nil
	}

	f.answered(res.rev)
	f.s.applyWatch(res)
	f.s.metrics.sourceWatchLag.With(f.s.label).Set(float64(max(f.health.headRev-f.eventRev(), 0)))
	return nil
}

// applyWatch applies one watch response of events or progress to the copy
// and tells the workers.
func (s *Source) applyWatch(res watchResult) {
	s.mu.Lock()
	if res.kind == watchProgress {
		// Every event up to the header revision has been delivered. This
		// only moves the barrier; events are never dropped because of it.
		s.copy.progressed(res.rev)
		s.rev.Store(s.copy.completeRev)
	} else {
		s.applyEvents(res.events)
	}
	s.freshAt = s.opts.clock.Now()
	s.proveReached()
	s.prune()
	s.unlockCopy()
}

// applyEvents applies the events of one watch response to the copy, in
// order; mu is held. A response holds every event of the revisions it covers,
// so afterwards the copy is a snapshot at its last revision. Events at or
// below eventRev were applied already (a replay) and are skipped.
func (s *Source) applyEvents(events []*clientv3.Event) {
	if len(events) == 0 {
		return
	}
	m := s.copy
	from := m.eventRev
	for _, ev := range events {
		if ev.Kv.ModRevision <= from {
			continue
		}
		c, visible := m.apply(ev.Kv, ev.Type == clientv3.EventTypeDelete)
		if !visible {
			continue
		}
		m.set(c)
		s.changes.record(c.key, c.kind(), false)
	}
	m.eventsApplied(events[len(events)-1].Kv.ModRevision)
	s.rev.Store(m.completeRev)
	s.metrics.sourceKeys.With(s.label).Set(float64(m.len()))
}

// onProbe records a head probe: etcd answered, and if the copy has every
// revision up to the probed one, it was current when the probe was sent.
func (f *follower) onProbe(p headProbe) error {
	if p.err != nil {
		return f.rejectionOrOutage("probe", p.sent, p.err)
	}
	f.answered(p.rev)
	f.s.mu.Lock()
	if p.rev <= f.s.copy.completeRev {
		f.s.proven(p)
	} else {
		f.s.pendProof(p) // proven once the copy reaches p.rev (applyWatch)
	}
	f.s.unlockCopy()
	return nil
}

// maxProofs bounds Source.proofs. When it is full, a newer probe replaces
// the newest pending one: the older ones are reached first.
const maxProofs = 16

// pendProof keeps probe p, which found the copy behind the head it read,
// until the copy reaches p.rev; mu is held.
func (s *Source) pendProof(p headProbe) {
	if n := len(s.proofs); n > 0 && !p.sent.After(s.proofs[n-1].sent) {
		return // an answer that overtook a newer probe's: it proves less
	}
	if len(s.proofs) == maxProofs {
		s.proofs[maxProofs-1] = p
		return
	}
	s.proofs = append(s.proofs, p)
}

// proveReached proves the newest pending probe whose revision the copy has
// reached, and drops it and the older ones; mu is held.
func (s *Source) proveReached() {
	i := len(s.proofs) - 1
	for i >= 0 && s.proofs[i].rev > s.copy.completeRev {
		i--
	}
	if i < 0 {
		return
	}
	s.proven(s.proofs[i])
	s.proofs = append(s.proofs[:0], s.proofs[i+1:]...)
}

// proven records that the copy held every revision up to the head probe p
// read, so it was current when p was sent; mu is held.
func (s *Source) proven(p headProbe) {
	if p.sent.After(s.freshAt) {
		s.freshAt = p.sent
	}
	if p.sent.After(s.provenAt) {
		s.provenAt = p.sent
	}
}

// watchConfig is the configuration of the Source's watch.
func (f *follower) watchConfig() watchConfig {
	return watchConfig{
		client:   f.s.client,
		key:      f.s.ks.watchKey,
		probeKey: f.s.ks.counterKey,
		head:     &f.s.headSeen,
		clock:    f.clock,
		requestTimeout: func() time.Duration { // no outage in progress: the probe starts one
			h := health{maxOutage: f.settings.Load().maxOutage}
			return h.requestTimeout(f.now(), f.s.opts.requestTimeout)
		},
		progressInterval: func() time.Duration { return f.settings.Load().progressInterval },
	}
}

// requestTimeout bounds a read sent at now: the Source's timeout, but never
// past the point where its failure would make the outage too long for the
// strictest worker.
func (f *follower) requestTimeout(now time.Time) time.Duration {
	h := f.health
	h.maxOutage = f.settings.Load().maxOutage
	return h.requestTimeout(now, f.s.opts.requestTimeout)
}

// loadWithRetry loads the whole prefix (see load), retrying transient etcd
// errors with back-off until it succeeds, the follower stops or etcd
// rejects the read for good.
func (f *follower) loadWithRetry() error {
	bo := newBackoff()
	for {
		f.lastData = f.now()
		err := f.load()
		if err == nil || f.ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, rpctypes.ErrCompacted) {
			continue // the pinned revision was compacted during the read: start over
		}
		if errors.Is(err, errStreamChunkTooLarge) {
			continue // etcd answered, the client could not take it: start over in pages
		}
		// The outage began when etcd last sent data, not when the read began.
		if err := f.rejectionOrOutage("load", f.lastData, err); err != nil {
			return err
		}
		select {
		case <-f.ctx.Done():
			return nil
		case <-f.clock.After(bo.Next()):
		}
	}
}

// load reads every key under the prefix at one revision into the copy,
// holding mu: the workers never see a copy that is half loaded. Keys that
// differ from the copy (new, changed, vanished) are recorded as changes of
// the load, so every worker is told the difference with isInit = true.
// Unchanged keys (same mod revision) are not. See "Reload diff" in
// docs/DESIGN.md.
func (f *follower) load() error {
	start := f.now()
	rev, keys, err := f.s.loadCopy(start, f.readPrefix)
	if err != nil {
		return err
	}
	f.log.Info("source loaded", zap.Int64("revision", rev), zap.Int("keys", keys),
		zap.Duration("duration", f.now().Sub(start)))
	return nil
}

// prefixReader reads every key under the Source's prefix at one revision,
// calling fn for each in key order, and returns that revision (see
// follower.readPrefix). With sizeCopy the copy is empty and may be sized by
// what the read learns first.
type prefixReader func(sizeCopy bool, fn func(kv *mvccpb.KeyValue)) (int64, error)

// loadCopy makes the copy a snapshot of what read returns, a read sent after
// start, and records in the change log what changed for the workers that
// hold a position. It returns the snapshot's revision and how many keys it
// holds. Until it completes, no worker catches up from the copy: a load that
// fails half way leaves it torn.
func (s *Source) loadCopy(start time.Time, read prefixReader) (rev int64, keys int, err error) {
	s.mu.Lock()
	defer s.unlockCopy()
	s.loaded = false
	m := s.copy
	counters := make(map[string]int64)
	first := m.empty()
	// The changes are recorded for the workers that hold a position. With
	// none (a first load), every worker takes the whole copy, and records
	// would only be pruned at the end of the load (at 100k keys they cost
	// about half of its CPU, and the emptied map kept its memory).
	floor, _ := s.positions()
	record := floor != noPosition
	walk := m.walk()
	rev, err = read(first, func(kv *mvccpb.KeyValue) {
		c, visible := m.apply(kv, false)
		if !visible {
			if isCounter(kv.Key) {
				counters[string(kv.Key)] = kv.ModRevision
			}
			return
		}
		keys++
		prev, had := walk.find(c.key)
		if had && prev.modRev == c.modRev {
			return // unchanged
		}
		c.created = !had
		m.set(c)
		if record {
			s.changes.record(c.key, c.kind(), true)
		}
	})
	vanished := walk.finish(err == nil)
	if err != nil {
		return 0, 0, err
	}
	for _, k := range vanished {
		m.set(keyChange{key: k})
		if record {
			s.changes.record(k, changeDelete, true)
		}
	}
	m.loaded(rev, counters)
	if s.loadedOnce {
		s.reloads++ // a reload within one activation: after a compaction
	}
	s.loadedOnce = true
	s.rev.Store(m.completeRev)
	s.loaded = true
	s.freshAt = s.opts.clock.Now()
	s.provenAt = start // the read was sent after this
	s.prune()
	s.metrics.sourceKeys.With(s.label).Set(float64(m.len()))
	return rev, keys, nil
}

// readPrefix reads every key under the prefix at one revision (see
// readRange: a streaming range, or pinned pages on servers without one),
// calling fn for each. Every key that arrives counts as an answer of etcd,
// so a long read that succeeds chunk by chunk is never an outage; a read
// that stalls fails after the request timeout (bounded by the outage limit)
// without data. With sizeCopy (the copy is empty), the fallback's first
// response sizes the copy.
func (f *follower) readPrefix(sizeCopy bool, fn func(kv *mvccpb.KeyValue)) (int64, error) {
	key := f.s.ks.watchKey
	cfg := readConfig{
		minPageKeys: f.s.opts.pageSize,
		idleTimeout: f.requestTimeout(f.now()),
		support:     &f.s.streamSupport,
		clock:       f.clock,
		// Every chunk is an answer of etcd, published to the workers at
		// once: a long read that follows a failed one ends the outage
		// with its first chunk, not when it is complete (the workers'
		// outage limit counts on it).
		answered: func() {
			f.answered(0)
			f.lastData = f.now()
		},
	}
	if sizeCopy {
		cfg.sizeHint = func(keys int64) error {
			f.s.copy.reserve(int(keys))
			return nil
		}
	}
	ctx, cancel := context.WithCancel(f.ctx)
	ctx, cancel = etcdreq.Bound(ctx, cancel, f.s.client)
	defer cancel()
	path := f.s.streamSupport.readPath()
	rev, err := readRange(ctx, f.s.client, key, clientv3.GetPrefixRangeEnd(key), cfg, func(kv *mvccpb.KeyValue) error {
		fn(kv)
		return nil
	})
	if now := f.s.streamSupport.readPath(); now != path {
		f.logReadPath(ctx, path, now)
	}
	if err != nil {
		return 0, err
	}
	f.answered(rev)
	return rev, nil
}

// logReadPath reports, at Info, that the reads of the prefix changed path
// from was to now: a fall back from the streaming range (with the server's
// version), or the stream again after a fallback.
func (f *follower) logReadPath(ctx context.Context, was, now ReadPath) {
	switch {
	case now == ReadPathFallback:
		f.log.Info("reading the prefix with unary ranges pinned at one revision: etcd has no streaming range (RangeStream), or its chunks are over the client's receive limit",
			zap.String("serverVersion", f.serverVersion(ctx)))
	case was == ReadPathFallback:
		f.log.Info("etcd streams ranges (RangeStream) again: reading the prefix with it")
	}
}

// serverVersion asks etcd for its version (Maintenance.Status), endpoint by
// endpoint, bounded by one request timeout in all; "unknown" when none
// answers.
func (f *follower) serverVersion(ctx context.Context) string {
	ctx, cancel := etcdreq.Context(ctx, f.requestTimeout(f.now()), f.s.client)
	defer cancel()
	for _, ep := range f.s.client.Endpoints() {
		if resp, err := f.s.client.Status(ctx, ep); err == nil {
			return resp.Version
		}
	}
	return "unknown"
}
