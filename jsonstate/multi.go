package jsonstate

import (
	"fmt"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/util"
)

// Multi is an orchestrator.ReactorState made of several states that each
// pick their own keys out of the worker's prefix, such as States and Docs for
// different prefixes and keys:
//
//	nodes := jsonstate.New[Node]("/app/nodes")
//	config := jsonstate.NewDoc[Config]("/app/config")
//	w, err := orchestrator.NewEtcdWorker(cli, "/app", reactor, jsonstate.Multi{nodes, config})
//
// Update passes every change to every part, in order, and stops at the first
// error. GetPatches returns the groups of the first part, then those of the
// second, and so on: groups queued on different parts are not kept in the
// order they were queued. When the order or atomicity across parts matters,
// queue one group on one part with the parts' ...Op methods (e.g.
// nodes.QueueGroup(nodes.PutOp("n1", n), config.PatchOp(fn))).
type Multi []orchestrator.ReactorState

var _ orchestrator.ReactorState = Multi(nil)

// CheckScope implements orchestrator.ScopedState: every part that is scoped
// must lie under the worker's prefix.
func (m Multi) CheckScope(workerPrefix util.EtcdPrefix) error {
	for i, s := range m {
		if s == nil {
			return fmt.Errorf("jsonstate: part %d of Multi is nil: %w", i, orchestrator.ErrInvalidArgument)
		}
		if sc, ok := s.(orchestrator.ScopedState); ok {
			if err := sc.CheckScope(workerPrefix); err != nil {
				return err
			}
		}
	}
	return nil
}

// Update implements orchestrator.ReactorState.
func (m Multi) Update(key util.EtcdKey, value []byte, isInit bool) error {
	for _, s := range m {
		if err := s.Update(key, value, isInit); err != nil {
			return err
		}
	}
	return nil
}

// GetPatches implements orchestrator.ReactorState.
func (m Multi) GetPatches() [][]orchestrator.DataPatch {
	var out [][]orchestrator.DataPatch
	for _, s := range m {
		out = append(out, s.GetPatches()...)
	}
	return out
}
