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
// any DataPatch, and must be pure: it may run more than once. old is a copy
// of its own: Func may edit it in place and return it (old[0] = 'X'; return
// old, true, nil writes the edited value), and the state never sees the edit.
// An edit Func does not report (changed == false, or an error) is seen by
// nothing: not by the patches after it, a retry or a later flush, wherever
// the patch runs (with or without a general DataPatch before it, or called
// directly by a wrapping DataPatch). The worker copies the slice Func
// returns (unless it is old), so Func may reuse a buffer of its own for what
// it returns: a later call that overwrites it changes no earlier write.
type SingleDataPatch struct {
	Key  util.EtcdKey
	Func func(old []byte) (newValue []byte, changed bool, err error)
}

// Patch implements DataPatch.
func (p SingleDataPatch) Patch(valueMap map[util.EtcdKey][]byte, changedSet map[util.EtcdKey]struct{}) error {
	old := valueMap[p.Key]
	newValue, changed, err := p.apply(optValue{value: old, present: old != nil}.clone().value)
	if err != nil || !changed {
		return err
	}
	changedSet[p.Key] = struct{}{}
	if newValue == nil {
		delete(valueMap, p.Key)
	} else {
		valueMap[p.Key] = newValue
	}
	return nil
}

// apply runs Func on old.
func (p SingleDataPatch) apply(old []byte) (newValue []byte, changed bool, err error) {
	if p.Func == nil {
		return nil, false, fmt.Errorf("%w: SingleDataPatch for key %q has a nil Func", ErrInvalidArgument, p.Key.String())
	}
	return p.Func(old)
}

// asSingle returns the SingleDataPatch behind p, if it is one.
func asSingle(p DataPatch) (SingleDataPatch, bool) {
	switch sp := p.(type) {
	case SingleDataPatch:
		return sp, true
	case *SingleDataPatch:
		return *sp, true
	}
	return SingleDataPatch{}, false
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

// patchView runs patch groups on a copy-on-write view of the mirror: it
// remembers the value of every key the flush touched, and nothing else; the
// state is never cloned. A SingleDataPatch runs on that record alone (and
// keeps the value map, once built, in step with what it accepts). Any other
// DataPatch needs the whole value map: the view then uses the mirror's value
// map (built on first use), which patches mutate in place and reset puts
// back.
//
// Patches own what they are given: every value handed to a patch is a copy
// made when the patch reaches it (a SingleDataPatch's old is never a slice
// of the value map), and every value a general DataPatch leaves in the value
// map is copied twice, once for the record and once back into the map, so
// that the map never holds a slice a patch put there. No patch can change
// the mirror, the state, an earlier patch's result or what a later patch, a
// retry or a later flush sees by editing bytes in place, unless its change
// is accepted. See "Copy on first touch" in docs/DESIGN.md.
type patchView struct {
	mirror committedValues
	values map[util.EtcdKey][]byte // the mirror's value map; nil until needed

	// accepted is the value of each touched key after the last accepted
	// patch; keys not in it still hold their committed value.
	accepted map[util.EtcdKey]optValue
	touched  []util.EtcdKey // keys of accepted, in first-touch order
	scratch  map[util.EtcdKey]struct{}
	group    groupTouches // of the group being applied
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

// clone returns o with a value of its own.
func (o optValue) clone() optValue {
	if o.present {
		o.value = bytes.Clone(o.value)
		if o.value == nil {
			o.value = []byte{}
		}
	}
	return o
}

// committedValues is what a patchView reads: the committed value of one key,
// and the whole value map for general DataPatches. The mirror provides them.
type committedValues interface {
	value(key util.EtcdKey) ([]byte, bool)
	valueMap() map[util.EtcdKey][]byte
}

// newPatchView returns a view over the committed values of m.
func newPatchView(m committedValues) *patchView {
	return &patchView{
		mirror:   m,
		accepted: make(map[util.EtcdKey]optValue),
		scratch:  make(map[util.EtcdKey]struct{}),
	}
}

// current is the value of key after the last accepted patch. It is shared:
// copy it before a patch gets it.
func (v *patchView) current(key util.EtcdKey) optValue {
	if o, ok := v.accepted[key]; ok {
		return o
	}
	val, ok := v.mirror.value(key)
	return optValue{value: val, present: ok}
}

// valueMap returns the value map for a general DataPatch, with every change
// accepted so far in this flush applied to it.
func (v *patchView) valueMap() map[util.EtcdKey][]byte {
	if v.values == nil {
		v.values = v.mirror.valueMap()
		for _, key := range v.touched {
			v.setLive(key, v.accepted[key])
		}
	}
	return v.values
}

// live is a copy of the value of key in the map the patches mutate.
func (v *patchView) live(key util.EtcdKey) optValue {
	val, ok := v.values[key]
	return optValue{value: val, present: ok && val != nil}.clone()
}

// setLive puts a copy of o into the map the patches mutate.
func (v *patchView) setLive(key util.EtcdKey, o optValue) {
	if o.present {
		v.values[key] = o.clone().value
	} else {
		delete(v.values, key)
	}
}

// applyGroup runs one group on the view and returns the keys whose value
// differs from their value before the group (see applyGroupDeps).
func (v *patchView) applyGroup(group []DataPatch) (groupWrites, error) {
	writes, _, err := v.applyGroupDeps(group)
	return writes, err
}

// applyGroupDeps runs one group on the view. It returns the keys whose value
// differs from their value before the group, and the group's read
// dependencies (see ReadDependency) without the keys it writes. A patch
// returning ErrEtcdIgnore is skipped and what it changed is undone; one
// returning ErrEtcdSkipGroup undoes the whole group, which then writes
// nothing. Any other error is returned as is (the caller resets the view).
func (v *patchView) applyGroupDeps(group []DataPatch) (groupWrites, groupDeps, error) {
	g := &v.group
	g.reset()
	defer g.reset() // drop references to keys and values
	var deps groupDeps
	for i, p := range group {
		if isNil(p) {
			return nil, groupDeps{}, fmt.Errorf("%w: patch %d of a group is nil", ErrInvalidArgument, i)
		}
		if deps.addDependency(p) {
			continue
		}
		err := v.applyPatch(p)
		switch {
		case err == nil || errors.Is(err, ErrEtcdIgnore):
		case errors.Is(err, ErrEtcdSkipGroup):
			v.undoGroup()
			return nil, groupDeps{}, nil
		default:
			return nil, groupDeps{}, err
		}
	}
	writes := v.groupWrites()
	return writes, deps.without(writes), nil
}

// applyPatch runs one patch of the current group and accepts what it
// changed. When it fails, what it changed is undone and its error returned.
func (v *patchView) applyPatch(p DataPatch) error {
	if sp, ok := asSingle(p); ok {
		// One key: Func gets a copy of its own, never the live map's slice,
		// so an edit it does not report stays with it.
		old := v.current(sp.Key).clone().value
		newValue, changed, err := callSingle(sp, old)
		if err == nil && changed {
			after := optValue{value: own(newValue, old), present: newValue != nil}
			v.accept(sp.Key, after)
			if v.values != nil {
				v.setLive(sp.Key, after)
			}
		}
		return err
	}
	values := v.valueMap()
	changed := v.scratch
	clear(changed)
	if err := callPatch(p, values, changed); err != nil {
		// Undo whatever the patch changed before it failed.
		for key := range changed {
			v.setLive(key, v.current(key))
		}
		return err
	}
	for key := range changed {
		// The map gets a copy too: the patch may hold the slice it put
		// there (and put it again on a retry), and a later patch may edit
		// the map's slice in place.
		after := v.live(key)
		v.accept(key, after)
		v.setLive(key, after)
	}
	return nil
}

// own returns value as a slice the worker owns: value itself when it starts
// where given (the copy the patch was handed, perhaps edited in place)
// starts, a copy otherwise. A patch may reuse the slice it returned, for
// the next key it writes, say; what it returned must not change with it.
func own(value, given []byte) []byte {
	if value == nil || cap(value) > 0 && cap(given) > 0 && &value[:1][0] == &given[:1][0] {
		return value
	}
	return bytes.Clone(value)
}

// groupWrites returns the keys the current group left with a value other
// than their value before it.
func (v *patchView) groupWrites() groupWrites {
	var writes groupWrites
	for _, t := range v.group.touches {
		after := v.accepted[t.key]
		if after.equal(t.before) {
			continue
		}
		if writes == nil {
			writes = make(groupWrites, 0, len(v.group.touches))
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
	return writes
}

// undoGroup puts every key the current group touched back to its value
// before the group.
func (v *patchView) undoGroup() {
	for _, t := range v.group.touches {
		v.accepted[t.key] = t.before
		if v.values != nil {
			v.setLive(t.key, t.before)
		}
	}
}

// accept records that a patch of the current group left key at after.
func (v *patchView) accept(key util.EtcdKey, after optValue) {
	if !v.group.seen(key) {
		v.group.add(groupTouch{key: key, before: v.current(key)})
	}
	if _, ok := v.accepted[key]; !ok {
		v.touched = append(v.touched, key)
	}
	v.accepted[key] = after
}

// groupTouches are the keys one group touched with their value before it, in
// first-touch order; a set of them only once there are many (a group
// usually touches a key or two, and a map per group costs allocations). It is
// reused from group to group.
type groupTouches struct {
	touches []groupTouch
	set     map[util.EtcdKey]struct{}
}

func (g *groupTouches) seen(key util.EtcdKey) bool {
	if g.set != nil {
		_, ok := g.set[key]
		return ok
	}
	for _, t := range g.touches {
		if t.key == key {
			return true
		}
	}
	return false
}

func (g *groupTouches) add(t groupTouch) {
	g.touches = append(g.touches, t)
	switch {
	case g.set != nil:
		g.set[t.key] = struct{}{}
	case len(g.touches) > smallGroupKeys:
		g.set = make(map[util.EtcdKey]struct{}, 2*len(g.touches))
		for _, t := range g.touches {
			g.set[t.key] = struct{}{}
		}
	}
}

func (g *groupTouches) reset() {
	clear(g.touches)
	g.touches = g.touches[:0]
	g.set = nil
}

// reset puts every touched key back to its committed value and forgets the
// flush.
func (v *patchView) reset() {
	if v.values != nil {
		for _, key := range v.touched {
			val, ok := v.mirror.value(key)
			v.setLive(key, optValue{value: val, present: ok})
		}
	}
	// A patch may have failed with keys not yet accepted: they were undone
	// when it failed.
	clear(v.accepted)
	v.touched = v.touched[:0]
}

// callSingle runs p's Func on old, turning a panic into an error.
func callSingle(p SingleDataPatch, old []byte) (newValue []byte, changed bool, err error) {
	type result struct {
		value   []byte
		changed bool
	}
	res, err := guard("SingleDataPatch.Func", func() (result, error) {
		nv, ch, err := p.apply(old)
		return result{nv, ch}, err
	})
	return res.value, res.changed, err
}

// callPatch runs p.Patch, turning a panic into an error.
func callPatch(p DataPatch, values map[util.EtcdKey][]byte, changed map[util.EtcdKey]struct{}) error {
	_, err := guard("DataPatch.Patch", func() (struct{}, error) { return struct{}{}, p.Patch(values, changed) })
	return err
}
