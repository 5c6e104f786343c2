package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// commitPending runs the pending patch groups on a copy-on-write view of the
// state, packs their writes into Txns and sends them in order. Groups whose
// Txn landed are done; from the first Txn that did not land on, the groups
// stay pending and are re-run once the state has caught up.
func (r *run) commitPending() error {
	w := r.w
	view := newPatchView(w.liveValues, w.committedValue)
	defer view.reset()

	writes := make([]groupWrites, len(r.pending))
	for i, group := range r.pending {
		gw, err := view.applyGroup(group)
		if err != nil {
			if errors.Is(err, ErrEtcdTryAgain) {
				r.tryAgain = true
				r.tryAgainRev = r.appliedRev
				r.tryAgainUntil = r.now().Add(r.interval)
				r.log.Debug("patch asked to try again", zap.Int64("revision", r.appliedRev))
				return nil
			}
			return fmt.Errorf("orchestrator: patch group %d: %w", i, err)
		}
		for _, kw := range gw {
			if err := w.checkWritable(kw.key); err != nil {
				return err
			}
		}
		if err := checkGroupFits(gw, w.limits); err != nil {
			return fmt.Errorf("orchestrator: patch group %d: %w", i, err)
		}
		writes[i] = gw
	}
	r.tryAgain = false

	// Revisions written by the Txns of this flush, which later Txns of the
	// same flush must compare against (0 for a deleted key).
	written := make(map[string]int64)
	for _, b := range packTxns(writes, w.limits) {
		if len(b.writes) == 0 {
			continue
		}
		out, err := r.commitTxn(b, written)
		if err != nil {
			return err
		}
		if !out.landed {
			r.pending = r.pending[b.start:]
			r.retryAtRev = out.rev
			r.watch.requestProgress()
			return nil
		}
		r.barrierRev = out.rev
		groups := 0
		for _, g := range writes[b.start:b.end] {
			if len(g) > 0 {
				groups++
			}
		}
		r.m.patches.Add(float64(groups))
	}
	r.pending = nil
	return nil
}

// txnOutcome is what became of one commit Txn: landed at rev, or not landed
// and the state must reach rev before the groups are re-run.
type txnOutcome struct {
	landed bool
	rev    int64
}

// commitTxn sends one batch as a compare-and-swap Txn and finds out its
// outcome, resolving an unknown one through the commit token.
func (r *run) commitTxn(b txnBatch, written map[string]int64) (txnOutcome, error) {
	w := r.w
	seq := r.tokenSeq + 1
	cmps := make([]clientv3.Cmp, 0, len(b.writes)+3)
	ops := make([]clientv3.Op, 0, len(b.writes)+2)
	size := 0
	for _, kw := range b.writes {
		key := kw.key.String()
		rev, ok := written[key]
		if !ok {
			rev = w.committed[kw.key].modRev
		}
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(key), "=", rev))
		if kw.value == nil {
			ops = append(ops, clientv3.OpDelete(key))
		} else {
			ops = append(ops, clientv3.OpPut(key, string(kw.value)))
		}
		size += writeSize(kw)
	}
	counterRev, ok := written[w.counterKey]
	if !ok {
		counterRev = r.counterRev
	}
	cmps = append(cmps,
		clientv3.Compare(clientv3.ModRevision(r.tokenKey), "=", r.tokenRev),
		clientv3.Compare(clientv3.ModRevision(w.counterKey), "=", counterRev))
	ops = append(ops, r.tokenPut(seq))
	if b.hasDelete {
		ops = append(ops, clientv3.OpPut(w.counterKey, ""))
	}
	els := []clientv3.Op{clientv3.OpGet(r.tokenKey)}
	if w.opts.hasFencing {
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(w.opts.fencingKey), "=", w.opts.fencingRev))
		els = append(els, clientv3.OpGet(w.opts.fencingKey))
	}

	if err := r.checkStop(); err != nil {
		return txnOutcome{}, err // stopping: start no new Txn
	}
	start := r.now()
	// The Txn is not cancelled with ctx: once sent it runs to its outcome.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.ctx), w.opts.requestTimeout)
	resp, err := w.client.Txn(ctx).If(cmps...).Then(ops...).Else(els...).Commit()
	cancel()
	r.m.txnDuration.Observe(r.now().Sub(start).Seconds())
	r.m.txnBytes.Observe(float64(size))
	if err != nil {
		if fatal := classifyTxnError(err); fatal != nil {
			return txnOutcome{}, fatal
		}
		r.m.unknownCommit.Inc()
		r.failure("commit", err)
		out, err := r.resolve(seq)
		if err != nil {
			return txnOutcome{}, err
		}
		if out.landed {
			r.landed(b, written, out.rev)
		}
		return out, nil
	}
	r.contact()
	rev := resp.Header.Revision
	r.headRev = max(r.headRev, rev)
	if resp.Succeeded {
		r.tokenSeq = seq
		r.tokenRev = rev
		r.landed(b, written, rev)
		r.log.Debug("commit landed", zap.Int64("revision", rev), zap.Int("keys", len(b.writes)),
			zap.Int("groups", b.end-b.start), zap.Int("bytes", size))
		return txnOutcome{landed: true, rev: rev}, nil
	}
	// A compare failed. Find out whether it was one of the worker's own.
	if w.opts.hasFencing {
		kvs := resp.Responses[1].GetResponseRange().GetKvs()
		if len(kvs) == 0 || kvs[0].CreateRevision != w.opts.fencingRev {
			return txnOutcome{}, fmt.Errorf("%w: fencing key %q no longer has create revision %d",
				ErrNotOwner, w.opts.fencingKey, w.opts.fencingRev)
		}
	}
	if err := r.checkToken(resp.Responses[0].GetResponseRange().GetKvs()); err != nil {
		return txnOutcome{}, err
	}
	r.m.conflicts.Inc()
	r.log.Debug("commit conflict, re-running the patches on newer state", zap.Int64("revision", rev))
	return txnOutcome{landed: false, rev: rev}, nil
}

// landed records the revisions a landed batch produced.
func (r *run) landed(b txnBatch, written map[string]int64, rev int64) {
	for _, kw := range b.writes {
		if kw.value == nil {
			written[kw.key.String()] = 0
		} else {
			written[kw.key.String()] = rev
		}
	}
	if b.hasDelete {
		written[r.w.counterKey] = rev
	}
	r.m.commits.Inc()
}

func (r *run) tokenPut(seq uint64) clientv3.Op {
	v := strconv.FormatUint(seq, 10)
	if r.lease != clientv3.NoLease {
		return clientv3.OpPut(r.tokenKey, v, clientv3.WithLease(r.lease))
	}
	return clientv3.OpPut(r.tokenKey, v)
}

// checkToken handles a failed Txn whose token compare may have failed: the
// token kvs are the token as etcd has it now.
func (r *run) checkToken(kvs []*mvccpb.KeyValue) error {
	var rev int64
	if len(kvs) > 0 {
		rev = kvs[0].ModRevision
	}
	if rev == r.tokenRev {
		return nil
	}
	// The token vanished with an expired session lease (then the next Txn,
	// which puts it with that lease, fails as a whole and Run returns
	// ErrEtcdSessionDone), or someone else deleted or wrote it (for example
	// a wipe of the prefix). Nothing of ours is in flight, so adopt what etcd
	// has.
	r.log.Warn("commit token changed behind the worker's back", zap.String("key", r.tokenKey),
		zap.Int64("expected", r.tokenRev), zap.Int64("actual", rev))
	r.tokenRev = rev
	return nil
}

// classifyTxnError returns the error Run must return for a Txn error that
// proves the Txn was rejected as a whole and will be rejected again, or nil
// when the outcome is unknown and must be resolved.
func classifyTxnError(err error) error {
	switch {
	case errors.Is(err, rpctypes.ErrPermissionDenied), errors.Is(err, rpctypes.ErrAuthFailed), errors.Is(err, rpctypes.ErrUserEmpty),
		errors.Is(err, rpctypes.ErrUserNotFound), errors.Is(err, rpctypes.ErrDuplicateKey),
		errors.Is(err, rpctypes.ErrEmptyKey):
		return fmt.Errorf("orchestrator: commit rejected by etcd: %w", err)
	case errors.Is(err, rpctypes.ErrTooManyOps):
		return fmt.Errorf("%w: the server's --max-txn-ops is lower than the worker's limit: %w", ErrEtcdTxnOpsExceed, err)
	case errors.Is(err, rpctypes.ErrRequestTooLarge):
		return fmt.Errorf("%w: the server's --max-request-bytes is lower than the worker's limit: %w", ErrEtcdTxnSizeExceed, err)
	case errors.Is(err, rpctypes.ErrLeaseNotFound):
		return fmt.Errorf("%w: %w", ErrEtcdSessionDone, err)
	}
	// Errors etcd's server knows arrive as rpctypes.EtcdError (handled
	// above); a raw gRPC status comes from gRPC itself, such as a request
	// over the server's receive limit (--max-request-bytes + framing).
	if s, ok := status.FromError(err); ok {
		switch s.Code() {
		case codes.ResourceExhausted:
			if strings.Contains(s.Message(), "larger than max") {
				return fmt.Errorf("%w: %w", ErrEtcdTxnSizeExceed, err)
			}
		case codes.PermissionDenied, codes.Unauthenticated:
			return fmt.Errorf("orchestrator: commit rejected by etcd: %w", err)
		}
	}
	return nil
}

// resolve finds out whether the Txn that wrote token value seq landed. It
// fences the token: a Txn that puts the token only if it still has the
// revision the lost Txn compared against. If the fence lands, the lost Txn
// can never land (its compare fails); if it does not, the token moved, and
// only the lost Txn can have moved it. It retries with back-off until etcd
// answers; after ctx is done it keeps trying for the shutdown timeout.
func (r *run) resolve(seq uint64) (txnOutcome, error) {
	w := r.w
	bo := newBackoff()
	var deadline time.Time
	for {
		if r.session != nil {
			select {
			case <-r.session.Done():
				return txnOutcome{}, fmt.Errorf("%w: while resolving a commit", ErrEtcdSessionDone)
			default:
			}
		}
		if r.ctx.Err() != nil && deadline.IsZero() {
			deadline = r.now().Add(w.opts.shutdownTimeout)
		}
		fence := seq + 1
		ctx, cancel := context.WithTimeout(context.WithoutCancel(r.ctx), w.opts.requestTimeout)
		resp, err := w.client.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(r.tokenKey), "=", r.tokenRev)).
			Then(r.tokenPut(fence)).
			Else(clientv3.OpGet(r.tokenKey)).Commit()
		cancel()
		if err == nil {
			r.contact()
			if resp.Succeeded {
				r.tokenSeq = fence
				r.tokenRev = resp.Header.Revision
				r.log.Info("unknown commit outcome resolved: not landed", zap.Int64("revision", r.tokenRev))
				return txnOutcome{landed: false, rev: r.tokenRev}, nil
			}
			kvs := resp.Responses[0].GetResponseRange().GetKvs()
			if len(kvs) == 1 && string(kvs[0].Value) == strconv.FormatUint(seq, 10) {
				r.tokenSeq = seq
				r.tokenRev = kvs[0].ModRevision
				r.log.Info("unknown commit outcome resolved: landed", zap.Int64("revision", r.tokenRev))
				return txnOutcome{landed: true, rev: r.tokenRev}, nil
			}
			if len(kvs) == 1 && string(kvs[0].Value) == strconv.FormatUint(fence, 10) {
				// An earlier fence of this loop landed but its answer was
				// lost: the token moved only through it, so the lost Txn
				// never landed and never will.
				r.tokenSeq = fence
				r.tokenRev = kvs[0].ModRevision
				r.log.Info("unknown commit outcome resolved: not landed", zap.Int64("revision", r.tokenRev))
				return txnOutcome{landed: false, rev: r.tokenRev}, nil
			}
			if len(kvs) == 0 && r.session != nil && r.leaseGone() {
				return txnOutcome{}, fmt.Errorf("%w: commit token vanished with the session lease", ErrEtcdSessionDone)
			}
			return txnOutcome{}, fmt.Errorf("%w: commit token %q was changed by someone else", ErrCommitUnresolved, r.tokenKey)
		}
		if fatal := classifyTxnError(err); fatal != nil {
			return txnOutcome{}, fatal
		}
		r.failure("resolve commit", err)
		if r.ctx.Err() == nil && w.opts.maxOutage > 0 && r.now().Sub(r.lastContact) > w.opts.maxOutage {
			return txnOutcome{}, fmt.Errorf("%w: %w", ErrEtcdUnavailable, ErrCommitUnresolved)
		}
		if !deadline.IsZero() && r.now().After(deadline) {
			return txnOutcome{}, fmt.Errorf("%w: %w", r.ctxErr(), ErrCommitUnresolved)
		}
		if err := r.pause(bo.next()); err != nil {
			return txnOutcome{}, err
		}
	}
}

// leaseGone reports whether etcd no longer has the session's lease (an
// error counts as gone: the caller is about to give up either way).
func (r *run) leaseGone() bool {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.ctx), r.w.opts.requestTimeout)
	defer cancel()
	resp, err := r.w.client.TimeToLive(ctx, r.lease)
	return err != nil || resp.TTL <= 0
}

// pause waits for d; unlike sleep it ignores ctx (the commit must be
// resolved first) but not the session.
func (r *run) pause(d time.Duration) error {
	timer := r.w.opts.clock.NewTimer(d)
	defer timer.Stop()
	select {
	case <-r.sessionDone():
		return fmt.Errorf("%w: while resolving a commit", ErrEtcdSessionDone)
	case <-timer.Chan():
		return nil
	}
}
