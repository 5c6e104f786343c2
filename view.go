package orchestrator

import (
	"bytes"

	"github.com/etcdworker/orchestrator/util"
)

// view is where a worker's state stands in its Source: the revisions it is
// complete up to, the revision of its delete counter, and, once a general
// DataPatch needed it, a map of every value (copies, owned by the patches)
// with their mod revisions. The keys themselves live in the Source's copy.
type view struct {
	// eventRev: every event up to it is in the state. completeRev: the
	// state is known complete up to it (a progress notification may move it
	// past eventRev). counterRev: mod revision of the worker's delete counter
	// at completeRev (0: absent).
	eventRev, completeRev, counterRev int64
	// keys is how many keys the state holds (-1: not counted, for a worker
	// on a prefix under its Source's).
	keys int

	// values is the map general DataPatches mutate (copies owned by the
	// patches; a flush puts back what it changed); committed holds the
	// committed entries of the same keys (the Source's slices, never given
	// to a patch). Both are nil until a general DataPatch needs them.
	values    map[util.EtcdKey][]byte
	committed map[util.EtcdKey]kvEntry
}

// set keeps the value map in step with a change the state took.
func (v *view) set(c keyChange) {
	if v.values == nil {
		return
	}
	if c.value == nil {
		delete(v.values, c.key)
		delete(v.committed, c.key)
		return
	}
	v.values[c.key] = bytes.Clone(c.value)
	v.committed[c.key] = kvEntry{value: c.value, modRev: c.modRev}
}

// dropValues forgets the value map; the next flush that needs it builds it
// again from the Source. A patch that broke the DataPatch contract (changed
// keys it did not record) may have left it out of step.
func (v *view) dropValues() { v.values, v.committed = nil, nil }

// commitView is what one flush runs on: the values and mod revisions of the
// worker's keys at one revision (rev), taken from the Source together with
// the catch-up that moved the state to rev. It holds the keys the flush's
// SingleDataPatches and ReadDependencies name, and the worker's value map
// when a general DataPatch needs every key.
type commitView struct {
	ks         keyspace
	rev        int64
	counterRev int64
	entries    map[util.EtcdKey]kvEntry // value nil: absent
	values     map[util.EtcdKey][]byte  // the view's value map, or nil
	committed  map[util.EtcdKey]kvEntry // the view's committed entries, or nil
	fresh      *freshValues             // what overlay put on top, or nil
}

// flushReads holds what a flush reads, from one flush to the next: the keys
// its patches name and the map their entries go into (commitView's
// entries). A flush empties them instead of making new ones, so flushing
// allocates neither per flush. After a flush of many keys, a flush of far
// fewer makes them anew: a map never shrinks, and one large flush must not
// keep its memory for the rest of the run.
type flushReads struct {
	keys    []util.EtcdKey
	entries map[util.EtcdKey]kvEntry
	peak    int // the most keys a flush named since entries was made
}

// flushReadsKeep is how many keys the buffers may have been sized for and
// still be kept for a flush of any size.
const flushReadsKeep = 1024

// request returns what a flush of groups asks its catch-up for (see
// flushKeys), in the buffers of f, emptied. The previous flush's commit view
// must be done with them.
func (f *flushReads) request(groups [][]DataPatch) flushRequest {
	clear(f.keys) // drop the previous flush's keys
	req := flushKeys(groups, f.keys[:0])
	n := len(req.keys)
	switch {
	case f.entries == nil:
		f.entries, f.peak = make(map[util.EtcdKey]kvEntry, n), n
	case f.peak > flushReadsKeep && n < f.peak/4:
		req.keys = append([]util.EtcdKey(nil), req.keys...)
		f.entries, f.peak = make(map[util.EtcdKey]kvEntry, n), n
	default:
		clear(f.entries)
		f.peak = max(f.peak, n)
	}
	f.keys, req.entries = req.keys, f.entries
	return req
}

// freshValues are values the worker learned from etcd outside its state:
// what the Else of a conflicting Txn read, and what the flush's own landed
// Txns wrote, each with the revision it was observed at. The groups of a
// conflict re-run on them at once instead of waiting for the watch to bring
// them (see "Conflicts re-run at once" in docs/DESIGN.md); they never reach
// the state.
type freshValues struct {
	entries    map[util.EtcdKey]freshEntry
	counterRev int64 // the delete counter's mod revision, observed at counterObs
	counterObs int64 // 0: not observed
}

// freshEntry is one key's committed value (nil: absent) and mod revision, as
// observed at revision obs.
type freshEntry struct {
	kvEntry
	obs int64
}

// set records e as key's value observed at obs, unless a newer observation
// is already there.
func (f *freshValues) set(key util.EtcdKey, e kvEntry, obs int64) {
	if old, ok := f.entries[key]; ok && old.obs >= obs {
		return
	}
	f.entries[key] = freshEntry{kvEntry: e, obs: obs}
}

// setCounter records the delete counter's mod revision observed at obs.
func (f *freshValues) setCounter(rev, obs int64) {
	if obs > f.counterObs {
		f.counterRev, f.counterObs = rev, obs
	}
}

// overlay puts what f observed after v's revision on top of v: the state
// holds everything up to v.rev, so an observation at or before it is older
// than (or the same as) the state's.
func (v *commitView) overlay(f *freshValues) {
	if f == nil {
		return
	}
	v.fresh = f
	for k, e := range f.entries {
		if e.obs > v.rev {
			v.entries[k] = e.kvEntry
		}
	}
	if f.counterObs > v.rev {
		v.counterRev = f.counterRev
	}
}

// newerFresh returns what v's overlay holds that is newer than v's
// revision, as the start of the next overlay.
func (v *commitView) newerFresh() *freshValues {
	f := &freshValues{entries: make(map[util.EtcdKey]freshEntry)}
	if v.fresh == nil {
		return f
	}
	for k, e := range v.fresh.entries {
		if e.obs > v.rev {
			f.entries[k] = e
		}
	}
	if v.fresh.counterObs > v.rev {
		f.counterRev, f.counterObs = v.fresh.counterRev, v.fresh.counterObs
	}
	return f
}

// entry returns the committed value and mod revision of key at rev.
func (v *commitView) entry(key util.EtcdKey) (kvEntry, bool) {
	if e, ok := v.entries[key]; ok {
		return e, e.value != nil
	}
	if v.committed != nil {
		e, ok := v.committed[key]
		return e, ok
	}
	return kvEntry{}, false
}

func (v *commitView) value(key util.EtcdKey) ([]byte, bool) {
	e, ok := v.entry(key)
	return e.value, ok
}

// valueMap returns the value map for general DataPatches: the flush asked
// for it before running them (see flushKeys).
func (v *commitView) valueMap() map[util.EtcdKey][]byte {
	if v.values == nil { // not asked for: a bug; no value is better than a wrong one
		v.values, v.committed = make(map[util.EtcdKey][]byte), make(map[util.EtcdKey]kvEntry)
	}
	return v.values
}

// rerunsAtOnce reports whether groups may re-run at once on the values a
// conflicting Txn read back: every key they read is named (SingleDataPatch,
// ReadDependency), and every such key that matters to the commit was
// compared by the Txn and read by its Else. A SingleDataPatch that leaves
// its key unchanged writes nothing and is not compared (in any commit: a
// decision taken on a value it does not write needs a ReadDependency), so
// its re-run may see the value the flush ran on. A general DataPatch reads
// the whole value map, and a ReadRangeDependency a range whose content the
// Else does not read: such groups wait for the watch.
func rerunsAtOnce(groups [][]DataPatch) bool {
	for _, group := range groups {
		for _, p := range group {
			if isNil(p) {
				return false
			}
			switch p.(type) {
			case ReadDependency, *ReadDependency:
			case ReadRangeDependency, *ReadRangeDependency:
				return false
			default:
				if _, ok := asSingle(p); !ok {
					return false
				}
			}
		}
	}
	return true
}

// flushKeys returns what a flush of groups reads: the keys of its
// SingleDataPatches and ReadDependencies (appended to keys), and whether a
// general DataPatch needs the value map.
func flushKeys(groups [][]DataPatch, keys []util.EtcdKey) flushRequest {
	req := flushRequest{keys: keys}
	for _, group := range groups {
		for _, p := range group {
			var deps groupDeps
			switch {
			case isNil(p): // the flush reports it
			case deps.addDependency(p):
				req.keys = append(req.keys, deps.keys...) // a range needs no value
			default:
				if sp, ok := asSingle(p); ok {
					req.keys = append(req.keys, sp.Key)
				} else {
					req.values = true
				}
			}
		}
	}
	return req
}
