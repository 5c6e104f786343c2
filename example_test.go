package orchestrator_test

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/orchestratortest"
	"github.com/etcdworker/orchestrator/util"
)

// counterState is a minimal ReactorState: one integer at one key.
type counterState struct {
	key     util.EtcdKey
	value   int
	patches [][]orchestrator.DataPatch
}

// Update implements orchestrator.ReactorState.
func (s *counterState) Update(key util.EtcdKey, value []byte, _ bool) error {
	if key != s.key {
		return nil // not ours
	}
	if value == nil {
		s.value = 0
		return nil
	}
	n, err := strconv.Atoi(string(value))
	if err != nil {
		return fmt.Errorf("counter %q: %w", key.String(), err)
	}
	s.value = n
	return nil
}

// GetPatches implements orchestrator.ReactorState.
func (s *counterState) GetPatches() [][]orchestrator.DataPatch {
	p := s.patches
	s.patches = nil
	return p
}

// add queues adding delta to the counter. The patch reads the value at
// commit time, so it stays correct when it is re-run after a conflict.
func (s *counterState) add(delta int) {
	s.patches = append(s.patches, []orchestrator.DataPatch{orchestrator.SingleDataPatch{
		Key: s.key,
		Func: func(old []byte) ([]byte, bool, error) {
			n := 0
			if old != nil {
				var err error
				if n, err = strconv.Atoi(string(old)); err != nil {
					return nil, false, err
				}
			}
			return []byte(strconv.Itoa(n + delta)), true, nil
		},
	}})
}

// exampleT stands in for the *testing.T a real test would pass.
type exampleT struct{ testing.TB }

// Helper implements testing.TB.
func (exampleT) Helper() {}

// Errorf implements testing.TB: it prints the failure.
func (exampleT) Errorf(format string, args ...any) { fmt.Printf(format+"\n", args...) }

// Fatalf implements testing.TB: it prints the failure and stops.
func (e exampleT) Fatalf(format string, args ...any) {
	e.Errorf(format, args...)
	e.FailNow()
}

// FailNow implements testing.TB.
func (exampleT) FailNow() { panic("example failed") }

// A worker counts to three and stops. The example starts an embedded etcd
// with the test kit (orchestratortest); a program connects to its etcd
// cluster instead, and a test calls orchestratortest.StartEtcd(t).
func ExampleEtcdWorker_Run() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	etcd := orchestratortest.MustStart(ctx)
	defer etcd.Close()
	cli := etcd.Client()

	state := &counterState{key: util.NewEtcdKey("/example/counter")}
	reactor := orchestrator.ReactorFunc(func(_ context.Context, s orchestrator.ReactorState) (orchestrator.ReactorState, error) {
		st := s.(*counterState)
		fmt.Println("tick, counter =", st.value)
		if st.value == 3 {
			return st, orchestrator.ErrReactorFinished
		}
		st.add(1)
		return st, nil
	})
	w, err := orchestrator.NewEtcdWorker(cli, "/example", reactor, state)
	if err != nil {
		fmt.Println(err)
		return
	}
	err = w.Run(ctx, nil, 10*time.Millisecond, "example")
	fmt.Println("Run returned:", err)

	resp, err := cli.Get(ctx, "/example/counter")
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("%s = %s\n", resp.Kvs[0].Key, resp.Kvs[0].Value)
	// Output:
	// tick, counter = 0
	// tick, counter = 1
	// tick, counter = 2
	// tick, counter = 3
	// Run returned: <nil>
	// /example/counter = 3
}

// A readiness check: another goroutine waits until the worker has loaded
// the state, then asks where it stands; a clean stop is told from a failure
// with IsCleanStop.
func ExampleEtcdWorker_WaitSynced() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	etcd := orchestratortest.MustStart(ctx)
	defer etcd.Close()
	put, err := etcd.Client().Put(ctx, "/ready/counter", "41")
	if err != nil {
		fmt.Println(err)
		return
	}
	state := &counterState{key: util.NewEtcdKey("/ready/counter")}
	idle := orchestrator.ReactorFunc(func(_ context.Context, s orchestrator.ReactorState) (orchestrator.ReactorState, error) {
		return s, nil
	})
	w, err := orchestrator.NewEtcdWorker(etcd.Client(), "/ready", idle, state)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("before Run:", w.Ready())
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	done := make(chan error, 1)
	go func() { done <- w.Run(runCtx, nil, 10*time.Millisecond, "ready") }()

	if err := w.WaitSynced(ctx); err != nil {
		fmt.Println(err)
		return
	}
	s := w.Status()
	fmt.Println("synced:", s.Synced, "has the put:", s.AppliedRevision >= put.Header.Revision)
	stop()
	fmt.Println("clean stop:", orchestrator.IsCleanStop(<-done))
	// Output:
	// before Run: orchestrator: worker not ready: not running
	// synced: true has the put: true
	// clean stop: true
}

func ExampleSingleDataPatch() {
	key := util.NewEtcdKey("/app/counter")
	increment := orchestrator.SingleDataPatch{Key: key, Func: func(old []byte) ([]byte, bool, error) {
		n, err := strconv.Atoi(string(old))
		if err != nil {
			return nil, false, err
		}
		return []byte(strconv.Itoa(n + 1)), true, nil
	}}
	remove := orchestrator.SingleDataPatch{Key: key, Func: func(old []byte) ([]byte, bool, error) {
		return nil, old != nil, nil // nil with changed == true deletes
	}}
	skip := orchestrator.SingleDataPatch{Key: key, Func: func([]byte) ([]byte, bool, error) {
		return nil, false, orchestrator.ErrEtcdIgnore // skip this patch only
	}}

	// The worker calls Patch at commit time with the current values; here we
	// call it by hand.
	values := map[util.EtcdKey][]byte{key: []byte("41")}
	changed := map[util.EtcdKey]struct{}{}
	if err := increment.Patch(values, changed); err != nil {
		fmt.Println(err)
	}
	fmt.Printf("%s changed=%d\n", values[key], len(changed))

	err := skip.Patch(values, changed)
	fmt.Println(errors.Is(err, orchestrator.ErrEtcdIgnore), string(values[key]))

	if err := remove.Patch(values, changed); err != nil {
		fmt.Println(err)
	}
	_, present := values[key]
	fmt.Println("present:", present)
	// Output:
	// 42 changed=1
	// true 42
	// present: false
}

func ExampleReactorFunc() {
	// A reactor that doubles the counter until it reaches 100.
	reactor := orchestrator.ReactorFunc(func(_ context.Context, s orchestrator.ReactorState) (orchestrator.ReactorState, error) {
		st := s.(*counterState)
		if st.value >= 100 {
			return st, orchestrator.ErrReactorFinished
		}
		st.add(st.value)
		return st, nil
	})
	// It is used like any Reactor:
	// orchestrator.NewEtcdWorker(client, "/app", reactor, state). Here it is
	// driven by a ReactorStateTester, as a unit test would.
	state := &counterState{key: util.NewEtcdKey("/app/counter")}
	tester := orchestrator.NewReactorStateTester(exampleT{}, state, map[string]string{"/app/counter": "3"})
	for {
		_, err := reactor.Tick(context.Background(), state)
		if errors.Is(err, orchestrator.ErrReactorFinished) {
			break
		}
		tester.MustApplyPatches()
		fmt.Println(tester.KVEntries()["/app/counter"])
	}
	// Output:
	// 6
	// 12
	// 24
	// 48
	// 96
	// 192
}

func ExampleReactorStateTester() {
	// In a test, pass the *testing.T instead of exampleT{}.
	state := &counterState{key: util.NewEtcdKey("/app/counter")}
	tester := orchestrator.NewReactorStateTester(exampleT{}, state, map[string]string{
		"/app/counter": "10",
		"/app/other":   "ignored by the state",
	})
	fmt.Println("loaded:", state.value)

	// Another writer changes the key: feed the change to the state.
	tester.MustUpdate("/app/counter", []byte("20"))
	fmt.Println("updated:", state.value)

	// The state's patches apply with the worker's rules, and every change is
	// fed back to the state.
	state.add(5)
	state.add(-1)
	tester.MustApplyPatches()
	fmt.Println("patched:", state.value, tester.KVEntries()["/app/counter"])

	// Errors from Update are returned, not swallowed.
	err := tester.Update("/app/counter", []byte("not a number"))
	fmt.Println("bad value rejected:", err != nil, state.value)

	// A deleted key is nil.
	tester.MustUpdate("/app/counter", nil)
	fmt.Println("deleted:", state.value, len(tester.KVEntries()))
	// Output:
	// loaded: 10
	// updated: 20
	// patched: 24 24
	// bad value rejected: true 24
	// deleted: 0 1
}
