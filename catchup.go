package orchestrator

import (
	"bytes"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/etcdworker/orchestrator/util"
)

// Catching up: a worker takes what changed in its Source's copy since its
// position, at one revision, under the Source's read lock, and tells its
// state outside the lock. See "Catching up" in docs/DESIGN.md.

// catchUp is what a worker needs to move its state from its position to the
// copy's revision: it is taken under the Source's read lock and applied
// outside it. Values are the copy's own slices (never modified: the copy
// replaces a value, it never edits one).
type catchUp struct {
	// full: pass every key of the worker's range (base, then the live
	// entries of over), after the deletes in changes.
	full    bool
	base    []baseEntry // the copy's base within the range (read only)
	over    []baseEntry // the copy's overlay within the range, sorted (value nil: deleted)
	changes []change

	seq                               uint64 // the position the worker reaches
	reloads                           int64  // the Source's reloads so far
	eventRev, completeRev, counterRev int64
	freshAt                           time.Time // the copy was current then
	provenAt                          time.Time // a read sent then found the copy current
	keys                              int       // keys in the range; -1: not counted
	hint                              int       // full: how many keys to expect

	// For a flush: the entries of the keys asked for (value nil: absent),
	// and the value map when one was asked for.
	entries   map[util.EtcdKey]kvEntry
	values    map[util.EtcdKey][]byte
	committed map[util.EtcdKey]kvEntry
}

// change is one change to tell a state.
type change struct {
	keyChange
	init bool
}

// flushRequest asks a catch-up for the entries a flush reads.
type flushRequest struct {
	keys   []util.EtcdKey
	values bool // build the value map of the whole range
	// entries is the empty map the entries go into (see flushReads);
	// nil: the catch-up makes one.
	entries map[util.EtcdKey]kvEntry
}

// collect takes what c needs to catch up, at the copy's newest revision. It
// reports false while the copy holds no load of the current activation, and
// while the follower holds or waits for the write lock: a (re)load can take
// seconds, and a worker must not wait for it (it would not see its ctx end);
// every release of the write lock signals the workers (unlockCopy).
func (s *Source) collect(c *cursor, req *flushRequest) (catchUp, bool) {
	if !s.mu.TryRLock() {
		return catchUp{}, false
	}
	defer s.mu.RUnlock()
	if !s.loaded {
		return catchUp{}, false
	}
	m := s.copy
	b := catchUp{
		seq:         s.changes.seq,
		eventRev:    m.eventRev,
		completeRev: m.completeRev,
		counterRev:  m.counters[c.ks.counterKey],
		freshAt:     s.freshAt,
		provenAt:    s.provenAt,
		keys:        -1,
		reloads:     s.reloads,
	}
	if c.ks.prefix == s.ks.prefix {
		b.keys = m.len()
	}
	if c.full {
		b.full = true
		s.collectAll(c, &b)
	} else {
		b.changes = s.changesSince(c, c.seq.Load(), false)
	}
	if !c.positioned.Load() {
		// Pin the position: from now on the change log keeps what comes
		// after it (the follower prunes under the write lock).
		c.seq.Store(b.seq)
		c.positioned.Store(true)
	}
	// From now on the state may hold any key created up to b.seq, even if
	// telling it fails half way.
	c.told.Store(max(c.told.Load(), b.seq))
	if req != nil {
		b.entries = req.entries
		if b.entries == nil {
			b.entries = make(map[util.EtcdKey]kvEntry, len(req.keys))
		}
		for _, k := range req.keys {
			var e kvEntry // absent: a key outside the worker's range is none of its keys
			if c.ks.visible(k.String()) {
				e, _ = m.entry(k)
			}
			b.entries[k] = e
		}
		if req.values {
			b.values, b.committed = make(map[util.EtcdKey][]byte), make(map[util.EtcdKey]kvEntry)
			s.eachIn(c.ks, func(k util.EtcdKey, e kvEntry) {
				b.values[k] = e.value // shared: copied once the lock is released (ownValues)
				b.committed[k] = e
			})
		}
	}
	return b, true
}

// ownValues gives the value map the catch-up collected copies of its own:
// the patches may edit them. collect only shares the copy's values (which
// the copy never edits), so that the copying of a whole prefix does not
// hold the Source's lock, which the follower and the other workers wait for.
func (b *catchUp) ownValues() {
	for k, v := range b.values {
		b.values[k] = bytes.Clone(v)
	}
}

// changesSince lists the newest change of every key of c's range changed
// after position from; deletesOnly keeps only deletes.
func (s *Source) changesSince(c *cursor, from uint64, deletesOnly bool) []change {
	var out []change
	s.changes.since(from, func(key util.EtcdKey, rec changeRecord) {
		if !c.ks.contains(key.String()) {
			return
		}
		e, held := s.copy.entry(key)
		switch {
		case held && !deletesOnly:
			out = append(out, change{keyChange: keyChange{key: key, value: e.value, modRev: e.modRev}, init: rec.init})
		case !held && rec.mayHold(from, c.told.Load()):
			out = append(out, change{keyChange: keyChange{key: key}, init: rec.init || deletesOnly})
		}
	})
	return out
}

// collectAll takes every key of c's range from c.resume on, in key order:
// the base part as a sub-slice (base entries are never modified, and
// appends go past its end) and over as a sorted copy. A cursor with a
// position (a full catch-up that did not complete) also gets the changes
// since it of the keys before resume, which it was told, and a delete of
// resume itself if that vanished: its Update had failed.
func (s *Source) collectAll(c *cursor, b *catchUp) {
	m := s.copy
	lo, hi := baseRange(m.base, c.ks.watchKey)
	if c.resume != "" {
		from, _ := slices.BinarySearchFunc(m.base[lo:hi], c.resume, func(e baseEntry, k string) int {
			return strings.Compare(e.key.String(), k)
		})
		lo += from
	}
	b.base = m.base[lo:hi:hi]
	for k, e := range m.over {
		if ks := k.String(); c.ks.contains(ks) && ks >= c.resume {
			b.over = append(b.over, baseEntry{key: k, kvEntry: e})
		}
	}
	slices.SortFunc(b.over, func(a, b baseEntry) int { return strings.Compare(a.key.String(), b.key.String()) })
	b.hint = -1 // counted by fills, outside the lock
	if c.ks.prefix == s.ks.prefix && c.resume == "" {
		b.hint = m.len()
	}
	if !c.positioned.Load() {
		return
	}
	for _, ch := range s.changesSince(c, c.seq.Load(), false) {
		switch k := ch.key.String(); {
		case k < c.resume:
			b.changes = append(b.changes, ch)
		case k == c.resume && ch.value == nil:
			b.changes = append(b.changes, ch)
		}
	}
}

// fullEntries calls fn for every live entry of a full catch-up in key
// order: base and over merged, over hiding base.
func (b *catchUp) fullEntries(fn func(key util.EtcdKey, e kvEntry) error) error {
	i, j := 0, 0
	for i < len(b.base) || j < len(b.over) {
		var e baseEntry
		switch {
		case j == len(b.over) || i < len(b.base) && b.base[i].key.String() < b.over[j].key.String():
			e = b.base[i]
			i++
		default:
			e = b.over[j]
			if i < len(b.base) && b.base[i].key == e.key {
				i++ // hidden by over
			}
			j++
		}
		if e.value == nil {
			continue
		}
		if err := fn(e.key, e.kvEntry); err != nil {
			return err
		}
	}
	return nil
}

// baseRange returns the part of base whose keys start with watchKey.
func baseRange(base []baseEntry, watchKey string) (lo, hi int) {
	cmp := func(e baseEntry, k string) int { return strings.Compare(e.key.String(), k) }
	lo, _ = slices.BinarySearchFunc(base, watchKey, cmp)
	hi = lo + sort.Search(len(base)-lo, func(i int) bool { return !strings.HasPrefix(base[lo+i].key.String(), watchKey) })
	return lo, hi
}

// eachIn calls fn for every held key of ks's range.
func (s *Source) eachIn(ks keyspace, fn func(util.EtcdKey, kvEntry)) {
	m := s.copy
	lo, hi := baseRange(m.base, ks.watchKey)
	for _, e := range m.base[lo:hi] {
		if _, hidden := m.over[e.key]; !hidden {
			fn(e.key, e.kvEntry)
		}
	}
	for k, e := range m.over {
		if e.value != nil && ks.contains(k.String()) {
			fn(k, e)
		}
	}
}

// catchUp moves the state to the Source's newest revision. It reports
// false while the Source has no snapshot to give yet.
func (r *run) catchUp(req *flushRequest) (catchUp, bool, error) {
	if r.ctxDone() {
		// A caller that cancels and then closes the client stops Run; the
		// Source's rejection of the closed client is not the cause.
		return catchUp{}, false, r.stopErr()
	}
	h := r.src.healthNow()
	if h.fatal != nil {
		return catchUp{}, false, h.fatal
	}
	r.followSource(h)
	b, ok := r.src.collect(r.cur, req)
	if !ok {
		return catchUp{}, false, nil
	}
	b.ownValues()
	if err := r.applyCatchUp(b); err != nil {
		return catchUp{}, false, err
	}
	return b, true, nil
}

// applyCatchUp tells the state what b holds. The worker's position moves
// only once all of it was taken: after an error, or when Run's ctx ends
// part-way (each Update may be slow, and a catch-up may bring every key),
// the next Run passes it again.
func (r *run) applyCatchUp(b catchUp) error {
	v := r.view
	if n := b.fills(v.keys); n > 0 {
		if err := r.expectKeys(n); err != nil {
			return err
		}
	}
	for _, ch := range b.changes {
		if err := r.update(ch.keyChange, ch.init || b.full); err != nil {
			return err
		}
	}
	if b.full {
		err := b.fullEntries(func(key util.EtcdKey, e kvEntry) error {
			if err := r.update(keyChange{key: key, value: e.value, modRev: e.modRev}, true); err != nil {
				// The keys before this one are the snapshot at b.seq: the next
				// Run catches them up from there and goes on from this key.
				r.cur.resume = key.String()
				r.cur.seq.Store(b.seq)
				return err
			}
			return nil
		})
		if err != nil {
			return err
		}
		r.cur.full, r.cur.resume = false, ""
	}
	if b.values != nil {
		v.values, v.committed = b.values, b.committed
	}
	r.cur.seq.Store(b.seq)
	if r.synced && b.reloads > r.reloadsSeen {
		r.m.reloads.Add(float64(b.reloads - r.reloadsSeen))
	}
	r.reloadsSeen = b.reloads
	v.eventRev = max(v.eventRev, b.eventRev)
	v.completeRev = max(v.completeRev, b.completeRev)
	v.counterRev = b.counterRev
	r.health.fresh(b.freshAt)
	v.keys = b.keys
	if b.keys >= 0 {
		r.m.stateKeys.Set(float64(b.keys))
	}
	return nil
}

// update tells the state about one change and keeps the worker's value map
// (if it has one) in step. Once Run's ctx has ended it tells nothing and
// returns the stop: a cancel does not wait for the rest of a catch-up.
func (r *run) update(c keyChange, isInit bool) error {
	if r.ctxDone() {
		return r.stopErr()
	}
	_, err := guard("ReactorState.Update", func() (struct{}, error) {
		return struct{}{}, r.state.Update(c.key, c.value, isInit)
	})
	if err != nil {
		err = r.userFailure(fmt.Errorf("orchestrator: ReactorState.Update(%q): %w", c.key.String(), err))
		r.log.Error("ReactorState.Update failed", zap.String("key", c.key.String()), zap.Error(err))
		return err
	}
	r.view.set(c)
	r.gate.changedState()
	return nil
}

// fills returns how many keys b brings into a state that holds none (had:
// the keys the state held, -1: not known), or 0: a full catch-up brings its
// keys to a new state, a reload's changes to a state whose keys all
// vanished.
func (b *catchUp) fills(had int) int {
	if b.full {
		if b.hint < 0 {
			b.hint = 0
			_ = b.fullEntries(func(util.EtcdKey, kvEntry) error { b.hint++; return nil })
		}
		return b.hint
	}
	if had != 0 {
		return 0
	}
	n := 0
	for _, ch := range b.changes {
		if ch.init && ch.value != nil {
			n++
		}
	}
	return n
}

// expectKeys passes the number of keys a catch-up brings to an empty
// SizedState (once for a full catch-up that is retried).
func (r *run) expectKeys(keys int) error {
	ss, ok := r.state.(SizedState)
	if !ok || r.cur.resume != "" {
		return nil
	}
	_, err := guard("SizedState.ExpectKeys", func() (struct{}, error) {
		ss.ExpectKeys(keys)
		return struct{}{}, nil
	})
	return r.userFailure(err)
}

// followSource takes the Source's contact with etcd into the worker's
// health: an outage of the Source is the worker's outage too.
func (r *run) followSource(h sourceHealth) {
	r.health.headRev = max(r.health.headRev, h.headRev)
	if r.health.external != h.outageSince {
		if r.health.external.IsZero() && r.health.outageSince.IsZero() {
			r.m.outages.Inc()
		}
		r.health.external = h.outageSince
		r.publishStatus()
	}
}
