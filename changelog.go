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
// same key are dropped when they pass half the log. Records every cursor has
// passed are dropped as well. See "Catching up" in docs/DESIGN.md.
//
// Positions are change sequences, not revisions: a reload passes its
// changes in key order, not in revision order, and every change gets the
// next sequence number.
type changeLog struct {
	seq     uint64                        // sequence of the newest change
	changes map[util.EtcdKey]changeRecord // the newest change of each key
	log     []logEntry                    // every change, in sequence order; some stale
	floor   uint64                        // changes up to it were pruned
}

// changeRecord is the newest change of one key.
type changeRecord struct {
	seq uint64
	// born: the sequence of the change that created the key, if that is
	// still in the log (0: the key existed before). A worker whose position
	// is before it never saw the key, so a delete is not passed to it.
	born uint64
	// init: the change came from a load (Update's isInit).
	init bool
}

type logEntry struct {
	key util.EtcdKey
	seq uint64
}

func newChangeLog() changeLog {
	return changeLog{changes: make(map[util.EtcdKey]changeRecord)}
}

// record notes a change of key: created (a put that created it), from a
// load (init). It returns its sequence.
func (l *changeLog) record(key util.EtcdKey, created, init bool) uint64 {
	l.seq++
	rec, had := l.changes[key]
	if !had {
		rec.born = 0
		if created {
			rec.born = l.seq
		}
	}
	rec.seq, rec.init = l.seq, init
	l.changes[key] = rec
	l.log = append(l.log, logEntry{key: key, seq: l.seq})
	return l.seq
}

// prune drops what every cursor has passed (floor: the smallest position
// of a cursor) and the stale entries of the log once they are half of it.
func (l *changeLog) prune(floor uint64) {
	floor = min(floor, l.seq)
	l.floor = max(l.floor, floor)
	if floor == l.seq {
		if len(l.log) > 0 {
			l.reset()
		}
		return
	}
	if len(l.log) <= 2*len(l.changes)+compactMinOver && (len(l.log) == 0 || l.log[0].seq > floor) {
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

// complete reports whether the log holds every change after position from:
// pruning drops only what every registered cursor has passed.
func (l *changeLog) complete(from uint64) bool { return from >= l.floor }
