package jsonstate_test

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/jsonstate"
)

// exampleT stands in for the *testing.T a real test would pass to
// orchestrator.NewReactorStateTester.
type exampleT struct{ testing.TB }

// Helper implements testing.TB.
func (exampleT) Helper() {}

// Errorf implements testing.TB: it prints the failure.
func (exampleT) Errorf(format string, args ...any) { fmt.Printf(format+"\n", args...) }

// FailNow implements testing.TB.
func (exampleT) FailNow() { panic("example failed") }

// A controller keeps the load of every node at or below the configured limit
// by moving the excess to the least loaded node. Each move is one atomic
// group of two patches. In a program the state and reactor go to
// orchestrator.NewEtcdWorker(client, "/app", reactor, state); here a
// ReactorStateTester plays etcd.
func Example() {
	type Node struct {
		Load int `json:"load"`
	}
	type Config struct {
		MaxLoad int `json:"max_load"`
	}
	nodes := jsonstate.New[Node]("/app/nodes")
	config := jsonstate.NewDoc[Config]("/app/config")
	state := jsonstate.Multi{nodes, config}

	reactor := orchestrator.ReactorFunc(func(_ context.Context, s orchestrator.ReactorState) (orchestrator.ReactorState, error) {
		cfg, ok := config.Get()
		if !ok {
			return s, nil // not configured yet
		}
		least, minLoad := "", 0
		for name, n := range nodes.All() {
			if least == "" || n.Load < minLoad {
				least, minLoad = name, n.Load
			}
		}
		for name, n := range nodes.All() {
			excess := n.Load - cfg.MaxLoad
			if excess <= 0 || name == least {
				continue
			}
			nodes.Group(func(g *jsonstate.Group[Node]) {
				g.Patch(name, func(n *Node, _ bool) (bool, error) { n.Load -= excess; return true, nil })
				g.Patch(least, func(n *Node, _ bool) (bool, error) { n.Load += excess; return true, nil })
			})
		}
		return s, nil
	})

	tester := orchestrator.NewReactorStateTester(exampleT{}, state, map[string]string{
		"/app/config":  `{"max_load":10}`,
		"/app/nodes/a": `{"load":14}`,
		"/app/nodes/b": `{"load":2}`,
		"/app/nodes/c": `{"load":11}`,
		"/app/other":   `not JSON, not ours`,
	})
	if _, err := reactor.Tick(context.Background(), state); err != nil {
		fmt.Println("tick:", err)
	}
	tester.MustApplyPatches()
	for name, n := range nodes.All() {
		fmt.Printf("%s: %d\n", name, n.Load)
	}
	fmt.Println(tester.KVEntries()["/app/nodes/b"])
	// Output:
	// a: 10
	// b: 7
	// c: 10
	// {"load":7}
}

// A broken document stops the worker by default; with SkipInvalid it is
// left out of the state and reported.
func ExampleWithDecodePolicy() {
	type Node struct {
		Load int `json:"load"`
	}
	nodes := jsonstate.New[Node]("/app/nodes", jsonstate.WithDecodePolicy(jsonstate.SkipInvalid))
	tester := orchestrator.NewReactorStateTester(exampleT{}, nodes, map[string]string{
		"/app/nodes/a": `{"load":1}`,
		"/app/nodes/b": `{"load":"high"}`,
	})
	fmt.Println(nodes.Names())
	for _, err := range nodes.Errors() {
		fmt.Println(err.Key, errors.Is(err, jsonstate.ErrDecode))
	}

	// Put does not read the broken value, so it can replace it.
	nodes.Put("b", Node{Load: 3})
	tester.MustApplyPatches()
	fmt.Println(nodes.Names(), len(nodes.Errors()))
	// Output:
	// [a]
	// /app/nodes/b true
	// [a b] 0
}
