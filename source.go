package orchestrator

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"
	"weak"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/etcdworker/orchestrator/util"
)

// Source is one load, one watch and one copy of the keys under a prefix,
// shared by every EtcdWorker built with WithSource on it. A worker on the
// Source's prefix, or on a prefix under it, keeps every rule of a worker of
// its own: consistent snapshots, its own read-your-writes barrier, exactly
// once commits, fencing, sessions, limits and errors. Only the load, the
// watch, the progress probes and the copy of the keys are shared.
//
// A Source needs no call of its own to start or stop: it starts its watch
// with the first worker that runs on it and stops it when the last one
// returns. While no worker runs it holds no watch and no goroutine, only its
// copy of the keys (so that the next start reads the prefix once and tells
// the workers what changed) and, for each worker that ran and may run
// again, the changes it has not seen. Drop the Source and its workers to
// free that memory: nothing else refers to them.
//
// Each worker follows the Source at its own pace. When it is busy (a slow
// Tick, Update or patch), the Source keeps draining its watch into the copy
// and the worker later catches up to the copy's newest revision in one
// step: it is told each key that changed once, with its newest value. What a
// slow worker costs is bounded by the number of keys, never by the number of
// events. See "Catching up" in docs/DESIGN.md.
//
// A permanent rejection of the Source's reads (for example permission
// denied on the prefix) ends the Run of every worker on it with that error.
type Source struct {
	client  *clientv3.Client
	ks      keyspace
	opts    sourceOptions
	log     *zap.Logger
	metrics *metrics
	label   prometheus.Labels

	// mu guards the copy and its change log: the follower writes them, the
	// workers read them to catch up. No user code ever runs under it.
	mu      sync.RWMutex
	copy    *mirror
	changes changeLog
	// loaded: the copy is a snapshot of etcd of the current activation (no
	// load is half done). loadedOnce: a load of the activation completed.
	loaded, loadedOnce bool
	// reloads counts the loads after the first of an activation.
	reloads int64
	// freshAt is the newest proof that the copy was current (at completeRev).
	// provenAt is when the newest read was sent that found the copy
	// current (a probe, a load): every write that ended before it is in the
	// copy. A watch response proves freshness, not that.
	freshAt, provenAt time.Time
	// proofs are the probes that found the copy behind the head they read,
	// oldest first (at most maxProofs): once the copy reaches a proof's
	// rev, it proves provenAt = its sent. On a busy server every probe
	// reads a head the watch has not reached yet (the progress that covers
	// it comes after the probe's answer, and on a slow watch after newer
	// probes), so this is how a probe proves anything there.
	proofs []headProbe

	// hmu guards what the follower publishes about its contact with etcd.
	hmu    sync.Mutex
	health sourceHealth

	headSeen      atomic.Int64 // the newest store revision a probe saw
	rev           atomic.Int64 // the copy's completeRev, for lag gauges
	streamSupport streamSupport

	// lifeMu guards the attached cursors and the follower's lifecycle.
	lifeMu   sync.Mutex
	attached map[*cursor]struct{}
	fol      *follower                 // non-nil while a worker runs
	running  atomic.Pointer[[]*cursor] // the attached cursors, for signals (lock free) and the floor
	// parkMu guards parked, the cursors of workers that stopped (held
	// weakly), and every move of a cursor between running and parked:
	// positions reads both under it, so it sees each positioned cursor in
	// one of them, whichever way the cursor moves. It is never held while
	// waiting for anything.
	parkMu sync.Mutex
	parked map[uint64]weak.Pointer[cursor] // by cursor id: the map holds no cursor
	ids    atomic.Uint64
}

// sourceHealth is what the Source's follower reports about etcd to its
// workers.
type sourceHealth struct {
	outageSince time.Time // zero: etcd answers
	headRev     int64
	// fatal is a permanent rejection of the Source's reads: it ends every
	// worker's Run.
	fatal error
}

// SourceOption configures a Source.
type SourceOption interface {
	applySource(*sourceOptions)
}

type sourceOptionFunc func(*sourceOptions)

func (f sourceOptionFunc) applySource(o *sourceOptions) { f(o) }

type sourceOptions struct {
	logger            *zap.Logger
	requestTimeout    time.Duration
	pageSize          int
	metricsRegisterer prometheus.Registerer
	clock             clockwork.Clock // the real one (unit tests of the copy set a fake one); a lone worker's Source shares its worker's
}

func defaultSourceOptions() sourceOptions {
	return sourceOptions{
		logger:         zap.NewNop(),
		requestTimeout: DefaultRequestTimeout,
		pageSize:       DefaultPageSize,
		clock:          clockwork.NewRealClock(),
	}
}

// WithSourceLogger sets the Source's logger. Default: zap.NewNop(). A nil
// logger keeps the default.
func WithSourceLogger(l *zap.Logger) SourceOption {
	return sourceOptionFunc(func(o *sourceOptions) {
		if l != nil {
			o.logger = l
		}
	})
}

// WithSourceMetrics registers the Source's metrics (keys, reloads, watch
// lag; labelled by the Source's prefix) with reg. Default: none.
func WithSourceMetrics(reg prometheus.Registerer) SourceOption {
	return sourceOptionFunc(func(o *sourceOptions) {
		if reg != nil {
			o.metricsRegisterer = reg
		}
	})
}

// WithSourceRequestTimeout sets the timeout of one read of the Source
// (a load that receives nothing for that long, a probe). A worker with a
// shorter WithMaxOutage bounds it further. Default: DefaultRequestTimeout.
func WithSourceRequestTimeout(d time.Duration) SourceOption {
	return sourceOptionFunc(func(o *sourceOptions) { o.requestTimeout = d })
}

// WithSourcePageSize is WithPageSize for a Source's loads. Default:
// DefaultPageSize.
func WithSourcePageSize(n int) SourceOption {
	return sourceOptionFunc(func(o *sourceOptions) { o.pageSize = n })
}

// NewSource returns a Source for the keys under prefix + "/" (prefix is
// normalized with util.NormalizePrefix). It starts nothing: the first worker
// that runs on it does. A nil client or a bad option is an error wrapping
// ErrInvalidArgument.
func NewSource(client *clientv3.Client, prefix string, opts ...SourceOption) (*Source, error) {
	if client == nil {
		return nil, fmt.Errorf("%w: nil etcd client", ErrInvalidArgument)
	}
	o := defaultSourceOptions()
	for _, opt := range opts {
		if opt != nil {
			opt.applySource(&o)
		}
	}
	if err := checkPositiveDuration("WithSourceRequestTimeout", o.requestTimeout); err != nil {
		return nil, err
	}
	if err := checkPageSize("WithSourcePageSize", o.pageSize); err != nil {
		return nil, err
	}
	p := util.NormalizePrefix(prefix)
	if err := checkPrefix(p); err != nil {
		return nil, err
	}
	return newSource(client, p, o)
}

func newSource(client *clientv3.Client, p util.EtcdPrefix, o sourceOptions) (*Source, error) {
	m, err := newMetrics(o.metricsRegisterer)
	if err != nil {
		return nil, fmt.Errorf("orchestrator: register metrics: %w", err)
	}
	s := &Source{
		client:   client,
		ks:       newKeyspace(p),
		opts:     o,
		log:      o.logger.With(zap.String("source", p.String())),
		metrics:  m,
		label:    prometheus.Labels{"source": labelValue(p.String())},
		copy:     newMirror(p),
		changes:  newChangeLog(),
		attached: make(map[*cursor]struct{}),
		parked:   make(map[uint64]weak.Pointer[cursor]),
	}
	s.running.Store(&[]*cursor{})
	return s, nil
}

// WithSource makes the worker follow src instead of loading and watching its
// prefix itself. The worker's prefix must be src's prefix or lie under it;
// otherwise NewEtcdWorker fails with ErrInvalidArgument. Default: every
// worker has a Source of its own. See Source.
func WithSource(src *Source) Option {
	return optionFunc(func(o *options) { o.source = src })
}

// checkWorkerPrefix returns an error unless a worker on p may follow s. (A
// p in a reserved area is refused before, by checkPrefix.)
func (s *Source) checkWorkerPrefix(p util.EtcdPrefix) error {
	if wp := p.String(); wp != s.ks.prefix && !s.ks.contains(wp) {
		return fmt.Errorf("%w: WithSource: worker prefix %q is not the Source's prefix %q nor under it",
			ErrInvalidArgument, wp, s.ks.prefix)
	}
	return nil
}

// cursor is one worker's position in its Source: every change up to seq is
// in the worker's state. It outlives a Run, so that the next Run is only
// told what changed.
type cursor struct {
	ks     keyspace
	notify chan struct{} // a signal: the Source has news
	// seq is the position the worker reached; floor holds the changes after
	// it for the worker (atomic: the follower reads it to prune). told is
	// the most the worker's state was told, perhaps in part (a catch-up
	// that failed): the state may hold a key created up to it.
	seq  atomic.Uint64
	told atomic.Uint64
	id   uint64 // its key among the Source's parked cursors
	// positioned: the worker has a position (it was given a snapshot).
	positioned atomic.Bool
	// full: the next catch-up passes every key from resume on (a first
	// snapshot, or the rest of one that did not complete: it passes keys in
	// key order, and the keys before resume are caught up like any other).
	full   bool
	resume string
	// wants are the worker's settings that shape the follower's requests.
	progressInterval time.Duration
	maxOutage        time.Duration
}

func (s *Source) newCursor(ks keyspace) *cursor {
	return &cursor{ks: ks, notify: make(chan struct{}, 1), full: true, id: s.ids.Add(1)}
}

// attach registers c as running and starts the follower if it is the
// first.
func (s *Source) attach(c *cursor) {
	s.lifeMu.Lock()
	defer s.lifeMu.Unlock()
	s.moveCursor(c, true)
	if s.fol == nil {
		s.hmu.Lock()
		s.health = sourceHealth{}
		s.hmu.Unlock()
		s.mu.Lock()
		s.loaded, s.loadedOnce = false, false
		s.unlockCopy()
		s.fol = startFollower(s)
	}
	s.fol.configure(s.settings())
}

// detach unregisters c; the last worker to leave stops the follower and
// joins its goroutines. A positioned cursor stays parked (held weakly), so
// that the changes after its position are kept for its next Run.
func (s *Source) detach(c *cursor) {
	s.lifeMu.Lock()
	defer s.lifeMu.Unlock()
	s.moveCursor(c, false)
	if len(s.attached) == 0 && s.fol != nil {
		s.fol.stop()
		s.fol = nil
		s.metrics.sourceWatchLag.Delete(s.label)
		return
	}
	if s.fol != nil {
		s.fol.configure(s.settings())
	}
}

// moveCursor makes c a running cursor, or a parked one if it is
// positioned (else it is forgotten: its next Run starts from a snapshot);
// lifeMu is held. The move is one step under parkMu: were running
// published and parked changed apart, positions could read running before
// the cursor joined it and parked after it left, miss the cursor, and
// prune the changes it has not seen (a delete it would never be told).
func (s *Source) moveCursor(c *cursor, run bool) {
	s.parkMu.Lock()
	defer s.parkMu.Unlock()
	if run {
		s.attached[c] = struct{}{}
		delete(s.parked, c.id)
	} else {
		delete(s.attached, c)
		if c.positioned.Load() {
			s.parked[c.id] = weak.Make(c)
		}
	}
	s.publishCursors()
}

// publishCursors makes the attached cursors the ones signalled.
func (s *Source) publishCursors() {
	list := make([]*cursor, 0, len(s.attached))
	for c := range s.attached {
		list = append(list, c)
	}
	s.running.Store(&list)
}

// signal tells every attached worker that the Source has news. It never
// blocks: a worker that has not taken the last signal yet gets one.
func (s *Source) signal() {
	for _, c := range *s.running.Load() {
		select {
		case c.notify <- struct{}{}:
		default:
		}
	}
}

// noPosition is the floor when no worker holds a position.
const noPosition = uint64(1<<64 - 1)

// positions returns the smallest position of a worker that may catch up
// from the change log (the changes up to it can go) and where each such
// worker stands. The follower calls it holding mu, so that a position a
// worker takes under mu is always seen.
func (s *Source) positions() (floor uint64, cursors []cursorPos) {
	floor = noPosition
	see := func(c *cursor) {
		if c.positioned.Load() {
			pos := c.seq.Load()
			floor = min(floor, pos)
			cursors = append(cursors, cursorPos{pos: pos, told: c.told.Load()})
		}
	}
	s.parkMu.Lock()
	defer s.parkMu.Unlock()
	for _, c := range *s.running.Load() {
		see(c)
	}
	for id, wp := range s.parked {
		if c := wp.Value(); c != nil {
			see(c)
		} else {
			delete(s.parked, id) // its worker is gone
		}
	}
	return floor, cursors
}

// prune drops from the change log what no worker needs; mu is held.
func (s *Source) prune() { s.changes.prune(s.positions()) }

// followerSettings are what the attached workers ask of the follower.
type followerSettings struct {
	progressInterval time.Duration
	maxOutage        time.Duration // 0: none
}

// settings combines the wishes of the attached workers: the shortest
// progress interval and outage limit.
func (s *Source) settings() followerSettings {
	var fs followerSettings
	for c := range s.attached {
		if fs.progressInterval == 0 || c.progressInterval < fs.progressInterval {
			fs.progressInterval = c.progressInterval
		}
		if c.maxOutage > 0 && (fs.maxOutage == 0 || c.maxOutage < fs.maxOutage) {
			fs.maxOutage = c.maxOutage
		}
	}
	return fs
}

// healthNow returns what the follower reports.
func (s *Source) healthNow() sourceHealth {
	s.hmu.Lock()
	defer s.hmu.Unlock()
	return s.health
}

// requestProgress asks the follower for a progress notification soon (after
// a conflict, to learn when the copy has passed the conflicting revision).
func (s *Source) requestProgress() {
	s.lifeMu.Lock()
	defer s.lifeMu.Unlock()
	if s.fol != nil {
		select {
		case s.fol.kick <- struct{}{}:
		default:
		}
	}
}

// unlockCopy releases the write lock of the copy and signals every attached
// worker. Each holder of the write lock releases it so, whatever it did: a
// worker whose catch-up found the lock taken, or a writer waiting for it
// (collect only tries the lock), may have used up its signal, and this is
// the one that wakes it again.
func (s *Source) unlockCopy() {
	s.mu.Unlock()
	s.signal()
}

// copyRev is the revision the copy is complete up to.
func (s *Source) copyRev() int64 { return s.rev.Load() }
