package leader_test

import (
	"context"
	"fmt"
	"time"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/jsonstate"
	"github.com/etcdworker/orchestrator/leader"
	"github.com/etcdworker/orchestrator/orchestratortest"
)

// A candidate campaigns; once elected it runs a reactor that counts to three
// and finishes, so Run resigns and returns nil. With several candidates
// (processes) the others would wait, and take over when the leader stops or
// its session is lost.
func ExampleRun() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	etcd := orchestratortest.MustStart(ctx)
	defer etcd.Close()

	newWorker := func(_ context.Context, term leader.Term) (leader.Worker, error) {
		// A fresh state for each term: the previous one may be stale.
		count := jsonstate.NewDoc[int]("/app/count")
		reactor := orchestrator.ReactorFunc(func(_ context.Context, s orchestrator.ReactorState) (orchestrator.ReactorState, error) {
			n, _ := count.Get()
			if n == 3 {
				return s, orchestrator.ErrReactorFinished
			}
			count.Put(n + 1)
			return s, nil
		})
		return leader.Worker{Prefix: "/app", Reactor: reactor, State: count, TimerInterval: 10 * time.Millisecond}, nil
	}
	err := leader.Run(ctx, etcd.Client(), "/election/app", "controller-1", newWorker,
		leader.WithOnElected(func(term leader.Term) { fmt.Println("elected:", term.Candidate) }))
	fmt.Println("Run:", err)

	resp, err := etcd.Client().Get(ctx, "/app/count")
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("%s = %s\n", resp.Kvs[0].Key, resp.Kvs[0].Value)
	// Output:
	// elected: controller-1
	// Run: <nil>
	// /app/count = 3
}
