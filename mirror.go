package orchestrator

import (
	"bytes"
	"slices"
	"strings"
	"unsafe"

	"go.etcd.io/etcd/api/v3/mvccpb"

	"github.com/etcdworker/orchestrator/util"
)

// kvEntry is one key as the state has been told it: its value and the mod
// revision that wrote it. In the mirror's overlay a nil value is a
// tombstone: the key was deleted.
type kvEntry struct {
	value  []byte
	modRev int64
}

// baseEntry is an entry of the mirror's sorted base.
type baseEntry struct {
	key util.EtcdKey
	kvEntry
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
	// created: the mirror does not hold key (a put that created it; etcd
	// counts its version from 1).
	created bool
}

// mirror is the worker's copy of what its ReactorState has been told: every
// visible key under the prefix with its value and mod revision, and the
// revisions that say how complete that copy is. It outlives a Run, so that a
// second Run only tells the state what changed.
//
// The entries live in two parts. base is a slice sorted by key: a load that
// finds the mirror empty appends to it as etcd sends the keys, in key order,
// which costs no hashing and 48 bytes a key. over is a map of every change
// since: an entry, or a tombstone for a deleted key; a key in over hides
// its base entry. A watch event costs one map write, whatever the size of
// base. When over has grown to half of base, the two are merged into a new
// base (compact), so a lookup (a binary search of base when over lacks the
// key) and the memory stay bounded. A reload walks base and over in key
// order beside the keys it reads (mirrorWalk), which finds the vanished
// keys without a second copy of the entries.
//
// Invariants: base is sorted by key with no key twice; no reserved key is
// held; a held entry's value is non-nil (an empty value is a zero-length
// slice); count is the number of held keys; completeRev >= eventRev.
type mirror struct {
	keyspace // the prefix whose keys the mirror holds

	base  []baseEntry
	over  map[util.EtcdKey]kvEntry
	count int
	// walking: a mirrorWalk is under way; compact waits for its end.
	walking bool
	// hinted: the state was told how many keys to expect since the mirror
	// last held a key (a retried load does not tell it again).
	hinted bool

	// values holds every committed value for general DataPatches (see
	// valueMap); nil until one needs it. Its slices are copies owned by the
	// patches, never shared with the entries or the state: a patch may edit
	// them in place.
	values map[util.EtcdKey][]byte

	// eventRev: every event up to it is in the entries (from the watch or a
	// load). completeRev: the entries are known complete up to it
	// (eventRev, or a progress notification past it). counterRev: mod
	// revision of the delete counter (0: absent); counters: that of every
	// delete counter under the prefix (nested prefixes' too).
	eventRev    int64
	completeRev int64
	counterRev  int64
	counters    map[string]int64
}

// compactMinOver is the number of garbage records the change log may keep,
// whatever the number of keys, before it sweeps them.
const compactMinOver = 1024

// overMinCompact is the size over may reach, whatever the size of base,
// before compact merges it. It is small: a key of base that over hides
// (changed or deleted) keeps its old value alive until the merge, so with
// large values on a small prefix a bound of a thousand entries kept up to
// a thousand dead values (gigabytes at etcd's 1.5 MiB). A merge costs the
// size of base, so merging once over reaches half of it stays linear.
const overMinCompact = 16

func newMirror(prefix util.EtcdPrefix) *mirror {
	return &mirror{
		keyspace: newKeyspace(prefix),
		over:     make(map[util.EtcdKey]kvEntry),
	}
}

// apply takes one key from etcd (a loaded key, or a watch event; deleted
// for a delete event). It returns the change to tell the state, or false
// when the key is bookkeeping: those are filtered here, and the worker's own
// delete counter moves counterRev. Empty values become non-nil zero-length
// slices (etcd delivers them as nil). A put at version 1 is marked created;
// a load decides that itself.
func (m *mirror) apply(kv *mvccpb.KeyValue, deleted bool) (keyChange, bool) {
	if m.isReserved(kv.Key) {
		if isCounter(kv.Key) {
			m.setCounter(string(kv.Key), kv.ModRevision, deleted)
		}
		return keyChange{}, false
	}
	c := keyChange{key: ownedKey(kv.Key), modRev: kv.ModRevision}
	if !deleted {
		c.value = kv.Value
		if c.value == nil {
			c.value = []byte{}
		}
		c.created = kv.Version == 1
	}
	return c, true
}

// setCounter records the mod revision of a delete counter (of the prefix's
// workers, or of a nested prefix's).
func (m *mirror) setCounter(key string, rev int64, deleted bool) {
	if deleted {
		rev = 0
		delete(m.counters, key)
	} else {
		if m.counters == nil {
			m.counters = make(map[string]int64)
		}
		m.counters[key] = rev
	}
	if key == m.counterKey {
		m.counterRev = rev
	}
}

// kind is what c does to its key, for the change log.
func (c keyChange) kind() changeKind {
	switch {
	case c.value == nil:
		return changeDelete
	case c.created:
		return changeCreate
	}
	return changePut
}

// ownedKey returns the key b holds without copying it. It is only for the
// keys of etcd's responses: each is decoded into a slice of its own that
// nothing else holds or changes (their values are shared with the state the
// same way), so the string stays what it is and keeps just that slice alive.
// At a million keys the copy would cost an allocation a key during the load.
func ownedKey(b []byte) util.EtcdKey {
	return util.NewEtcdKey(unsafe.String(unsafe.SliceData(b), len(b)))
}

// set records a change the state took. A deletion leaves a tombstone in
// over (whether base holds the key is not looked up: that would cost a
// binary search per event); compact drops it.
func (m *mirror) set(c keyChange) {
	if c.value == nil {
		m.over[c.key] = kvEntry{}
		m.count--
		if m.values != nil {
			delete(m.values, c.key)
		}
		return
	}
	e := kvEntry{value: c.value, modRev: c.modRev}
	m.hinted = false
	if m.appendable(c.key) {
		m.base = append(m.base, baseEntry{key: c.key, kvEntry: e})
	} else {
		m.over[c.key] = e
	}
	if c.created {
		m.count++
	}
	if m.values != nil {
		m.values[c.key] = bytes.Clone(c.value)
	}
}

// appendable reports whether key can go to the end of base: over is empty
// and key sorts after every key of base (so neither holds it).
func (m *mirror) appendable(key util.EtcdKey) bool {
	return len(m.over) == 0 && (len(m.base) == 0 || key.String() > m.base[len(m.base)-1].key.String())
}

// forget records that the state did not take c (c was not set): the key
// stays (or comes back) with an impossible revision and the value the state
// may hold, so that the next load passes it again.
func (m *mirror) forget(c keyChange) {
	if c.value != nil {
		m.over[c.key] = kvEntry{value: c.value, modRev: unsyncedRev}
		if c.created {
			m.count++
		}
		return
	}
	if prev, ok := m.entry(c.key); ok {
		m.over[c.key] = kvEntry{value: prev.value, modRev: unsyncedRev}
	}
}

// entry returns the committed entry of key.
func (m *mirror) entry(key util.EtcdKey) (kvEntry, bool) {
	if e, ok := m.over[key]; ok {
		return e, e.value != nil
	}
	if i, ok := m.search(key); ok {
		return m.base[i].kvEntry, true
	}
	return kvEntry{}, false
}

// search finds key in base.
func (m *mirror) search(key util.EtcdKey) (int, bool) {
	return slices.BinarySearchFunc(m.base, key.String(), func(e baseEntry, k string) int {
		return strings.Compare(e.key.String(), k)
	})
}

// value returns the committed value of key.
func (m *mirror) value(key util.EtcdKey) ([]byte, bool) {
	e, ok := m.entry(key)
	return e.value, ok
}

// each calls fn for every held key, in no particular order.
func (m *mirror) each(fn func(key util.EtcdKey, e kvEntry)) {
	for _, b := range m.base {
		if len(m.over) > 0 {
			if _, hidden := m.over[b.key]; hidden {
				continue
			}
		}
		fn(b.key, b.kvEntry)
	}
	for k, e := range m.over {
		if e.value != nil {
			fn(k, e)
		}
	}
}

// overKeys returns the keys of over, sorted.
func (m *mirror) overKeys() []util.EtcdKey {
	keys := make([]util.EtcdKey, 0, len(m.over))
	for k := range m.over {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b util.EtcdKey) int { return strings.Compare(a.String(), b.String()) })
	return keys
}

// settle compacts the mirror when over has grown to half of base. It is
// called between loads and watch responses, never during a walk.
func (m *mirror) settle() {
	if !m.walking && len(m.over) > overMinCompact && len(m.over) > len(m.base)/2 {
		m.compact()
	}
}

// compact merges over into a new base and empties over.
func (m *mirror) compact() {
	keys := m.overKeys()
	base := make([]baseEntry, 0, m.count)
	i := 0
	for _, k := range keys {
		for ; i < len(m.base) && m.base[i].key.String() < k.String(); i++ {
			base = append(base, m.base[i])
		}
		if i < len(m.base) && m.base[i].key == k {
			i++ // hidden by over
		}
		if e := m.over[k]; e.value != nil {
			base = append(base, baseEntry{key: k, kvEntry: e})
		}
	}
	m.base = append(base, m.base[i:]...)
	m.over = make(map[util.EtcdKey]kvEntry)
}

// reserve sizes an empty mirror for n keys.
func (m *mirror) reserve(n int) {
	if len(m.base) == 0 && len(m.over) == 0 && n > 0 { // not empty(): it may run during a walk
		m.base = make([]baseEntry, 0, n)
	}
}

// empty reports whether the mirror holds no key: a load then has nothing to
// compare with. When every key it held was deleted, it drops their
// tombstones and the stale base, so that the load starts from nothing (and
// appends to the base). It must not be called during a walk.
func (m *mirror) empty() bool {
	if len(m.base) == 0 && len(m.over) == 0 {
		return true
	}
	if m.count != 0 {
		return false
	}
	held := false // count is kept exact; the entries decide all the same
	m.each(func(util.EtcdKey, kvEntry) { held = true })
	if held {
		return false
	}
	m.base, m.over = nil, make(map[util.EtcdKey]kvEntry)
	return true
}

// len is the number of visible keys.
func (m *mirror) len() int { return m.count }

// valueMap returns the map of every committed value for general
// DataPatches, building it on first use (once per worker, not per commit).
func (m *mirror) valueMap() map[util.EtcdKey][]byte {
	if m.values == nil {
		m.values = make(map[util.EtcdKey][]byte, m.count)
		m.each(func(k util.EtcdKey, e kvEntry) { m.values[k] = bytes.Clone(e.value) })
	}
	return m.values
}

// mirrorWalk compares the keys of a load, which arrive in key order, with
// the mirror: find returns the mirror's entry of each, and every key the
// mirror holds between two found keys vanished. The walk reads the base and
// the overlay keys as they were when it began (set appends the load's own
// keys to base, or writes them to over, but only keys the walk passed).
type mirrorWalk struct {
	m        *mirror
	baseLen  int            // base[:baseLen] is walked
	base     int            // next entry of base
	over     []util.EtcdKey // the keys of over when the walk began, sorted
	next     int            // next of over
	vanished []util.EtcdKey
}

// walk starts a walk; finish ends it.
func (m *mirror) walk() *mirrorWalk {
	m.walking = true
	return &mirrorWalk{m: m, baseLen: len(m.base), over: m.overKeys()}
}

// peek returns the smallest key the walk has not passed and whether the
// mirror holds it (false: a tombstone), and which parts it is in.
func (w *mirrorWalk) peek() (key util.EtcdKey, inBase, inOver, more bool) {
	inBase, inOver = w.base < w.baseLen, w.next < len(w.over)
	switch {
	case inBase && inOver:
		b, o := w.m.base[w.base].key, w.over[w.next]
		switch c := strings.Compare(b.String(), o.String()); {
		case c < 0:
			return b, true, false, true
		case c > 0:
			return o, false, true, true
		}
		return o, true, true, true
	case inBase:
		return w.m.base[w.base].key, true, false, true
	case inOver:
		return w.over[w.next], false, true, true
	}
	return util.EtcdKey{}, false, false, false
}

// entryOf returns the mirror's entry of a peeked key.
func (w *mirrorWalk) entryOf(inOver bool) (kvEntry, bool) {
	if inOver {
		e := w.m.over[w.over[w.next]]
		return e, e.value != nil
	}
	return w.m.base[w.base].kvEntry, true
}

func (w *mirrorWalk) advance(inBase, inOver bool) {
	if inBase {
		w.base++
	}
	if inOver {
		w.next++
	}
}

// find returns the mirror's entry of key, which sorts after every key
// found before, and records the held keys it passes as vanished.
func (w *mirrorWalk) find(key util.EtcdKey) (kvEntry, bool) {
	for {
		k, inBase, inOver, more := w.peek()
		if !more {
			return kvEntry{}, false
		}
		c := strings.Compare(k.String(), key.String())
		if c > 0 {
			return kvEntry{}, false
		}
		e, held := w.entryOf(inOver)
		w.advance(inBase, inOver)
		if c == 0 {
			return e, held
		}
		if held {
			w.vanished = append(w.vanished, k)
		}
	}
}

// finish ends the walk. When the load completed, it returns the held keys
// the load did not find: they vanished.
func (w *mirrorWalk) finish(complete bool) []util.EtcdKey {
	w.m.walking = false
	if !complete {
		return nil
	}
	for {
		k, inBase, inOver, more := w.peek()
		if !more {
			return w.vanished
		}
		if _, held := w.entryOf(inOver); held {
			w.vanished = append(w.vanished, k)
		}
		w.advance(inBase, inOver)
	}
}

// eventsApplied records that every event up to rev is in the entries.
func (m *mirror) eventsApplied(rev int64) {
	m.eventRev = max(m.eventRev, rev)
	m.completeRev = max(m.completeRev, m.eventRev)
	m.settle()
}

// loaded records a load at rev: the entries are exactly etcd at rev, and
// counters are the delete counters it found.
func (m *mirror) loaded(rev int64, counters map[string]int64) {
	m.eventRev = rev
	m.counters = counters
	m.counterRev = counters[m.counterKey]
	m.completeRev = max(m.completeRev, rev)
	m.settle()
}

// progressed records that etcd has no event the mirror lacks up to rev.
func (m *mirror) progressed(rev int64) { m.completeRev = max(m.completeRev, rev) }
