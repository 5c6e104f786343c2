package jsonstate

import (
	"encoding/json"
	"fmt"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/util"
)

// PatchFunc changes one document. v points to a freshly decoded copy of the
// current document, or to the zero T when it does not exist (exists ==
// false). Returning changed == true writes *v back (creating the document if
// needed); changed == false writes nothing. It may return
// orchestrator.ErrEtcdIgnore (skip this change only) or
// orchestrator.ErrEtcdTryAgain (retry the commit on newer state); any other
// error stops the worker. It runs at commit time, possibly more than once, so
// it must be pure: its only effect must be on *v.
type PatchFunc[T any] func(v *T, exists bool) (changed bool, err error)

// decode decodes value into a new T, reporting failures as *DecodeError.
func decode[T any](key util.EtcdKey, value []byte) (T, *DecodeError) {
	var v T
	if err := json.Unmarshal(value, &v); err != nil {
		return v, &DecodeError{Key: key.String(), Err: err}
	}
	return v, nil
}

// patchOp is the DataPatch behind Patch: decode, call fn, encode.
type patchOp[T any] struct {
	key util.EtcdKey
	fn  PatchFunc[T]
}

// Patch implements orchestrator.DataPatch.
func (p patchOp[T]) Patch(valueMap map[util.EtcdKey][]byte, changedSet map[util.EtcdKey]struct{}) error {
	if p.fn == nil {
		return fmt.Errorf("%w: nil PatchFunc for %q", orchestrator.ErrInvalidArgument, p.key.String())
	}
	old := valueMap[p.key]
	exists := old != nil
	var v T
	if exists {
		var derr *DecodeError
		if v, derr = decode[T](p.key, old); derr != nil {
			return derr
		}
	}
	changed, err := p.fn(&v, exists)
	if err != nil || !changed {
		return err
	}
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("jsonstate: cannot encode %q: %w", p.key.String(), err)
	}
	valueMap[p.key] = b
	changedSet[p.key] = struct{}{}
	return nil
}

// putOp is the DataPatch behind Put: the value was encoded when it was
// queued (encErr is reported when the patch runs).
type putOp struct {
	key    util.EtcdKey
	value  []byte
	encErr error
}

func newPutOp[T any](key util.EtcdKey, v T) putOp {
	b, err := json.Marshal(v)
	if err != nil {
		err = fmt.Errorf("jsonstate: cannot encode %q: %w", key.String(), err)
	}
	return putOp{key: key, value: b, encErr: err}
}

// Patch implements orchestrator.DataPatch.
func (p putOp) Patch(valueMap map[util.EtcdKey][]byte, changedSet map[util.EtcdKey]struct{}) error {
	if p.encErr != nil {
		return p.encErr
	}
	valueMap[p.key] = p.value
	changedSet[p.key] = struct{}{}
	return nil
}

// deleteOp is the DataPatch behind Delete and DeleteIf (cond == nil:
// unconditional). Deleting an absent document changes nothing.
type deleteOp[T any] struct {
	key  util.EtcdKey
	cond func(v T) (bool, error)
}

// Patch implements orchestrator.DataPatch.
func (p deleteOp[T]) Patch(valueMap map[util.EtcdKey][]byte, changedSet map[util.EtcdKey]struct{}) error {
	old := valueMap[p.key]
	if old == nil {
		return nil
	}
	if p.cond != nil {
		v, derr := decode[T](p.key, old)
		if derr != nil {
			return derr
		}
		ok, err := p.cond(v)
		if err != nil || !ok {
			return err
		}
	}
	delete(valueMap, p.key)
	changedSet[p.key] = struct{}{}
	return nil
}

// emptyNameOp is the patch of a State's write to the document named "":
// its key, the prefix + "/" itself, is not one of the State's documents
// (it ignores that key when loading, as a directory marker some tools
// write), so the write would land where the State never reads it. It fails
// with ErrEmptyName, and the commit writes nothing.
type emptyNameOp struct{ key util.EtcdKey }

// Patch implements orchestrator.DataPatch: it fails, touching nothing.
func (p emptyNameOp) Patch(map[util.EtcdKey][]byte, map[util.EtcdKey]struct{}) error {
	return fmt.Errorf("%w (key %q): %w", ErrEmptyName, p.key.String(), orchestrator.ErrInvalidArgument)
}
