package orchestrator

import (
	"bytes"
	"strings"

	"go.etcd.io/etcd/api/v3/mvccpb"

	"github.com/etcdworker/orchestrator/util"
)

// reservedDir is the path segment the worker keeps for its own keys (the
// delete counter and the commit tokens). A key under the prefix whose path
// holds it at any depth belongs to some worker's bookkeeping — the worker's
// own, or that of a worker on a nested prefix — so it never reaches a
// ReactorState and patches may not write it.
const reservedDir = "/__orchestrator/"

// kvEntry is one key as the state has been told it: its value and the mod
// revision that wrote it. In the mirror's map modRev also carries the sweep
// mark (markBit); entry and value return it without.
type kvEntry struct {
	value  []byte
	modRev int64
}

// unsyncedRev marks an entry the state did not take (its Update failed), so
// that a later load, which passes every key whose revision differs, passes it
// again. No key has mod revision 0.
const unsyncedRev = 0

// keyChange is one change of a user-visible key: value == nil deletes it.
type keyChange struct {
	key    util.EtcdKey
	value  []byte
	modRev int64
}

// mirror is the worker's copy of what its ReactorState has been told: every
// visible key under the prefix with its value and mod revision, and the
// revisions that say how complete that copy is. It outlives a Run, so that a
// second Run only tells the state what changed.
//
// Invariants: entries holds no reserved key; every entry's value is non-nil
// (an empty value is a zero-length slice); completeRev >= eventRev.
type mirror struct {
	watchKey   string // prefix + "/"
	counterKey string // the worker's own delete counter

	entries map[util.EtcdKey]kvEntry
	// values holds every committed value for general DataPatches (see
	// valueMap); nil until one needs it. Its slices are copies owned by the
	// patches, never shared with entries or the state: a patch may edit them
	// in place.
	values map[util.EtcdKey][]byte

	// eventRev: every event up to it is in entries (from the watch or a
	// load). completeRev: entries is known complete up to it (eventRev, or a
	// progress notification past it). counterRev: mod revision of the delete
	// counter (0: absent).
	eventRev    int64
	completeRev int64
	counterRev  int64

	// mark is the sweep mark of the current load (0 or markBit): every
	// entry a load visits or writes carries it, so that the entries with
	// the other mark are the ones the load did not find (see endSweep).
	// Flipping it starts a load without touching any entry, and it costs no
	// memory beyond the entries themselves.
	mark int64
}

// markBit holds an entry's sweep mark in its stored mod revision. Revisions
// never reach it.
const markBit = int64(1) << 62

func newMirror(prefix util.EtcdPrefix) *mirror {
	return &mirror{
		watchKey:   prefix.String() + "/",
		counterKey: prefix.String() + reservedDir + "delete-counter",
		entries:    make(map[util.EtcdKey]kvEntry),
	}
}

// isReserved reports whether key, which lies under the prefix, is
// bookkeeping of this worker or of a worker on a nested prefix.
func (m *mirror) isReserved(key []byte) bool {
	rest := key[min(len(m.watchKey)-1, len(key)):]
	return bytes.Contains(rest, []byte(reservedDir))
}

// apply takes one key from etcd (a loaded key, or a watch event; deleted
// for a delete event). It returns the change to tell the state, or false
// when the key is bookkeeping: those are filtered here, and the worker's own
// delete counter moves counterRev. Empty values become non-nil zero-length
// slices (etcd delivers them as nil).
func (m *mirror) apply(kv *mvccpb.KeyValue, deleted bool) (keyChange, bool) {
	if m.isReserved(kv.Key) {
		if string(kv.Key) == m.counterKey {
			m.counterRev = kv.ModRevision
			if deleted {
				m.counterRev = 0
			}
		}
		return keyChange{}, false
	}
	c := keyChange{key: util.NewEtcdKeyFromBytes(kv.Key), modRev: kv.ModRevision}
	if !deleted {
		c.value = kv.Value
		if c.value == nil {
			c.value = []byte{}
		}
	}
	return c, true
}

// set records a change the state took.
func (m *mirror) set(c keyChange) {
	if c.value == nil {
		delete(m.entries, c.key)
		if m.values != nil {
			delete(m.values, c.key)
		}
		return
	}
	m.entries[c.key] = kvEntry{value: c.value, modRev: c.modRev | m.mark}
	if m.values != nil {
		m.values[c.key] = bytes.Clone(c.value)
	}
}

// forget records that the state did not take c: the key stays (or comes
// back) with an impossible revision and the value the state may hold, so
// that the next load passes it again. prev is the entry before c.
func (m *mirror) forget(c keyChange, prev kvEntry, hadPrev bool) {
	switch {
	case c.value != nil:
		m.entries[c.key] = kvEntry{value: c.value, modRev: unsyncedRev | m.mark}
	case hadPrev:
		m.entries[c.key] = kvEntry{value: prev.value, modRev: unsyncedRev | m.mark}
	}
}

// beginSweep starts a load: from now on an entry carries the new mark only
// once the load found it (visit or set).
func (m *mirror) beginSweep() { m.mark ^= markBit }

// visit records that a load found key unchanged at prev (its entry): the
// entry takes the load's mark.
func (m *mirror) visit(key util.EtcdKey, prev kvEntry) {
	prev.modRev |= m.mark
	m.entries[key] = prev
}

// endSweep ends a load that found found keys. When it completed, it returns
// the keys it did not find (they vanished): none when every entry was found,
// which needs no look at the entries. Either way it gives every entry the
// load's mark, so that the next load, which flips the mark, starts with none
// found: after a failed load, and after a vanished key's Update failed
// (the keys not deleted yet stay, and the next load must find them vanished
// again).
func (m *mirror) endSweep(complete bool, found int) []util.EtcdKey {
	if complete && found == len(m.entries) {
		return nil
	}
	var vanished []util.EtcdKey
	for k, e := range m.entries {
		if e.modRev&markBit == m.mark {
			continue
		}
		if complete {
			vanished = append(vanished, k)
		}
		e.modRev ^= markBit
		m.entries[k] = e
	}
	return vanished
}

// entry returns the committed entry of key.
func (m *mirror) entry(key util.EtcdKey) (kvEntry, bool) {
	e, ok := m.entries[key]
	e.modRev &^= markBit
	return e, ok
}

// value returns the committed value of key.
func (m *mirror) value(key util.EtcdKey) ([]byte, bool) {
	e, ok := m.entries[key]
	return e.value, ok
}

// reserve sizes an empty mirror for n keys.
func (m *mirror) reserve(n int) {
	if len(m.entries) == 0 && n > 0 {
		m.entries = make(map[util.EtcdKey]kvEntry, n)
	}
}

// len is the number of visible keys.
func (m *mirror) len() int { return len(m.entries) }

// valueMap returns the map of every committed value for general
// DataPatches, building it on first use (once per worker, not per commit).
func (m *mirror) valueMap() map[util.EtcdKey][]byte {
	if m.values == nil {
		m.values = make(map[util.EtcdKey][]byte, len(m.entries))
		for k, e := range m.entries {
			m.values[k] = bytes.Clone(e.value)
		}
	}
	return m.values
}

// dropValueMap forgets the value map; it is rebuilt from entries when next
// needed. A patch that broke the DataPatch contract (changed keys it did not
// record) may have left it out of step.
func (m *mirror) dropValueMap() { m.values = nil }

// eventsApplied records that every event up to rev is in entries.
func (m *mirror) eventsApplied(rev int64) {
	m.eventRev = max(m.eventRev, rev)
	m.completeRev = max(m.completeRev, m.eventRev)
}

// loaded records a load at rev: entries is exactly etcd at rev.
func (m *mirror) loaded(rev, counterRev int64) {
	m.eventRev = rev
	m.counterRev = counterRev
	m.completeRev = max(m.completeRev, rev)
}

// progressed records that etcd has no event the mirror lacks up to rev.
func (m *mirror) progressed(rev int64) { m.completeRev = max(m.completeRev, rev) }

// writable returns an error when a patch may not write key.
func (m *mirror) writable(key util.EtcdKey) error {
	s := key.String()
	if !strings.HasPrefix(s, m.watchKey) {
		return errKeyOutside(s, "is not under "+m.watchKey)
	}
	if m.isReserved([]byte(s)) {
		return errKeyOutside(s, "is in a worker's reserved area "+reservedDir)
	}
	return nil
}
