// Package leader runs an orchestrator.EtcdWorker on exactly one of several
// candidates at a time: the owner pattern of TiCDC, where every process
// campaigns and only the elected owner runs its reactor.
//
// Run loops over terms until its context ends:
//
//	grant a session lease ─► Campaign (concurrency.Election) ─► elected
//	      ▲                                                        │
//	      │                          newWorker(term): fresh reactor and state
//	      │                                                        │
//	      │          EtcdWorker.Run(ctx, session, ...), every commit fenced
//	      │          with WithFencingKey(election key, its create revision)
//	      │                                                        │
//	      └── ErrNotOwner / ErrEtcdSessionDone / ErrEtcdUnavailable ◄─┤
//	          (leadership lost: close the session, campaign again)   │
//	                                                                  ▼
//	           reactor finished (nil) / ctx done / other error: resign,
//	           close the session, return
//
// Fencing makes the hand-over safe: once a leader's election key is gone (its
// lease expired or was revoked, or it resigned), none of its commits can land,
// even those already in flight, so a deposed leader writes nothing after its
// successor could have been elected. A deposed leader also stops ticking,
// whether it commits or not: its worker reads the election key every
// progress interval (2s with the worker's default options), so a term whose
// key was deleted (an expired lease, or an operator's `etcdctl del`) ends
// with ErrNotOwner within about that interval, and Run campaigns again.
//
// Every term gets a new reactor and state from the NewWorkerFunc: what a
// previous term held may be stale, since another leader may have written in
// between. The worker loads the state afresh from etcd before its first Tick.
package leader
