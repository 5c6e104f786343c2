// Package orchestrator keeps a user's in-memory model of an etcd prefix in
// sync with etcd and commits the user's changes to it as compare-and-swap
// transactions. It is a reimplementation of TiCDC's EtcdWorker
// (pkg/orchestrator) that survives the faults the original exits on.
//
// The user implements two interfaces, Reactor (the controller logic) and
// ReactorState (the model), and the EtcdWorker does the rest:
//
//	+------------------------- etcd: keys under prefix + "/" -------------------------+
//	      |  1. Watch: streamed load pinned at one revision,           ^
//	      |     then a watch from that revision + 1                    |
//	      v                                                            |
//	  2. Update: ReactorState.Update(key, value, isInit),              |
//	     one whole watch response at a time                            |
//	      |                                                            |
//	      v                                                            |
//	  3. Tick: Reactor.Tick(ctx, state) on a snapshot of one           |
//	     revision that includes the worker's own last commit           |
//	      |                                                            |
//	      v                                                            |
//	  4. DataPatch groups: state.GetPatches(), pure functions          |
//	     old value -> new value, re-run on newer state on conflict     |
//	      |                                                            |
//	      +--> 5. Txn: If(ModRevision(k) == seen, ...) Then(puts, deletes),
//	              many groups per Txn within etcd's limits, each group atomic
//
// # Guarantees
//
//   - Tick sees a consistent snapshot: every event of one etcd revision and
//     of all before it, none after it; never half of another writer's Txn.
//   - Tick sees the worker's own last commit (the barrier), and runs again
//     only after every patch it left was committed or dropped as a no-op.
//   - Each patch group commits atomically, groups commit in order, many
//     groups share a Txn within the limits of WithTxnLimits (etcd's
//     --max-txn-ops and --max-request-bytes, counting the worker's own
//     compares and ops). A group that can never fit is an error, not a loop.
//     The Txns of one Tick's groups are sent several at once
//     (WithPipelineDepth), chained so that none lands before, or without,
//     the one before it.
//   - A patch lands in etcd exactly once for each time it reports a change,
//     also when a commit's outcome is unknown (timeout, lost connection): the
//     worker resolves it through a per-Run commit token instead of guessing.
//   - A delete committed by one worker makes the concurrent commits of every
//     other worker on the prefix fail and re-run (a delete counter key).
//   - A group may depend on keys or key ranges it reads but does not write
//     (ReadDependency, ReadRangeDependency): its Txn then also fails, and
//     the group re-runs, when another writer changed them after the group's
//     patches read them. A patch returning ErrEtcdSkipGroup drops its whole
//     group, which makes conditional groups: "write this only if that still
//     holds".
//   - Compaction of the watched revision, lost connections, leader changes
//     and CAS conflicts do not end Run: it reloads, retries with capped
//     exponential back-off and re-runs patches on newer state.
//   - With WithFencingKey every commit also requires the fencing key (for
//     example a concurrency.Election key) to exist with its create revision:
//     a deposed leader cannot write. Run also reads the key periodically and
//     returns ErrNotOwner soon after it is lost, even if it never commits.
//   - Workers may share one Source (NewSource, WithSource): one load, one
//     watch and one copy of the keys for every worker on its prefix or under
//     it, each worker with its own snapshot, barrier and commits. A worker
//     busy in user code is caught up later from the copy, each changed key
//     once, so what it costs grows with the keys, never with the events.
//   - Nothing global: logger and metrics registerer are options.
//     Every goroutine Run starts has ended when Run returns.
//
// The worker keeps its own keys under prefix + "/__orchestrator/": a delete
// counter and one commit token per running worker. They never reach the
// ReactorState and patches may not write there.
//
// See EtcdWorker.Run for the exact tick rule and every way Run returns.
package orchestrator
