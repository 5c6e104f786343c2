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
// revision that wrote it.
type kvEntry struct {
	value  []byte
	modRev int64
}

// unsyncedRev marks an entry the state did not take (its Update failed), so
// that a later load, which passes every key whose revision differs, passes it
// again.
const unsyncedRev = -1

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

	// sweeping is true during a load: entries the load visits are marked
	// (visitedBit in modRev), and endSweep reports the others as vanished.
	// It costs no memory beyond the entries themselves.
	sweeping bool
}

// visitedBit marks an entry a load visited. Revisions never reach it.
const visitedBit = int64(1) << 62

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
	rev := c.modRev
	if m.sweeping {
		rev |= visitedBit
	}
	m.entries[c.key] = kvEntry{value: c.value, modRev: rev}
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
		m.entries[c.key] = kvEntry{value: c.value, modRev: unsyncedRev}
	case hadPrev:
		m.entries[c.key] = kvEntry{value: prev.value, modRev: unsyncedRev}
	}
}

// beginSweep starts a load: see sweeping.
func (m *mirror) beginSweep() { m.sweeping = true }

// visit marks key as present at modRev in the load, and reports whether
// the mirror already has it at that revision (nothing to tell the state).
func (m *mirror) visit(key util.EtcdKey, modRev int64) bool {
	e, ok := m.entries[key]
	if !ok || e.modRev != modRev {
		return false
	}
	e.modRev |= visitedBit
	m.entries[key] = e
	return true
}

// endSweep ends a load. When complete, it returns the keys the load did not
// visit (they vanished); either way it clears the marks.
func (m *mirror) endSweep(complete bool) []util.EtcdKey {
	m.sweeping = false
	var vanished []util.EtcdKey
	for k, e := range m.entries {
		switch {
		case e.modRev&visitedBit != 0:
			e.modRev &^= visitedBit
			m.entries[k] = e
		case complete:
			vanished = append(vanished, k)
		}
	}
	return vanished
}

// entry returns the committed entry of key.
func (m *mirror) entry(key util.EtcdKey) (kvEntry, bool) {
	e, ok := m.entries[key]
	return e, ok
}

// value returns the committed value of key.
func (m *mirror) value(key util.EtcdKey) ([]byte, bool) {
	e, ok := m.entries[key]
	return e.value, ok
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
