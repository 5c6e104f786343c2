package orchestrator

import (
	"errors"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/etcdworker/orchestrator/internal/etcderr"
	"github.com/etcdworker/orchestrator/util"
)

// flushResult is what became of one flush of the pending groups; the loop
// acts on it (see commitPending).
type flushResult struct {
	done       int   // groups[:done] landed or were no-ops
	barrierRev int64 // revision of the last Txn that landed (0: none)
	tryAgain   bool  // a patch returned ErrEtcdTryAgain; nothing was sent
	retryAtRev int64 // a Txn did not land: the rest waits for this revision
	// fresh: a Txn conflicted and its Else read the current values of the
	// keys it compared; the rest re-runs at once on them (retryAtRev is 0).
	fresh *freshValues
}

// commitPending runs the pending groups on a copy-on-write view of the
// state, packs their writes into Txns and sends them in order, then settles
// the pending groups by the result.
func (r *run) commitPending(now time.Time) error {
	p := &r.pending
	res, err := r.flush(p.groups, p.fresh)
	if err != nil {
		return err
	}
	r.barrierRev = max(r.barrierRev, res.barrierRev)
	if res.done >= len(p.groups) && !res.tryAgain {
		*p = pendingPatches{}
		return nil
	}
	p.groups = p.groups[res.done:]
	if res.tryAgain {
		// The values a conflict read (fresh) stay: the retry runs on them
		// where the state is still older.
		p.tryAgain, p.tryAgainRev, p.tryAgainUntil = true, r.view.completeRev, now.Add(r.interval)
		r.log.Debug("patch asked to try again", zap.Int64("revision", r.view.completeRev))
		return nil
	}
	p.tryAgain = false
	p.retryAtRev, p.fresh = res.retryAtRev, res.fresh
	if res.fresh == nil {
		r.src.requestProgress()
	}
	return nil
}

// flush commits groups: the state first catches up with the Source, which
// also gives the values the groups read at that revision (commitView), with
// fresh (the values a conflict read, if any) on top where they are newer;
// every group is run (a group that fails or cannot fit ends the flush before
// anything is sent), then the Txns go out as a chain (see chain.run).
func (r *run) flush(groups [][]DataPatch, fresh *freshValues) (flushResult, error) {
	cv, ok, err := r.commitView(groups, fresh)
	if err != nil {
		return flushResult{}, err
	}
	if !ok { // the Source is (re)loading: try again on its next snapshot
		return flushResult{tryAgain: true}, nil
	}
	if r.token.rev == 0 && rangeHolds(groups, r.token.key) {
		// A range compare holding the token would fail on the token that
		// the first commit puts, after the revision the range is compared
		// at (cv.rev): put it first, and run the groups once the state
		// holds it.
		if err := r.ensureToken(); err != nil {
			return flushResult{}, err
		}
		if r.token.rev > cv.rev {
			return flushResult{retryAtRev: r.token.rev}, nil
		}
	}
	view := newPatchView(cv)
	defer view.reset()
	writes := make([]groupWrites, len(groups))
	deps := make([]groupDeps, len(groups))
	for i, group := range groups {
		if r.ctxDone() { // nothing is sent yet: a cancel need not wait for every patch
			return flushResult{}, r.stopErr()
		}
		gw, gd, err := view.applyGroupDeps(group)
		live := !r.ended() // as the patches returned (see userFailure)
		if errors.Is(err, ErrEtcdTryAgain) {
			// What the patches changed is undone (view.reset): the value
			// map is kept, not rebuilt from the whole state.
			return flushResult{tryAgain: true}, nil
		}
		if err == nil {
			err = r.checkGroup(gw, gd)
		}
		if err != nil {
			return flushResult{}, failureIf(live, fmt.Errorf("orchestrator: patch group %d: %w", i, err))
		}
		writes[i], deps[i] = gw, gd
	}
	batches := packTxns(writes, deps, r.w.limits)
	if len(batches) > 0 && len(batches[0].writes) > 0 {
		if err := r.ensureToken(); err != nil {
			return flushResult{}, err
		}
	}
	return r.newChain(cv, groups, writes, batches).run()
}

// commitView catches the state up with the Source and returns what groups
// read, at the revision the state then has, with fresh on top where it is
// newer. It reports false while the Source has no snapshot to give (a
// reload is under way).
func (r *run) commitView(groups [][]DataPatch, fresh *freshValues) (*commitView, bool, error) {
	req := r.reads.request(groups)
	req.values = req.values && r.view.values == nil
	b, ok, err := r.catchUp(&req)
	if err != nil || !ok {
		return nil, false, err
	}
	cv := &commitView{ks: r.ks, rev: r.view.completeRev, counterRev: r.view.counterRev,
		entries: b.entries, values: r.view.values, committed: r.view.committed}
	cv.overlay(fresh)
	return cv, true, nil
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
	return checkGroupFits(gw, gd, r.w.limits)
}

// fenceToken sends the fence that settles a chain last seen at token
// revision rev, writing value (see commitToken.fence). It retries with
// back-off until etcd answers; after ctx is done it keeps trying until the
// shutdown timeout after it (r.shutdown, which also ends a fence in
// flight). See "Commit token fence" in docs/DESIGN.md.
func (r *run) fenceToken(rev int64, value uint64) (*clientv3.TxnResponse, error) {
	bo := newBackoff()
	for {
		sent := r.now()
		ctx, cancel := r.requestCtx(true)
		resp, err := r.token.fence(r.w.client.Txn(ctx), rev, value).Commit()
		cancel()
		if err == nil {
			r.answered(resp.Header.Revision)
			return resp, nil
		}
		if r.shutdown.Err() != nil {
			return nil, fmt.Errorf("%w: %w", r.ctxErr(), ErrCommitUnresolved)
		}
		if err := r.fenceFailed(sent, err); err != nil {
			return nil, err
		}
		if err := r.sleep(bo.Next(), true); err != nil {
			return nil, fmt.Errorf("%w: %w: while resolving a commit", err, ErrCommitUnresolved)
		}
	}
}

// tokenLost is the error of a resolution that found the commit token
// neither where the worker left it nor moved by one of its own Txns.
func (r *run) tokenLost() error {
	gone, err := r.leaseGone()
	if err != nil {
		// Whether the lease is gone is not known either (after a cancel the
		// request ends with the shutdown timeout): the outcome stays unknown.
		return fmt.Errorf("%w: commit token %q vanished; its lease could not be checked: %w",
			ErrCommitUnresolved, r.token.key, err)
	}
	if r.session != nil && gone {
		return fmt.Errorf("%w: %w: commit token vanished with the session lease", ErrEtcdSessionDone, ErrCommitUnresolved)
	}
	if r.lease != nil && gone {
		return fmt.Errorf("%w: commit token %q vanished with its lease", ErrCommitUnresolved, r.token.key)
	}
	return fmt.Errorf("%w: commit token %q was changed or removed by someone else", ErrCommitUnresolved, r.token.key)
}

// fenceFailed handles an error of a fence: nil to try again.
func (r *run) fenceFailed(sent time.Time, err error) error {
	if etcderr.LeaseNotFound(err) {
		if r.lease != nil {
			// The token vanished with the worker's lease during the outage:
			// whether the commit landed before cannot be told any more.
			return fmt.Errorf("%w: the commit token's lease expired: %w", ErrCommitUnresolved, err)
		}
		return fmt.Errorf("%w: %w: while resolving a commit: %w", ErrEtcdSessionDone, ErrCommitUnresolved, err)
	}
	// A rejection ends the resolution: the commit's outcome stays unknown.
	if rej := commitRejected(r.w.client, err); rej != nil {
		return fmt.Errorf("%w: %w", rej, ErrCommitUnresolved)
	}
	if err := r.rejectionOrOutage("resolve commit", sent, err); err != nil {
		return fmt.Errorf("%w: %w", err, ErrCommitUnresolved)
	}
	if r.ctx.Err() == nil && r.health.tooLong(r.now()) {
		return fmt.Errorf("%w: %w", ErrEtcdUnavailable, ErrCommitUnresolved)
	}
	return nil
}

// leaseGone reports whether etcd no longer has the token's lease (the
// session's or the worker's own), or the error that kept it from asking.
// Without a lease (a token written before any), nothing is asked.
func (r *run) leaseGone() (bool, error) {
	if r.session == nil && r.lease == nil {
		return false, nil
	}
	ctx, cancel := r.requestCtx(true)
	defer cancel()
	resp, err := r.w.client.TimeToLive(ctx, r.token.lease)
	switch {
	case etcderr.LeaseNotFound(err):
		return true, nil
	case err != nil:
		return false, err
	}
	return resp.TTL <= 0, nil
}

// checkFencing returns ErrNotOwner when the Else of a failed commit Txn
// found the fencing key gone or recreated.
func (r *run) checkFencing(txn *commitTxn, resp *clientv3.TxnResponse) error {
	o := &r.w.opts
	if !o.hasFencing {
		return nil
	}
	kvs := txn.reads.fencing(resp)
	if len(kvs) == 0 || kvs[0].CreateRevision != o.fencingRev {
		return fmt.Errorf("%w: fencing key %q no longer has create revision %d",
			ErrNotOwner, o.fencingKey, o.fencingRev)
	}
	return nil
}

// elseReadMaxKeys is how many compared keys a commit Txn reads back in its
// Else, for its groups to re-run at once after a conflict. A Txn that
// compares more reads only the token (and the fencing key): the reads would
// make every such Txn about a tenth slower to send, log and apply, for
// conflicts that are rare among many keys; its groups wait for the watch.
const elseReadMaxKeys = 16

// elseReadMaxBytes bounds the values (as the worker last saw them) of the
// keys a commit Txn reads back in its Else. The answer of a failed Txn
// carries them, and a client whose receive limit (MaxCallRecvMsgSize) it
// exceeds cannot take it: the conflict, or the link that merely overtook
// the one before it, would end Run with a size error. Keys of large values
// are not read back; their conflicts wait for the watch.
const elseReadMaxBytes = 256 << 10

// readBackBytes returns the bytes of the values keys had when the flush
// ran, which is what reading them back usually returns.
func readBackBytes(cv *commitView, keys []util.EtcdKey) int {
	n := 0
	for _, k := range keys {
		e, _ := cv.entry(k)
		n += len(k.String()) + len(e.value)
	}
	return n
}

// elseReads are the Else operations of a commit Txn, by name: what the
// worker reads back when a compare failed, to tell its own failures (token,
// fencing key) from a conflict, and the current value of every key the Txn
// compared (up to elseReadMaxKeys), on which the groups can re-run at once.
type elseReads struct {
	ops       []clientv3.Op
	tokenAt   int
	fencingAt int // -1 without fencing
	keysAt    int // ops[keysAt:] read keys, with the revisions compared
	keys      []util.EtcdKey
	revs      []int64
}

func (e *elseReads) token(resp *clientv3.TxnResponse) []*mvccpb.KeyValue {
	return resp.Responses[e.tokenAt].GetResponseRange().GetKvs()
}

func (e *elseReads) fencing(resp *clientv3.TxnResponse) []*mvccpb.KeyValue {
	return resp.Responses[e.fencingAt].GetResponseRange().GetKvs()
}

// key returns what the Else read of keys[i] (value nil: absent).
func (e *elseReads) key(resp *clientv3.TxnResponse, i int) kvEntry {
	kvs := resp.Responses[e.keysAt+i].GetResponseRange().GetKvs()
	if len(kvs) != 1 {
		return kvEntry{}
	}
	v := kvs[0].Value
	if v == nil {
		v = []byte{} // present with an empty value
	}
	return kvEntry{value: v, modRev: kvs[0].ModRevision}
}

// commitTxn is one commit Txn, built from named parts.
type commitTxn struct {
	// compares: each written or depended-on key still has the mod revision
	// the patches saw, no key of a depended-on range was put after the
	// snapshot, the token is where the chain needs it (see chain), the
	// delete counter has not moved, and the fencing key (if any) is still
	// there.
	compares []clientv3.Cmp
	// writes: the puts and deletes, the token's new value, and a bump of
	// the delete counter when the batch deletes.
	writes []clientv3.Op
	reads  elseReads
	cost   txnCost // what its keys cost, counted as it is built
}

// buildTxn builds the Txn of batch b: token is its compare on the commit
// token, value the token value it writes. written holds the revisions
// earlier Txns of the same flush wrote; cv is what the groups ran on (its
// revision bounds range dependencies).
func (r *run) buildTxn(b *txnBatch, written revisions, cv *commitView, token clientv3.Cmp, value uint64) commitTxn {
	o := &r.w.opts
	t := commitTxn{
		compares: make([]clientv3.Cmp, 0, len(b.writes)+len(b.depKeys)+len(b.prefixes)+3),
		writes:   make([]clientv3.Op, 0, len(b.writes)+2),
	}
	keys := make([]util.EtcdKey, 0, len(b.writes)+len(b.depKeys))
	revs := make([]int64, 0, cap(keys))
	for _, kw := range b.writes {
		key := kw.key.String()
		rev, ok := written[key]
		if !ok {
			e, _ := cv.entry(kw.key)
			rev = e.modRev
		}
		t.compares = append(t.compares, clientv3.Compare(clientv3.ModRevision(key), "=", rev))
		keys, revs = append(keys, kw.key), append(revs, rev)
		if kw.value == nil {
			t.writes = append(t.writes, clientv3.OpDelete(key))
		} else {
			t.writes = append(t.writes, clientv3.OpPut(key, string(kw.value)))
		}
		t.cost.addWrite(kw)
	}
	deps, depRevs := depCompares(*b, cv, written, cv.rev, &t.cost)
	t.compares = append(t.compares, deps...)
	keys, revs = append(keys, b.depKeys...), append(revs, depRevs...)
	counterKey := r.ks.counterKey
	counterRev, ok := written[counterKey]
	if !ok {
		counterRev = cv.counterRev
	}
	t.compares = append(t.compares, token, clientv3.Compare(clientv3.ModRevision(counterKey), "=", counterRev))
	t.writes = append(t.writes, r.token.put(value))
	if b.hasDelete() {
		t.writes = append(t.writes, clientv3.OpPut(counterKey, ""))
	}
	t.reads = elseReads{ops: make([]clientv3.Op, 0, len(keys)+2), fencingAt: -1}
	t.reads.ops = append(t.reads.ops, r.token.get())
	if o.hasFencing {
		t.compares = append(t.compares, clientv3.Compare(clientv3.CreateRevision(o.fencingKey), "=", o.fencingRev))
		t.reads.fencingAt = len(t.reads.ops)
		t.reads.ops = append(t.reads.ops, clientv3.OpGet(o.fencingKey))
	}
	if len(keys) > elseReadMaxKeys || readBackBytes(cv, keys) > elseReadMaxBytes {
		return t // its conflicts wait for the watch (see chain.freshAfter)
	}
	t.reads.keysAt, t.reads.keys, t.reads.revs = len(t.reads.ops), keys, revs
	for _, k := range keys {
		t.reads.ops = append(t.reads.ops, clientv3.OpGet(k.String()))
	}
	return t
}
