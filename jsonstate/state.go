package jsonstate

import (
	"fmt"
	"iter"
	"slices"
	"strings"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/util"
)

// State is an orchestrator.ReactorState holding one JSON document of type T
// per key under a prefix. A document's name is its key without prefix + "/":
// under "/app/nodes" the key "/app/nodes/n1" is the document "n1" (names may
// contain '/', see WithNameFilter). Keys outside prefix + "/" and the key
// prefix + "/" itself are ignored.
//
// The values returned by Get and Range are shared with the state: treat them
// as read-only and change documents through Patch, Put, Delete, DeleteIf or
// Group.
type State[T any] struct {
	prefix string // normalized, e.g. "/app/nodes"
	dir    string // prefix + "/"
	opts   options

	docs    map[string]T
	errs    map[string]*DecodeError
	names   []string // sorted names of docs; nil when it must be rebuilt
	patches [][]orchestrator.DataPatch
}

var _ orchestrator.ReactorState = (*State[struct{}])(nil)

// New returns an empty State for the documents under prefix, the full etcd
// prefix of the documents (e.g. "/app/nodes"; normalized with
// util.NormalizePrefix). It must lie under the worker's prefix for the
// worker to see and write the documents.
func New[T any](prefix string, opts ...Option) *State[T] {
	p := util.NormalizePrefix(prefix)
	return &State[T]{
		prefix: p.String(),
		dir:    p.Dir(),
		opts:   resolveOptions(opts),
		docs:   make(map[string]T),
		errs:   make(map[string]*DecodeError),
	}
}

// Prefix returns the normalized prefix of the documents.
func (s *State[T]) Prefix() string { return s.prefix }

// CheckScope implements orchestrator.ScopedState: some of the documents
// must lie under the worker's prefix + "/" (the state's prefix is under the
// worker's, or the other way round).
func (s *State[T]) CheckScope(workerPrefix util.EtcdPrefix) error {
	if s == nil {
		return fmt.Errorf("jsonstate: nil State: %w", orchestrator.ErrInvalidArgument)
	}
	workerDir := workerPrefix.Dir()
	// s.dir ends with "/": InScope also rules out a reserved area.
	if !orchestrator.InScope(workerPrefix, s.dir) && !strings.HasPrefix(workerDir, s.dir) {
		return fmt.Errorf("%w: state prefix %q is not under worker prefix %q", ErrOutOfScope, s.prefix, workerPrefix.String())
	}
	return nil
}

// Key returns the full etcd key of the document name.
func (s *State[T]) Key(name string) util.EtcdKey { return util.NewEtcdKey(s.dir + name) }

// name returns the document name of key, or false when the state ignores it.
func (s *State[T]) name(key util.EtcdKey) (string, bool) {
	k := key.String()
	if !strings.HasPrefix(k, s.dir) || len(k) == len(s.dir) {
		return "", false
	}
	name := k[len(s.dir):]
	if s.opts.filter != nil && !s.opts.filter(name) {
		return "", false
	}
	return name, true
}

// Update implements orchestrator.ReactorState. A value that does not decode
// is handled by the DecodePolicy: returned as a *DecodeError (default) or
// recorded in Errors.
func (s *State[T]) Update(key util.EtcdKey, value []byte, _ bool) error {
	name, ok := s.name(key)
	if !ok {
		return nil
	}
	if value == nil {
		s.remove(name)
		delete(s.errs, name)
		return nil
	}
	v, derr := decode[T](key, value)
	if derr != nil {
		if s.opts.policy != SkipInvalid {
			return derr
		}
		s.remove(name)
		s.errs[name] = derr
		return nil
	}
	if _, had := s.docs[name]; !had {
		s.names = nil
	}
	s.docs[name] = v
	delete(s.errs, name)
	return nil
}

func (s *State[T]) remove(name string) {
	if _, had := s.docs[name]; had {
		delete(s.docs, name)
		s.names = nil
	}
}

// GetPatches implements orchestrator.ReactorState: it returns the queued
// groups, in the order they were queued, and clears them.
func (s *State[T]) GetPatches() [][]orchestrator.DataPatch {
	p := s.patches
	s.patches = nil
	return p
}

// Get returns the document name and whether it exists (a document that does
// not decode under SkipInvalid does not).
func (s *State[T]) Get(name string) (T, bool) {
	v, ok := s.docs[name]
	return v, ok
}

// Len returns the number of documents.
func (s *State[T]) Len() int { return len(s.docs) }

// Names returns the names of the documents in ascending order, in a new
// slice.
func (s *State[T]) Names() []string { return slices.Clone(s.sortedNames()) }

func (s *State[T]) sortedNames() []string {
	if s.names == nil {
		s.names = make([]string, 0, len(s.docs))
		for name := range s.docs {
			s.names = append(s.names, name)
		}
		slices.Sort(s.names)
	}
	return s.names
}

// Range calls fn for each document in ascending name order until fn returns
// false. Its signature is that of an iter.Seq2, so it can also be used as
// "for name, v := range s.Range".
func (s *State[T]) Range(fn func(name string, v T) bool) {
	for _, name := range s.sortedNames() {
		if !fn(name, s.docs[name]) {
			return
		}
	}
}

// All returns an iterator over the documents in ascending name order.
func (s *State[T]) All() iter.Seq2[string, T] { return s.Range }

// Errors returns the decode errors recorded under SkipInvalid, one per broken
// document, ordered by key. It is empty under FailOnInvalid.
func (s *State[T]) Errors() []*DecodeError {
	out := make([]*DecodeError, 0, len(s.errs))
	for _, e := range s.errs {
		out = append(out, e)
	}
	slices.SortFunc(out, func(a, b *DecodeError) int { return strings.Compare(a.Key, b.Key) })
	return out
}

// Patch queues fn as a change of the document name, in a group of its own.
// See PatchFunc.
func (s *State[T]) Patch(name string, fn PatchFunc[T]) { s.QueueGroup(s.PatchOp(name, fn)) }

// Put queues writing v as the document name (created or replaced), in a
// group of its own. v is encoded now; an encoding error stops the worker
// when the patch runs.
func (s *State[T]) Put(name string, v T) { s.QueueGroup(s.PutOp(name, v)) }

// Delete queues deleting the document name, in a group of its own. Deleting
// an absent document changes nothing.
func (s *State[T]) Delete(name string) { s.QueueGroup(s.DeleteOp(name)) }

// DeleteIf queues deleting the document name if it exists and cond, called
// with its current value at commit time, returns true.
func (s *State[T]) DeleteIf(name string, cond func(v T) (bool, error)) {
	s.QueueGroup(s.DeleteIfOp(name, cond))
}

// PatchOp returns the DataPatch that Patch would queue, for building groups
// across several states (see QueueGroup).
func (s *State[T]) PatchOp(name string, fn PatchFunc[T]) orchestrator.DataPatch {
	if name == "" {
		return emptyNameOp{key: s.Key(name)}
	}
	return patchOp[T]{key: s.Key(name), fn: fn}
}

// PutOp returns the DataPatch that Put would queue.
func (s *State[T]) PutOp(name string, v T) orchestrator.DataPatch {
	if name == "" {
		return emptyNameOp{key: s.Key(name)}
	}
	return newPutOp(s.Key(name), v)
}

// DeleteOp returns the DataPatch that Delete would queue.
func (s *State[T]) DeleteOp(name string) orchestrator.DataPatch {
	return s.DeleteIfOp(name, nil)
}

// DeleteIfOp returns the DataPatch that DeleteIf would queue. A nil cond
// deletes unconditionally.
func (s *State[T]) DeleteIfOp(name string, cond func(v T) (bool, error)) orchestrator.DataPatch {
	if name == "" {
		return emptyNameOp{key: s.Key(name)}
	}
	return deleteOp[T]{key: s.Key(name), cond: cond}
}

// QueueGroup queues patches as one group that commits atomically. The
// patches may come from other states (their ...Op methods) or be any
// orchestrator.DataPatch; they run in the given order and each sees the
// changes of the ones before it. An empty group is not queued.
func (s *State[T]) QueueGroup(patches ...orchestrator.DataPatch) {
	if len(patches) > 0 {
		s.patches = append(s.patches, patches)
	}
}

// Group calls build with a new Group and queues the changes it collected as
// one group that commits atomically: either all of them land or none does.
// A group with no changes is not queued.
func (s *State[T]) Group(build func(g *Group[T])) {
	g := &Group[T]{s: s}
	build(g)
	s.QueueGroup(g.patches...)
}

// Group collects changes that commit together; see State.Group.
type Group[T any] struct {
	s       *State[T]
	patches []orchestrator.DataPatch
}

// Patch adds a change of the document name (see State.Patch).
func (g *Group[T]) Patch(name string, fn PatchFunc[T]) {
	g.patches = append(g.patches, g.s.PatchOp(name, fn))
}

// Put adds writing v as the document name (see State.Put).
func (g *Group[T]) Put(name string, v T) { g.patches = append(g.patches, g.s.PutOp(name, v)) }

// Delete adds deleting the document name (see State.Delete).
func (g *Group[T]) Delete(name string) { g.patches = append(g.patches, g.s.DeleteOp(name)) }

// DeleteIf adds a conditional delete of the document name (see
// State.DeleteIf).
func (g *Group[T]) DeleteIf(name string, cond func(v T) (bool, error)) {
	g.patches = append(g.patches, g.s.DeleteIfOp(name, cond))
}

// Add adds arbitrary patches, e.g. the ...Op of another State or Doc, so that
// they commit atomically with the rest of the group.
func (g *Group[T]) Add(patches ...orchestrator.DataPatch) {
	g.patches = append(g.patches, patches...)
}
