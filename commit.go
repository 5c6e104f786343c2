package orchestrator

import (
	"errors"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// flushResult is what became of one flush of the pending groups; the loop
// acts on it (see settle).
type flushResult struct {
	done       int   // groups[:done] landed or were no-ops
	barrierRev int64 // revision of the last Txn that landed (0: none)
	tryAgain   bool  // a patch returned ErrEtcdTryAgain; nothing was sent
	retryAtRev int64 // a Txn did not land: the rest waits for this revision
}

// commitPending runs the pending groups on a copy-on-write view of the
// state, packs their writes into Txns and sends them in order, then settles
// the pending groups by the result.
func (r *run) commitPending(now time.Time) error {
	res, err := r.flush(r.pending.groups)
	if err != nil {
		return err
	}
	r.barrierRev = max(r.barrierRev, res.barrierRev)
	p := &r.pending
	switch {
	case res.tryAgain:
		p.tryAgain, p.tryAgainRev, p.tryAgainUntil = true, r.view.completeRev, now.Add(r.interval)
		r.log.Debug("patch asked to try again", zap.Int64("revision", r.view.completeRev))
	case res.done < len(p.groups):
		p.groups = p.groups[res.done:]
		p.tryAgain = false
		p.retryAtRev = res.retryAtRev
		r.src.requestProgress()
	default:
		*p = pendingPatches{}
	}
	return nil
}

// flush commits groups: the state first catches up with the Source, which
// also gives the values the groups read at that revision (commitView); every
// group is run (a group that fails or cannot fit ends the flush before
// anything is sent), then the Txns go out in order until one does not land.
func (r *run) flush(groups [][]DataPatch) (flushResult, error) {
	cv, ok, err := r.commitView(groups)
	if err != nil {
		return flushResult{}, err
	}
	if !ok { // the Source is (re)loading: try again on its next snapshot
		return flushResult{tryAgain: true}, nil
	}
	view := newPatchView(cv)
	defer view.reset()
	writes := make([]groupWrites, len(groups))
	deps := make([]groupDeps, len(groups))
	for i, group := range groups {
		gw, gd, err := view.applyGroupDeps(group)
		if errors.Is(err, ErrEtcdTryAgain) {
			// What the patches changed is undone (view.reset): the value
			// map is kept, not rebuilt from the whole state.
			return flushResult{tryAgain: true}, nil
		}
		if err == nil {
			err = r.checkGroup(gw, gd)
		}
		if err != nil {
			return flushResult{}, fmt.Errorf("orchestrator: patch group %d: %w", i, err)
		}
		writes[i], deps[i] = gw, gd
	}
	var res flushResult
	written := make(revisions)
	for _, b := range packTxnsDeps(writes, deps, r.w.limits) {
		if len(b.writes) > 0 {
			if rangeWritten(b, written, r.token.key) {
				res.retryAtRev = res.barrierRev // re-run once the state has it
				return res, nil
			}
			out, err := r.commitBatch(b, written, cv)
			if err != nil {
				return flushResult{}, err
			}
			if !out.landed {
				res.retryAtRev = out.rev
				return res, nil
			}
			res.barrierRev = out.rev
			r.m.patches.Add(float64(b.groups(writes)))
		}
		res.done = b.end
	}
	return res, nil
}

// commitView catches the state up with the Source and returns what groups
// read, at the revision the state then has.
// It reports false while the Source has no snapshot to give (a reload is
// under way).
func (r *run) commitView(groups [][]DataPatch) (*commitView, bool, error) {
	req := flushKeys(groups)
	req.values = req.values && r.view.values == nil
	b, ok, err := r.catchUp(&req)
	if err != nil || !ok {
		return nil, false, err
	}
	return &commitView{ks: r.ks, rev: r.view.completeRev, counterRev: r.view.counterRev,
		entries: b.entries, values: r.view.values, committed: r.view.committed}, true, nil
}

// checkGroup returns an error when a group writes or depends on a key it may
// not, or can never fit a Txn.
func (r *run) checkGroup(gw groupWrites, gd groupDeps) error {
	for _, kw := range gw {
		if err := r.ks.writable(kw.key); err != nil {
			return err
		}
	}
	if err := r.ks.dependable(gd); err != nil {
		return err
	}
	return checkGroupFitsDeps(gw, gd, r.w.limits)
}

// txnOutcome is what became of one commit Txn: landed at rev, or not landed
// and the state must reach rev before the groups are re-run.
type txnOutcome struct {
	landed bool
	rev    int64
}

// commitBatch sends one batch as a compare-and-swap Txn and finds out its
// outcome, resolving an unknown one through the commit token. cv is what the
// batch's groups ran on.
func (r *run) commitBatch(b txnBatch, written revisions, cv *commitView) (txnOutcome, error) {
	if err := r.ensureTokenLease(); err != nil {
		return txnOutcome{}, err
	}
	if err := r.checkStop(); err != nil {
		return txnOutcome{}, err // stopping: start no new Txn
	}
	seq := r.token.seq + 1
	txn := r.buildTxn(b, written, cv, seq)
	start := r.now()
	ctx, cancel := r.requestCtx(true) // once sent, a Txn runs to its outcome
	resp, err := r.w.client.Txn(ctx).If(txn.compares...).Then(txn.writes...).Else(txn.reads.ops...).Commit()
	cancel()
	r.m.txnDuration.Observe(r.now().Sub(start).Seconds())
	r.m.txnBytes.Observe(float64(txn.size))
	var out txnOutcome
	switch {
	case err == nil:
		out, err = r.readTxn(resp, txn, seq)
	case isLeaseNotFound(err) && r.lease != nil:
		// The worker's token lease expired (an outage longer than its
		// TTL) and took the token with it; the Txn was rejected whole.
		r.log.Warn("commit token lease expired, granting a new one", zap.Error(err))
		r.lease.expired()
		r.token.rev = 0
		return txnOutcome{rev: r.view.completeRev}, nil
	default:
		if rej := commitRejected(r.w.client, err); rej != nil {
			if clientClosed(r.w.client) {
				// The Txn may have been sent: nothing can tell now.
				rej = fmt.Errorf("%w: %w", rej, ErrCommitUnresolved)
			}
			return txnOutcome{}, rej
		}
		r.m.unknownCommit.Inc()
		if err := r.failed("commit", start, err); err != nil {
			return txnOutcome{}, err
		}
		out, err = r.resolve(seq)
	}
	if err == nil && out.landed {
		written.landed(b, r.ks.counterKey, out.rev)
		r.m.commits.Inc()
	}
	return out, err
}

// readTxn reads the answer to a commit Txn that etcd processed.
func (r *run) readTxn(resp *clientv3.TxnResponse, txn commitTxn, seq uint64) (txnOutcome, error) {
	rev := resp.Header.Revision
	r.answered(rev)
	if resp.Succeeded {
		r.token.moved(seq, rev)
		r.log.Debug("commit landed", zap.Int64("revision", rev), zap.Int("keys", len(txn.writes)),
			zap.Int("bytes", txn.size))
		return txnOutcome{landed: true, rev: rev}, nil
	}
	// A compare failed. Find out whether it was one of the worker's own.
	if o := r.w.opts; o.hasFencing {
		kvs := txn.reads.fencing(resp)
		if len(kvs) == 0 || kvs[0].CreateRevision != o.fencingRev {
			return txnOutcome{}, fmt.Errorf("%w: fencing key %q no longer has create revision %d",
				ErrNotOwner, o.fencingKey, o.fencingRev)
		}
	}
	if r.token.adopt(txn.reads.token(resp)) {
		// Nothing of the worker's was in flight: someone deleted or
		// rewrote the token (a wipe of the prefix), or it vanished with an
		// expired session lease (then the next Txn fails whole).
		r.log.Warn("commit token changed behind the worker's back", zap.String("key", r.token.key),
			zap.Int64("revision", r.token.rev))
	}
	r.m.conflicts.Inc()
	r.log.Debug("commit conflict, re-running the patches on newer state", zap.Int64("revision", rev))
	return txnOutcome{rev: rev}, nil
}

// resolve finds out whether the Txn that wrote token value seq landed, by
// fencing the token (see commitToken.fence). It retries with back-off until
// etcd answers; after ctx is done it keeps trying for the shutdown timeout.
// See "Commit token fence" in docs/DESIGN.md.
func (r *run) resolve(seq uint64) (txnOutcome, error) {
	bo := newBackoff()
	var deadline time.Time
	for {
		if r.ctx.Err() != nil && deadline.IsZero() {
			deadline = r.now().Add(r.w.opts.shutdownTimeout)
		}
		sent := r.now()
		ctx, cancel := r.requestCtx(true)
		resp, err := r.token.fence(r.w.client.Txn(ctx), seq).Commit()
		cancel()
		if err == nil {
			r.answered(resp.Header.Revision)
			return r.fenced(resp, seq)
		}
		if err := r.fenceFailed(sent, err); err != nil {
			return txnOutcome{}, err
		}
		if !deadline.IsZero() && r.now().After(deadline) {
			return txnOutcome{}, fmt.Errorf("%w: %w", r.ctxErr(), ErrCommitUnresolved)
		}
		if err := r.sleep(bo.next(), true); err != nil {
			return txnOutcome{}, fmt.Errorf("%w: while resolving a commit", err)
		}
	}
}

// fenced reads the answer to a fence.
func (r *run) fenced(resp *clientv3.TxnResponse, seq uint64) (txnOutcome, error) {
	switch r.token.fenced(resp, seq) {
	case fenceLanded:
		r.log.Info("unknown commit outcome resolved: landed", zap.Int64("revision", r.token.rev))
		return txnOutcome{landed: true, rev: r.token.rev}, nil
	case fenceNotLanded:
		r.log.Info("unknown commit outcome resolved: not landed", zap.Int64("revision", r.token.rev))
		return txnOutcome{rev: r.token.rev}, nil
	}
	if r.session != nil && r.leaseGone() {
		return txnOutcome{}, fmt.Errorf("%w: commit token vanished with the session lease", ErrEtcdSessionDone)
	}
	if r.lease != nil && r.leaseGone() {
		return txnOutcome{}, fmt.Errorf("%w: commit token %q vanished with its lease", ErrCommitUnresolved, r.token.key)
	}
	return txnOutcome{}, fmt.Errorf("%w: commit token %q was changed or removed by someone else", ErrCommitUnresolved, r.token.key)
}

// fenceFailed handles an error of a fence: nil to try again.
func (r *run) fenceFailed(sent time.Time, err error) error {
	if isLeaseNotFound(err) {
		if r.lease != nil {
			// The token vanished with the worker's lease during the outage:
			// whether the commit landed before cannot be told any more.
			return fmt.Errorf("%w: the commit token's lease expired: %w", ErrCommitUnresolved, err)
		}
		return fmt.Errorf("%w: while resolving a commit: %w", ErrEtcdSessionDone, err)
	}
	if rej := commitRejected(r.w.client, err); rej != nil {
		return rej
	}
	if err := r.failed("resolve commit", sent, err); err != nil {
		return err
	}
	if r.ctx.Err() == nil && r.health.tooLong(r.now()) {
		return fmt.Errorf("%w: %w", ErrEtcdUnavailable, ErrCommitUnresolved)
	}
	return nil
}

// leaseGone reports whether etcd no longer has the token's lease (the
// session's or the worker's own; an error counts as gone: the caller is
// about to give up either way).
func (r *run) leaseGone() bool {
	ctx, cancel := r.requestCtx(true)
	defer cancel()
	resp, err := r.w.client.TimeToLive(ctx, r.token.lease)
	return err != nil || resp.TTL <= 0
}

// elseReads are the Else operations of a commit Txn, by name: what the
// worker reads back when a compare failed, to tell its own failures (token,
// fencing key) from a conflict.
type elseReads struct {
	ops       []clientv3.Op
	tokenAt   int
	fencingAt int // -1 without fencing
}

func (e elseReads) token(resp *clientv3.TxnResponse) []*mvccpb.KeyValue {
	return resp.Responses[e.tokenAt].GetResponseRange().GetKvs()
}

func (e elseReads) fencing(resp *clientv3.TxnResponse) []*mvccpb.KeyValue {
	return resp.Responses[e.fencingAt].GetResponseRange().GetKvs()
}

// commitTxn is one commit Txn, built from named parts.
type commitTxn struct {
	// compares: each written or depended-on key still has the mod revision
	// the patches saw, no key of a depended-on range was put after the
	// snapshot, the token has the revision the worker last saw, the delete
	// counter has not moved, and the fencing key (if any) is still there.
	compares []clientv3.Cmp
	// writes: the puts and deletes, the token's new sequence, and a bump of
	// the delete counter when the batch deletes.
	writes []clientv3.Op
	reads  elseReads
	size   int // bytes of keys and values, as the limits count them
}

// buildTxn builds the Txn of batch b writing token sequence seq. written
// holds the revisions earlier Txns of the same flush wrote; cv is what the
// groups ran on (its revision bounds range dependencies).
func (r *run) buildTxn(b txnBatch, written revisions, cv *commitView, seq uint64) commitTxn {
	m, o := cv, &r.w.opts
	t := commitTxn{
		compares: make([]clientv3.Cmp, 0, b.compares()+3),
		writes:   make([]clientv3.Op, 0, len(b.writes)+2),
	}
	for _, kw := range b.writes {
		key := kw.key.String()
		rev, ok := written[key]
		if !ok {
			e, _ := m.entry(kw.key)
			rev = e.modRev
		}
		t.compares = append(t.compares, clientv3.Compare(clientv3.ModRevision(key), "=", rev))
		if kw.value == nil {
			t.writes = append(t.writes, clientv3.OpDelete(key))
		} else {
			t.writes = append(t.writes, clientv3.OpPut(key, string(kw.value)))
		}
		t.size += writeSize(kw)
	}
	deps, size := depCompares(b, m, written, cv.rev)
	t.compares = append(t.compares, deps...)
	t.size += size
	counterKey := r.ks.counterKey
	counterRev, ok := written[counterKey]
	if !ok {
		counterRev = m.counterRev
	}
	t.compares = append(t.compares, r.token.compare(),
		clientv3.Compare(clientv3.ModRevision(counterKey), "=", counterRev))
	t.writes = append(t.writes, r.token.put(seq))
	if b.hasDelete {
		t.writes = append(t.writes, clientv3.OpPut(counterKey, ""))
	}
	t.reads = elseReads{ops: []clientv3.Op{r.token.get()}, tokenAt: 0, fencingAt: -1}
	if o.hasFencing {
		t.compares = append(t.compares, clientv3.Compare(clientv3.CreateRevision(o.fencingKey), "=", o.fencingRev))
		t.reads.fencingAt = len(t.reads.ops)
		t.reads.ops = append(t.reads.ops, clientv3.OpGet(o.fencingKey))
	}
	return t
}
