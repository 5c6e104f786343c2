package jsonstate

import (
	"fmt"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/util"
)

// Doc is an orchestrator.ReactorState holding a single JSON document of type
// T stored at one key; every other key is ignored. The value returned by Get
// is shared with the state: treat it as read-only and change the document
// through Patch, Put or Delete.
type Doc[T any] struct {
	key  util.EtcdKey
	opts options

	v       T
	exists  bool
	err     *DecodeError
	patches [][]orchestrator.DataPatch
}

var _ orchestrator.ReactorState = (*Doc[struct{}])(nil)

// NewDoc returns an empty Doc for the document at key, a full etcd key used
// as is (it must lie under the worker's prefix). WithNameFilter does not
// apply.
func NewDoc[T any](key string, opts ...Option) *Doc[T] {
	return &Doc[T]{key: util.NewEtcdKey(key), opts: resolveOptions(opts)}
}

// CheckScope implements orchestrator.ScopedState: the document's key must
// lie under the worker's prefix + "/".
func (d *Doc[T]) CheckScope(workerPrefix util.EtcdPrefix) error {
	if d == nil {
		return fmt.Errorf("jsonstate: nil Doc: %w", orchestrator.ErrInvalidArgument)
	}
	if !orchestrator.InScope(workerPrefix, d.key.String()) {
		return fmt.Errorf("%w: document key %q is not under worker prefix %q", ErrOutOfScope, d.key.String(), workerPrefix.String())
	}
	return nil
}

// Key returns the document's etcd key.
func (d *Doc[T]) Key() util.EtcdKey { return d.key }

// Update implements orchestrator.ReactorState. A value that does not decode
// is handled by the DecodePolicy: returned as a *DecodeError (default) or
// recorded in Err.
func (d *Doc[T]) Update(key util.EtcdKey, value []byte, _ bool) error {
	if key != d.key {
		return nil
	}
	var zero T
	if value == nil {
		d.v, d.exists, d.err = zero, false, nil
		return nil
	}
	v, derr := decode[T](key, value)
	if derr != nil {
		if d.opts.policy != SkipInvalid {
			return derr
		}
		d.v, d.exists, d.err = zero, false, derr
		return nil
	}
	d.v, d.exists, d.err = v, true, nil
	return nil
}

// GetPatches implements orchestrator.ReactorState: it returns the queued
// groups, in the order they were queued, and clears them.
func (d *Doc[T]) GetPatches() [][]orchestrator.DataPatch {
	p := d.patches
	d.patches = nil
	return p
}

// Get returns the document and whether it exists (a document that does not
// decode under SkipInvalid does not).
func (d *Doc[T]) Get() (T, bool) { return d.v, d.exists }

// Err returns the decode error of the current value recorded under
// SkipInvalid, or nil.
func (d *Doc[T]) Err() error {
	if d.err == nil {
		return nil
	}
	return d.err
}

// Patch queues fn as a change of the document, in a group of its own. See
// PatchFunc.
func (d *Doc[T]) Patch(fn PatchFunc[T]) { d.QueueGroup(d.PatchOp(fn)) }

// Put queues writing v as the document, in a group of its own. v is encoded
// now; an encoding error stops the worker when the patch runs.
func (d *Doc[T]) Put(v T) { d.QueueGroup(d.PutOp(v)) }

// Delete queues deleting the document, in a group of its own. Deleting an
// absent document changes nothing.
func (d *Doc[T]) Delete() { d.QueueGroup(d.DeleteOp()) }

// PatchOp returns the DataPatch that Patch would queue, for building groups
// with other states (see State.QueueGroup and Group.Add).
func (d *Doc[T]) PatchOp(fn PatchFunc[T]) orchestrator.DataPatch {
	return patchOp[T]{key: d.key, fn: fn}
}

// PutOp returns the DataPatch that Put would queue.
func (d *Doc[T]) PutOp(v T) orchestrator.DataPatch { return newPutOp(d.key, v) }

// DeleteOp returns the DataPatch that Delete would queue.
func (d *Doc[T]) DeleteOp() orchestrator.DataPatch { return deleteOp[T]{key: d.key} }

// QueueGroup queues patches as one group that commits atomically (see
// State.QueueGroup). An empty group is not queued.
func (d *Doc[T]) QueueGroup(patches ...orchestrator.DataPatch) {
	if len(patches) > 0 {
		d.patches = append(d.patches, patches)
	}
}
