package orchestratortest_test

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/orchestratortest"
	"github.com/etcdworker/orchestrator/util"
)

// Start runs etcd without a testing.TB; a test would call
// orchestratortest.StartEtcd(t) instead and get the client directly.
func ExampleStart() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	etcd, err := orchestratortest.Start(ctx, orchestratortest.WithMaxTxnOps(64))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer etcd.Close()

	cli := etcd.Client()
	if _, err := cli.Put(ctx, "/greeting", "hello"); err != nil {
		fmt.Println(err)
		return
	}
	resp, err := cli.Get(ctx, "/greeting")
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("%s = %s\n", resp.Kvs[0].Key, resp.Kvs[0].Value)
	// Output: /greeting = hello
}

// counter is a minimal ReactorState: one integer at one key.
type counter struct {
	key     string
	value   int
	patches [][]orchestrator.DataPatch
}

// Update implements orchestrator.ReactorState.
func (c *counter) Update(key util.EtcdKey, value []byte, _ bool) error {
	if key.String() != c.key || value == nil {
		return nil
	}
	n, err := strconv.Atoi(string(value))
	c.value = n
	return err
}

// GetPatches implements orchestrator.ReactorState.
func (c *counter) GetPatches() [][]orchestrator.DataPatch {
	p := c.patches
	c.patches = nil
	return p
}

// An EtcdWorker against the kit's etcd: the reactor counts to three, one
// commit per Tick, and stops.
func ExampleStart_worker() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	etcd := orchestratortest.MustStart(ctx)
	defer etcd.Close()

	state := &counter{key: "/app/counter"}
	reactor := orchestrator.ReactorFunc(func(_ context.Context, s orchestrator.ReactorState) (orchestrator.ReactorState, error) {
		if state.value == 3 {
			return s, orchestrator.ErrReactorFinished
		}
		next := []byte(strconv.Itoa(state.value + 1))
		state.patches = append(state.patches, []orchestrator.DataPatch{orchestrator.SingleDataPatch{
			Key:  util.NewEtcdKey(state.key),
			Func: func([]byte) ([]byte, bool, error) { return next, true, nil },
		}})
		return s, nil
	})
	w, err := orchestrator.NewEtcdWorker(etcd.Client(), "/app", reactor, state)
	if err != nil {
		fmt.Println(err)
		return
	}
	// Run returns nil once the reactor returned ErrReactorFinished.
	if err := w.Run(ctx, nil, 10*time.Millisecond, "example"); err != nil {
		fmt.Println(err)
		return
	}
	resp, err := etcd.Client().Get(ctx, state.key)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("%s = %s\n", resp.Kvs[0].Key, resp.Kvs[0].Value)
	// Output: /app/counter = 3
}
