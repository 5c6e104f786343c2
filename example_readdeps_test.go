package orchestrator_test

import (
	"fmt"
	"strconv"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/util"
)

// shopState is a ReactorState for the read-dependency example: it only
// queues patches (the example reads etcd's values through the tester).
type shopState struct{ patches [][]orchestrator.DataPatch }

// Update implements orchestrator.ReactorState.
func (*shopState) Update(util.EtcdKey, []byte, bool) error { return nil }

// GetPatches implements orchestrator.ReactorState.
func (s *shopState) GetPatches() [][]orchestrator.DataPatch {
	p := s.patches
	s.patches = nil
	return p
}

// A conditional group: mark an order as accepted only if the stock it reads
// (and does not write) covers it. The check runs in a patch at commit time;
// the ReadDependency makes the commit fail when another writer changed the
// stock after the check saw it, and the worker then re-runs the group on the
// new stock. ErrEtcdSkipGroup drops the whole group when the check fails.
func ExampleReadDependency() {
	stock := util.NewEtcdKey("/shop/stock/apples")
	accept := func(id string, qty int) []orchestrator.DataPatch {
		check := orchestrator.SingleDataPatch{Key: stock, Func: func(old []byte) ([]byte, bool, error) {
			n, err := strconv.Atoi(string(old))
			if err != nil {
				return nil, false, err
			}
			if n < qty {
				return nil, false, orchestrator.ErrEtcdSkipGroup // nothing of the group is written
			}
			return nil, false, nil // reads only
		}}
		mark := orchestrator.SingleDataPatch{Key: util.NewEtcdKey("/shop/orders/" + id),
			Func: func([]byte) ([]byte, bool, error) { return []byte("accepted"), true, nil }}
		return []orchestrator.DataPatch{orchestrator.ReadDependency{Key: stock}, check, mark}
	}

	// Driven by a ReactorStateTester here; a worker commits the same groups
	// as one Txn each, comparing the stock's mod revision.
	state := &shopState{}
	tester := orchestrator.NewReactorStateTester(exampleT{}, state, map[string]string{"/shop/stock/apples": "5"})
	state.patches = append(state.patches, accept("a", 3), accept("b", 9))
	tester.MustApplyPatches()
	entries := tester.KVEntries()
	fmt.Printf("a: %q, b: %q, stock: %s\n", entries["/shop/orders/a"], entries["/shop/orders/b"], entries["/shop/stock/apples"])
	// Output:
	// a: "accepted", b: "", stock: 5
}
