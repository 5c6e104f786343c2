package jsonstate

import (
	"strings"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/util"
)

// Cond decides at commit time whether a group may commit, given the current
// document (the zero T and exists == false when it is absent). Returning
// false skips the whole group; an error stops the worker like a patch error.
// It may run more than once and must be pure.
type Cond[T any] func(v T, exists bool) (bool, error)

// Require makes the group conditional on the document name, which the group
// reads and need not write. When the group commits, cond is called with the
// document as it is then (and as the group's earlier changes left it); if it
// returns false the group is skipped and writes nothing. The group also
// depends on the document (orchestrator.ReadDependency): when another writer
// changes or deletes it after cond saw it, the commit fails and the group,
// cond included, runs again on the new value. A nil cond only adds the
// dependency. A document that does not decode fails with a *DecodeError.
//
// Deciding in Tick instead (reading Get and queueing only when it fits) is
// not safe under contention: the group may commit on a newer state than the
// one Tick saw, and a re-run after a conflict does not call Tick again.
func (g *Group[T]) Require(name string, cond Cond[T]) {
	g.patches = append(g.patches, g.s.RequireOps(name, cond)...)
}

// RequireAll makes the group conditional on all documents of the state: when
// the group commits, cond is called with every document by name, as they are
// then; if it returns false the group is skipped and writes nothing. The
// group also depends on the key range prefix + "/"
// (orchestrator.ReadRangeDependency): when another writer creates or changes
// a document there after cond saw them, the commit fails and the group runs
// again. A document deleted by a client that is not a worker on the same
// etcd prefix is not noticed (see orchestrator.ReadRangeDependency). Under
// SkipInvalid a document that does not decode is left out of docs, as the
// state leaves it out; under FailOnInvalid it fails with a *DecodeError.
func (g *Group[T]) RequireAll(cond func(docs map[string]T) (bool, error)) {
	g.patches = append(g.patches, g.s.RequireAllOps(cond)...)
}

// RequireOps returns the patches Require adds, for groups built with
// QueueGroup or Group.Add on other states.
func (s *State[T]) RequireOps(name string, cond Cond[T]) []orchestrator.DataPatch {
	return requireOps(s.Key(name), cond)
}

// RequireAllOps returns the patches RequireAll adds, for groups built with
// QueueGroup or Group.Add on other states.
func (s *State[T]) RequireAllOps(cond func(docs map[string]T) (bool, error)) []orchestrator.DataPatch {
	dep := orchestrator.ReadRangeDependency{Prefix: s.dir}
	if cond == nil {
		return []orchestrator.DataPatch{dep}
	}
	return []orchestrator.DataPatch{dep, requireAllOp[T]{s: s, cond: cond}}
}

// RequireOps returns patches that make a group conditional on the document
// (see Group.Require), for Group.Add or QueueGroup.
func (d *Doc[T]) RequireOps(cond Cond[T]) []orchestrator.DataPatch { return requireOps(d.key, cond) }

func requireOps[T any](key util.EtcdKey, cond Cond[T]) []orchestrator.DataPatch {
	dep := orchestrator.ReadDependency{Key: key}
	if cond == nil {
		return []orchestrator.DataPatch{dep}
	}
	return []orchestrator.DataPatch{dep, requireOp[T]{key: key, cond: cond}}
}

// requireOp is the condition behind Require: it changes nothing and skips
// the group when cond says no.
type requireOp[T any] struct {
	key  util.EtcdKey
	cond Cond[T]
}

// Patch implements orchestrator.DataPatch.
func (p requireOp[T]) Patch(valueMap map[util.EtcdKey][]byte, _ map[util.EtcdKey]struct{}) error {
	old := valueMap[p.key]
	var v T
	if old != nil {
		var derr *DecodeError
		if v, derr = decode[T](p.key, old); derr != nil {
			return derr
		}
	}
	return verdict(p.cond(v, old != nil))
}

// requireAllOp is the condition behind RequireAll.
type requireAllOp[T any] struct {
	s    *State[T]
	cond func(docs map[string]T) (bool, error)
}

// Patch implements orchestrator.DataPatch.
func (p requireAllOp[T]) Patch(valueMap map[util.EtcdKey][]byte, _ map[util.EtcdKey]struct{}) error {
	docs := make(map[string]T)
	for key, value := range valueMap {
		if value == nil || !strings.HasPrefix(key.String(), p.s.dir) {
			continue
		}
		name, ok := p.s.name(key)
		if !ok {
			continue
		}
		v, derr := decode[T](key, value)
		if derr != nil {
			if p.s.opts.policy == SkipInvalid {
				continue
			}
			return derr
		}
		docs[name] = v
	}
	return verdict(p.cond(docs))
}

// verdict turns a condition's answer into a patch result.
func verdict(ok bool, err error) error {
	if err != nil {
		return err
	}
	if !ok {
		return orchestrator.ErrEtcdSkipGroup
	}
	return nil
}
