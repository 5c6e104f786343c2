package orchestrator_test

import (
	"context"
	"fmt"
	"time"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/orchestratortest"
	"github.com/etcdworker/orchestrator/util"
)

// inventory is a map-based ReactorState that makes its map with the
// capacity the worker announces (orchestrator.SizedState).
type inventory struct {
	items    map[string][]byte
	expected int
}

// ExpectKeys implements orchestrator.SizedState.
func (s *inventory) ExpectKeys(n int) {
	if len(s.items) == 0 {
		s.items = make(map[string][]byte, n)
		s.expected = n
	}
}

// Update implements orchestrator.ReactorState.
func (s *inventory) Update(key util.EtcdKey, value []byte, _ bool) error {
	if s.items == nil {
		s.items = map[string][]byte{}
	}
	if value == nil {
		delete(s.items, key.String())
	} else {
		s.items[key.String()] = value
	}
	return nil
}

// GetPatches implements orchestrator.ReactorState.
func (*inventory) GetPatches() [][]orchestrator.DataPatch { return nil }

// A state that holds many keys sizes its map once, before the first load
// fills it, instead of growing it by doubling.
func ExampleSizedState() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	etcd := orchestratortest.MustStart(ctx)
	defer etcd.Close()
	for i := range 3 {
		if _, err := etcd.Client().Put(ctx, fmt.Sprintf("/inventory/item%d", i), "1"); err != nil {
			fmt.Println(err)
			return
		}
	}
	state := &inventory{}
	loaded := orchestrator.ReactorFunc(func(_ context.Context, s orchestrator.ReactorState) (orchestrator.ReactorState, error) {
		return s, orchestrator.ErrReactorFinished // one Tick is enough here
	})
	w, err := orchestrator.NewEtcdWorker(etcd.Client(), "/inventory", loaded, state)
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := w.Run(ctx, nil, 10*time.Millisecond, "inventory"); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("expected %d keys, loaded %d\n", state.expected, len(state.items))
	// Output:
	// expected 3 keys, loaded 3
}
