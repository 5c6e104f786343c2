package orchestrator

import (
	"context"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/etcdworker/orchestrator/internal/etcdreq"
)

// health tracks how current the state is known to be and whether etcd
// answers. An outage is time during which etcd failed to answer: it starts
// when the first request that then failed was sent, and ends with any
// successful answer (a load page, a watch response, a probe, a commit). Time
// the worker spends in user code or in successful reads is never an outage.
// See "Outages" in docs/DESIGN.md.
type health struct {
	maxOutage time.Duration // 0: no limit

	lastFresh   time.Time // newest proof that the state is current
	headRev     int64     // newest revision etcd reported anywhere
	outageSince time.Time // send time of the first failed request; zero: none
	// external is the start of an outage someone else saw: the Source's
	// (its reads are the worker's reads); zero: none.
	external time.Time
}

// since is when the outage began: the earlier of the worker's own and the
// Source's; zero without one.
func (h *health) since() time.Time {
	switch {
	case h.outageSince.IsZero():
		return h.external
	case h.external.IsZero() || h.outageSince.Before(h.external):
		return h.outageSince
	}
	return h.external
}

// answered records a successful answer from etcd at revision rev (0: none).
// It reports whether an outage ended.
func (h *health) answered(rev int64) bool {
	h.headRev = max(h.headRev, rev)
	ended := !h.outageSince.IsZero()
	h.outageSince = time.Time{}
	return ended
}

// failed records a request sent at sent that failed. It reports whether
// this starts an outage.
func (h *health) failed(sent time.Time) bool {
	if !h.outageSince.IsZero() {
		if sent.Before(h.outageSince) {
			h.outageSince = sent
		}
		return false
	}
	h.outageSince = sent
	return true
}

// rejectionOrOutage handles a request sent at sent that failed with err:
// it returns the rejection Run must end with when retrying cannot heal err
// (see rejected); otherwise it records the failure in h (see failed) and
// reports whether that started an outage. A worker and its Source's
// follower both take their failed requests through it; each reports the
// outcome in its own logs and metrics.
func (h *health) rejectionOrOutage(client *clientv3.Client, request string, sent time.Time, err error) (rejection error, started bool) {
	if rej := rejected(client, request, err); rej != nil {
		return rej, false
	}
	return nil, h.failed(sent)
}

// fresh records that the state was current at t.
func (h *health) fresh(t time.Time) {
	if t.After(h.lastFresh) {
		h.lastFresh = t
	}
}

// outageDeadline is when the outage becomes too long; zero without a limit
// or an outage.
func (h *health) outageDeadline() time.Time {
	since := h.since()
	if h.maxOutage <= 0 || since.IsZero() {
		return time.Time{}
	}
	return since.Add(h.maxOutage)
}

// tooLong reports whether the outage has lasted longer than the limit.
func (h *health) tooLong(now time.Time) bool {
	d := h.outageDeadline()
	return !d.IsZero() && now.After(d)
}

// requestTimeout bounds a request sent at now: the configured timeout, but
// never past the point where its failure would make the outage too long,
// so that Run gives up within about WithMaxOutage of the outage's start,
// not after a whole request timeout.
func (h *health) requestTimeout(now time.Time, timeout time.Duration) time.Duration {
	if h.maxOutage <= 0 {
		return timeout
	}
	limit := h.maxOutage
	if d := h.outageDeadline(); !d.IsZero() {
		limit = d.Sub(now)
	}
	return max(min(timeout, limit), 10*time.Millisecond)
}

// answered records a successful etcd answer at rev.
func (r *run) answered(rev int64) {
	if r.health.answered(rev) {
		r.log.Info("etcd answers again")
	}
}

// rejectionOrOutage returns the rejection Run must end with when retrying
// cannot heal err, the error of a request sent at sent (see
// health.rejectionOrOutage); for any other error it counts the retry and
// the outage it may start, publishes the status and returns nil: the caller
// retries.
func (r *run) rejectionOrOutage(request string, sent time.Time, err error) error {
	rej, started := r.health.rejectionOrOutage(r.w.client, request, sent, err)
	if rej != nil {
		return rej
	}
	r.m.retries.Inc()
	if started {
		r.m.outages.Inc()
		r.log.Warn("etcd request failed, retrying", zap.String("request", request), zap.Error(err))
	} else {
		r.log.Debug("etcd request failed again", zap.String("request", request), zap.Error(err))
	}
	r.publishStatus()
	return nil
}

// requestCtx returns the context of one etcd request sent now (see
// health.requestTimeout). Commits and their resolution pass ignoreCtx: once
// sent, a Txn runs to its outcome, through a cancel of Run's ctx, until
// the shutdown timeout after it (r.shutdown).
func (r *run) requestCtx(ignoreCtx bool) (context.Context, context.CancelFunc) {
	parent := r.ctx
	if ignoreCtx {
		parent = r.shutdown
	}
	return etcdreq.Context(parent, r.health.requestTimeout(r.now(), r.w.opts.requestTimeout), r.w.client)
}
