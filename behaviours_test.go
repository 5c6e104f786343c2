package orchestrator

// Where each behaviour of the worker is tested. Sections in quotes are those
// of docs/DESIGN.md.
//
// Watch and revisions
//
//   - Progress notifications never make the worker skip events ("Progress
//     probe"): TestProgressNotifyNeverSkipsEvents (unit: a notify at revision
//     100, then events at 41..99 are applied and appliedRev never goes back),
//     TestProgressNotifyWorkerSeesEveryPut (real etcd: every put is seen, in
//     order, while the worker requests progress every 50ms).
//   - Events are de-duplicated by their ModRevision, never by the header
//     revision: TestWatchDedupsByModRevisionNotHeader (two responses with one
//     header revision both apply; replays are skipped; two keys of one
//     revision both apply).
//   - A re-watch starts at the last applied revision + 1 ("Outages"):
//     TestWatchResumesAfterLastAppliedRevision (the watch closes, three puts
//     land while none is open and a head probe reports them, and the restart
//     delivers each of them once, in order; a watch started one revision too
//     early replays the last applied event and the worker skips it). Also
//     covered by the fault suite, whose invariants break on a lost event:
//     TestFaultBankLeaderRestart, TestFaultBankProxyCuts,
//     TestFaultIdleWorkerStaysFresh, TestLinearizableCounter.
//   - A put of an empty value reaches Update as []byte{}, a delete as nil:
//     TestEtcdWorkerEmptyOrNil (load and watch), and
//     TestFaultCompactionReloadMatchesEtcd (empty values after a reload).
//   - Compaction and lost connections are normal: reload, diff, resume
//     ("Reload diff", "Outages"): TestFaultBankCompactionDuringOutage,
//     TestFaultCompactionReloadMatchesEtcd, TestFaultCompactionBetweenLoadPages,
//     TestFaultBankProxyCuts, TestFaultBankLeaderRestart,
//     TestFaultIdleWorkerStaysFresh, TestMetricsReloadAfterCompaction,
//     TestLinearizableCounter (compaction during an outage),
//     TestEtcdWorkerRunTwice (reload diff with deletions), TestSoak (opt-in,
//     $ORCHESTRATOR_SOAK).
//
// Batching and commits
//
//   - A group is applied to the working copy once, before packing ("Copy on
//     first touch"): TestEtcdWorkerMultiTxnFlush (every patch of a multi-Txn
//     flush runs exactly once), TestPackTxns, TestPackTxnsManyTinyGroups,
//     TestPackTxnsMergedRewrites (packing never splits or repeats a group).
//   - Exact limits (own ops counted, at-limit accepted, limit+1 a prompt
//     error): TestBatchCheckGroupFits, TestEtcdWorkerTxnLimits,
//     TestLimitsServerDefaultsAreTheLimits, TestLimitsOpsDefaultServer,
//     TestLimitsBytesDefaultServer, TestLimitsMatchingServer,
//     TestLimitsServerLowerThanWorker.
//   - Later Txns of a flush compare against the earlier Txns' revisions:
//     TestEtcdWorkerMultiTxnFlush, TestLimitsMatchingServer.
//   - A commit whose outcome is unknown is resolved, never re-run blindly nor
//     dropped ("Commit token fence"): TestExactlyOnceCommitCuts,
//     TestExactlyOnceScriptedUnknownOutcomes, TestLinearizableCounter,
//     TestFaultShutdownDuringCommit, TestFaultPatchPanicAfterUnknownOutcome,
//     TestSoak (opt-in).
//   - Conflicts wait for a newer state, no spin:
//     TestConflictRerunsPatchOnNewerState (exactly one conflict, exactly two
//     runs of the patch, the second on the external value),
//     TestConflictsBoundedByExternalWrites (conflicts bounded by the number
//     of external writes), plus TestEtcdWorkerCover/concurrent_writer,
//     TestEtcdWorkerDeleteCounter ("Delete counter") and
//     TestMetricsTwoWorkersShareRegistry (conflicts counted per role).
//   - Keys outside the prefix and in the reserved area are rejected
//     ("Reserved keys"): TestEtcdWorkerKeyOutsidePrefix.
//   - Final patches land before Run returns nil; a failed final commit is an
//     error: TestEtcdWorkerFinished (lands), TestEtcdWorkerKeyOutsidePrefix
//     (final commit fails -> error), TestLimitsOpsDefaultServer,
//     TestLimitsBytesDefaultServer, TestLimitsMatchingServer,
//     TestLimitsServerLowerThanWorker (limReactor's groups are final).
//   - The ReactorStateTester commits a flush all or nothing, as the worker
//     does: TestReactorStateTesterTryAgainAbortsWholeFlush,
//     TestReactorStateTesterApplyPatchesErrors,
//     TestReactorStateTesterFlushSeesEarlierGroups.
//
// Ticking ("Tick gate", "Snapshot and barrier")
//
//   - rate.Every(timerInterval); intervals above 1s keep ticking:
//     TestEtcdWorkerLongTimerInterval.
//   - Barrier (own last commit visible, no torn Txn): TestEtcdWorkerFinished
//     (Tick 2 sees Tick 1's commit), TestEtcdWorkerMultiTxnFlush (the Tick
//     after a flush sees all of it), TestEtcdWorkerRetryableError (no Tick in
//     between), TestSum, TestEtcdWorkerBank, TestEtcdWorkerLinearizability
//     (read-your-writes), TestLinearizableCounter, the fault bank tests.
//   - A worker run twice resets its counters and revisions:
//     TestEtcdWorkerRunTwice.
