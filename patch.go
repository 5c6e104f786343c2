package orchestrator

import (
	"bytes"
	"errors"
	"fmt"

	"github.com/etcdworker/orchestrator/util"
)

// SingleDataPatch is a DataPatch on one key. Func gets the current value (nil
// = absent) and returns the new one. newValue == nil with changed == true
// deletes the key; a non-nil empty slice writes an empty value; changed ==
// false writes nothing. Func may return ErrEtcdIgnore or ErrEtcdTryAgain like
// any DataPatch, and must be pure: it may run more than once.
type SingleDataPatch struct {
	Key  util.EtcdKey
	Func func(old []byte) (newValue []byte, changed bool, err error)
}

// Patch implements DataPatch.
func (p SingleDataPatch) Patch(valueMap map[util.EtcdKey][]byte, changedSet map[util.EtcdKey]struct{}) error {
	if p.Func == nil {
		return fmt.Errorf("%w: SingleDataPatch for key %q has a nil Func", ErrInvalidArgument, p.Key.String())
	}
	newValue, changed, err := p.Func(valueMap[p.Key])
	if err != nil {
		return err
	}
	if !changed {
		return nil
	}
	changedSet[p.Key] = struct{}{}
	if newValue == nil {
		delete(valueMap, p.Key)
	} else {
		valueMap[p.Key] = newValue
	}
	return nil
}

var (
	_ DataPatch = SingleDataPatch{}
	_ DataPatch = (*SingleDataPatch)(nil)
)

// keyWrite is one key a patch group changes: value == nil deletes it.
type keyWrite struct {
	key   util.EtcdKey
	value []byte
}

// groupWrites is what one patch group changes, in the order the keys were
// first touched. An empty slice means the group is a no-op.
type groupWrites []keyWrite

// patchView runs patch groups on a copy-on-write view of the state. The view
// map is the worker's live value map: patches mutate it in place, and the
// view remembers, for every key touched, the value before the flush so that
// reset puts it back. Only touched keys are copied; the state is never cloned.
type patchView struct {
	values    map[util.EtcdKey][]byte // live map handed to patches
	committed func(util.EtcdKey) ([]byte, bool)

	// accepted is the value of each touched key after the last accepted
	// patch; keys not in it still hold their committed value.
	accepted map[util.EtcdKey]optValue
	touched  []util.EtcdKey // keys of accepted, in first-touch order
	scratch  map[util.EtcdKey]struct{}
	// groupScratch is reused by applyGroup for the keys one group touched.
	groupScratch []groupTouch
}

// groupTouch is a key one group touched, with its value before the group.
type groupTouch struct {
	key    util.EtcdKey
	before optValue
}

// smallGroupKeys is how many touched keys a group tracks by linear search
// before it switches to a set.
const smallGroupKeys = 8

type optValue struct {
	value   []byte
	present bool
}

func (o optValue) equal(p optValue) bool {
	return o.present == p.present && bytes.Equal(o.value, p.value)
}

func newPatchView(values map[util.EtcdKey][]byte, committed func(util.EtcdKey) ([]byte, bool)) *patchView {
	return &patchView{
		values:    values,
		committed: committed,
		accepted:  make(map[util.EtcdKey]optValue),
		scratch:   make(map[util.EtcdKey]struct{}),
	}
}

// current is the value of key after the last accepted patch.
func (v *patchView) current(key util.EtcdKey) optValue {
	if o, ok := v.accepted[key]; ok {
		return o
	}
	val, ok := v.committed(key)
	return optValue{value: val, present: ok}
}

// live is the value of key in the map the patches mutate.
func (v *patchView) live(key util.EtcdKey) optValue {
	val, ok := v.values[key]
	return optValue{value: val, present: ok && val != nil}
}

func (v *patchView) setLive(key util.EtcdKey, o optValue) {
	if o.present {
		v.values[key] = o.value
	} else {
		delete(v.values, key)
	}
}

// applyGroup runs one group on the view. It returns the keys whose value
// differs from their value before the group. A patch returning ErrEtcdIgnore
// is skipped and what it changed is undone; any other error is returned as is
// (the caller resets the view).
func (v *patchView) applyGroup(group []DataPatch) (groupWrites, error) {
	// The keys the group touched with their value before it, in first-touch
	// order; a set of them only once there are many (a group usually touches
	// a key or two, and a map per group costs allocations).
	touches := v.groupScratch[:0]
	var touchedSet map[util.EtcdKey]struct{}
	seen := func(key util.EtcdKey) bool {
		if touchedSet != nil {
			_, ok := touchedSet[key]
			return ok
		}
		for _, t := range touches {
			if t.key == key {
				return true
			}
		}
		return false
	}
	for i, p := range group {
		if isNil(p) {
			return nil, fmt.Errorf("%w: patch %d of a group is nil", ErrInvalidArgument, i)
		}
		changed := v.scratch
		clear(changed)
		err := callPatch(p, v.values, changed)
		if err != nil {
			// Undo whatever the patch changed before it failed.
			for key := range changed {
				v.setLive(key, v.current(key))
			}
			if errors.Is(err, ErrEtcdIgnore) {
				continue
			}
			return nil, err
		}
		for key := range changed {
			if !seen(key) {
				touches = append(touches, groupTouch{key: key, before: v.current(key)})
				if touchedSet != nil {
					touchedSet[key] = struct{}{}
				} else if len(touches) > smallGroupKeys {
					touchedSet = make(map[util.EtcdKey]struct{}, 2*len(touches))
					for _, t := range touches {
						touchedSet[t.key] = struct{}{}
					}
				}
			}
			if _, ok := v.accepted[key]; !ok {
				v.touched = append(v.touched, key)
			}
			v.accepted[key] = v.live(key)
		}
	}
	var writes groupWrites
	for _, t := range touches {
		after := v.accepted[t.key]
		if after.equal(t.before) {
			continue
		}
		if writes == nil {
			writes = make(groupWrites, 0, len(touches))
		}
		w := keyWrite{key: t.key}
		if after.present {
			w.value = after.value
			if w.value == nil {
				w.value = []byte{}
			}
		}
		writes = append(writes, w)
	}
	clear(touches) // drop references to keys and values
	v.groupScratch = touches[:0]
	return writes, nil
}

// reset puts every touched key back to its committed value and forgets the
// flush.
func (v *patchView) reset() {
	for _, key := range v.touched {
		val, ok := v.committed(key)
		v.setLive(key, optValue{value: val, present: ok})
	}
	// A patch may have failed with keys not yet accepted: they were undone
	// when it failed.
	clear(v.accepted)
	v.touched = v.touched[:0]
}

// callPatch runs p.Patch, turning a panic into an error.
func callPatch(p DataPatch, values map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = panicError("DataPatch.Patch", r)
		}
	}()
	return p.Patch(values, changed)
}

// panicError wraps a recovered panic value into an error matching ErrPanic.
func panicError(where string, r any) error {
	return fmt.Errorf("%w: %s: %v\n%s", ErrPanic, where, r, stack())
}
