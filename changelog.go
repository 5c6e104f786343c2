package orchestrator

import (
	"slices"

	"github.com/etcdworker/orchestrator/util"
)

// changeLog records which keys of a Source's copy changed, and in which
// order, since the slowest worker's position: what a worker needs to catch
// up from its position to the copy's newest revision. Its size is bounded by
// the number of keys, not by the number of events: each key has one record
// (the newest change), and log entries made stale by a newer change of the
// same key are dropped once there are more than compactMinOver of them. Records every cursor has
// passed are dropped as well. See "Catching up" in docs/DESIGN.md.
//
// Positions are change sequences, not revisions: a reload passes its
// changes in key order, not in revision order, and every change gets the
// next sequence number.
type changeLog struct {
	seq     uint64                        // sequence of the newest change
	changes map[util.EtcdKey]changeRecord // the newest change of each key
	log     []logEntry                    // every change, in sequence order; some stale
	sweepAt int                           // sweep dead records when changes pass it
}

// changeRecord is the newest change of one key, and the key's lives since
// the record began: what tells who may hold it.
type changeRecord struct {
	seq uint64
	// aliveAtStart: the key was held when the record began. flips are the
	// sequences at which it was created and deleted since, alternating (the
	// first is a delete if aliveAtStart). Only the last maxFlips are kept;
	// for a position before foldedBefore the record answers that the state
	// may hold the key.
	aliveAtStart bool
	flips        []uint64
	foldedBefore uint64
	deleted      bool // the newest change deletes the key
	init         bool // the newest change came from a load (Update's isInit)
}

// maxFlips bounds the lives a record keeps (a key re-created again and
// again while a worker lags costs a constant).
const maxFlips = 8

// alive reports whether the key is held after the record's last flip.
func (r changeRecord) alive() bool { return r.aliveAtStart != (len(r.flips)%2 == 1) }

// changeKind is what a change did to its key.
type changeKind int

const (
	changePut    changeKind = iota // a put of a held key
	changeCreate                   // a put that created the key
	changeDelete                   // a delete
)

// mayHold reports whether a state at position pos, which was told (perhaps
// in part) the changes up to told, may hold the key: the key was held at
// pos, or it was created after pos and by told. A delete is passed only to
// such a state: a key created and deleted after everything a state was told
// is never told at all.
func (r changeRecord) mayHold(pos, told uint64) bool {
	if pos < r.foldedBefore {
		return true
	}
	held := r.aliveAtStart
	for i, f := range r.flips {
		creation := (i%2 == 0) != r.aliveAtStart
		switch {
		case f <= pos:
			held = creation
		case creation && f <= told:
			return true
		}
	}
	return held
}

type logEntry struct {
	key util.EtcdKey
	seq uint64
}

func newChangeLog() changeLog {
	return changeLog{changes: make(map[util.EtcdKey]changeRecord), sweepAt: compactMinOver}
}

// record notes a change of key, of kind k, from a load (init) or not. It
// returns its sequence.
func (l *changeLog) record(key util.EtcdKey, k changeKind, init bool) uint64 {
	l.seq++
	rec, had := l.changes[key]
	if !had {
		rec = changeRecord{aliveAtStart: k != changeCreate}
	}
	if flip := k == changeCreate && !rec.alive() || k == changeDelete && rec.alive(); flip {
		if len(rec.flips) == maxFlips { // fold the oldest life
			rec.flips = append(rec.flips[:0:0], rec.flips[2:]...)
			rec.foldedBefore = rec.flips[0]
		}
		rec.flips = append(rec.flips, l.seq)
	}
	rec.seq, rec.init, rec.deleted = l.seq, init, k == changeDelete
	l.changes[key] = rec
	l.log = append(l.log, logEntry{key: key, seq: l.seq})
	return l.seq
}

// cursorPos is where one cursor stands: its position and the most it was
// told (see changeRecord.mayHold).
type cursorPos struct{ pos, told uint64 }

// neededBy reports whether some cursor still needs the record of a deleted
// key: it has not passed the delete, and its state may hold the key.
func (r changeRecord) neededBy(cursors []cursorPos) bool {
	for _, c := range cursors {
		if c.pos < r.seq && r.mayHold(c.pos, c.told) {
			return true
		}
	}
	return false
}

// prune drops what every cursor has passed (floor: the smallest position
// of a cursor), the records of deleted keys that no cursor needs (see
// neededBy), and the stale entries of the log once they are half of it.
// Records are so bounded by the keys some cursor may hold, whatever the
// number of short-lived keys.
func (l *changeLog) prune(floor uint64, cursors []cursorPos) {
	if len(l.changes) > l.sweepAt {
		for k, rec := range l.changes {
			if rec.deleted && !rec.neededBy(cursors) {
				delete(l.changes, k)
			}
		}
		l.sweepAt = max(2*len(l.changes), compactMinOver)
	}
	floor = min(floor, l.seq)
	if floor == l.seq {
		if len(l.log) > 0 {
			l.reset()
		}
		return
	}
	if len(l.log) <= len(l.changes)+compactMinOver && (len(l.log) == 0 || l.log[0].seq > floor) {
		return
	}
	kept := l.log[:0]
	for _, e := range l.log {
		rec := l.changes[e.key]
		if rec.seq != e.seq {
			continue // stale: the key changed again later
		}
		if e.seq <= floor {
			delete(l.changes, e.key)
			continue
		}
		kept = append(kept, e)
	}
	clear(l.log[len(kept):])
	l.log = kept
}

// reset drops every record. After a burst (a reload's diff, a stuck
// worker) it gives the memory back: a cleared map keeps its buckets.
func (l *changeLog) reset() {
	l.sweepAt = compactMinOver
	if cap(l.log) > compactMinOver {
		l.changes, l.log = make(map[util.EtcdKey]changeRecord), nil
		return
	}
	clear(l.changes)
	l.log = l.log[:0]
}

// since calls fn for the newest change of every key that changed after
// position from, in sequence order.
func (l *changeLog) since(from uint64, fn func(key util.EtcdKey, rec changeRecord)) {
	i, _ := slices.BinarySearchFunc(l.log, from+1, func(e logEntry, seq uint64) int {
		switch {
		case e.seq < seq:
			return -1
		case e.seq > seq:
			return 1
		}
		return 0
	})
	for _, e := range l.log[i:] {
		if rec := l.changes[e.key]; rec.seq == e.seq {
			fn(e.key, rec)
		}
	}
}
