package leader

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/internal/backoff"
	"github.com/etcdworker/orchestrator/internal/etcderr"
	"github.com/etcdworker/orchestrator/internal/etcdreq"
	"github.com/etcdworker/orchestrator/internal/userfn"
	"github.com/etcdworker/orchestrator/util"
)

// Defaults for the fields of Worker left zero.
const (
	DefaultTimerInterval = 100 * time.Millisecond
	DefaultRole          = "leader"
)

const (
	// resignTimeout bounds the resignation after a clean stop (ctx may be
	// done by then, so it runs on a context of its own).
	resignTimeout = 5 * time.Second
	// Back-off between failed campaign attempts (etcd unreachable...),
	// doubling from minRetryDelay up to maxRetryDelay, with jitter.
	minRetryDelay = 100 * time.Millisecond
	maxRetryDelay = 5 * time.Second
)

// Term describes one leadership term of a candidate.
type Term struct {
	// Candidate is the candidate ID given to Run, the election's value.
	Candidate string
	// Key is the candidate's election key, the fencing key of the term.
	Key string
	// Rev is the create revision of Key. It grows from term to term (and
	// across candidates), so it can serve as a term number.
	Rev int64
	// Lease is the lease of the term's session, to which Key is attached.
	// Revoking it (as etcd does when the leader stops renewing it) ends the
	// term: a test can simulate a crashed leader that way.
	Lease clientv3.LeaseID
}

// Worker is what a term runs: the arguments of orchestrator.NewEtcdWorker
// and EtcdWorker.Run.
type Worker struct {
	// Prefix is the worker's etcd prefix. It must not overlap the election
	// prefix (neither under the other), or the term ends Run with an error
	// matching orchestrator.ErrInvalidArgument: the state would see the
	// election keys, or the worker's keys would block later campaigns.
	Prefix string
	// Reactor and State must be new for every term.
	Reactor orchestrator.Reactor
	State   orchestrator.ReactorState
	// TimerInterval is Run's timer interval (default DefaultTimerInterval).
	TimerInterval time.Duration
	// Role labels the worker's logs and metrics (default DefaultRole).
	Role string
	// Options are passed to NewEtcdWorker, followed by
	// orchestrator.WithFencingKey(term.Key, term.Rev), which takes precedence
	// over a fencing key among them.
	Options []orchestrator.Option
}

// NewWorkerFunc builds the worker of a term. It is called once per won
// election, with Run's ctx; an error ends Run with that error (after
// resigning).
type NewWorkerFunc func(ctx context.Context, term Term) (Worker, error)

// Run campaigns for leadership under electionPrefix as candidate and, each
// time it is elected, runs the worker built by newWorker until leadership is
// lost; then it campaigns again. It blocks until one of these happens:
//
//   - the reactor returned orchestrator.ErrReactorFinished: Run resigns and
//     returns nil;
//   - ctx is done: Run resigns (if it leads) and returns an error for which
//     errors.Is(err, ctx.Err()) holds;
//   - newWorker, NewEtcdWorker or the worker's Run failed with any other
//     error than the three below: Run resigns and returns it, wrapped;
//   - invalid arguments: an error matching orchestrator.ErrInvalidArgument;
//   - client was closed, or etcd denied a request (authentication,
//     permission): an error matching orchestrator.ErrEtcdRejected that wraps
//     it, as the worker's Run returns.
//
// A worker stopping with orchestrator.ErrNotOwner, ErrEtcdSessionDone or
// ErrEtcdUnavailable means leadership was (or may have been) lost: Run closes
// the session and campaigns again. Other failures to campaign (etcd
// unreachable) are retried with back-off until ctx ends.
//
// Each campaign uses a new concurrency.Session on client, with the TTL set by
// WithSessionTTL. After ctx is done, Run still resigns and revokes the
// session's lease, which takes at most a few seconds plus the TTL when etcd
// does not answer, whether it leads or campaigns (the campaign follows
// concurrency.Election's protocol, but no request of it outlives ctx).
func Run(ctx context.Context, client *clientv3.Client, electionPrefix, candidate string,
	newWorker NewWorkerFunc, opts ...Option) error {
	o := newOptions(opts)
	switch {
	case client == nil:
		return fmt.Errorf("leader: nil client: %w", orchestrator.ErrInvalidArgument)
	case electionPrefix == "", candidate == "":
		return fmt.Errorf("leader: empty election prefix or candidate: %w", orchestrator.ErrInvalidArgument)
	case newWorker == nil:
		return fmt.Errorf("leader: nil NewWorkerFunc: %w", orchestrator.ErrInvalidArgument)
	case o.sessionTTL < 1, o.sessionTTL > etcderr.MaxLeaseTTL:
		return fmt.Errorf("leader: session TTL %ds (1 to %d): %w", o.sessionTTL, etcderr.MaxLeaseTTL, orchestrator.ErrInvalidArgument)
	}
	c := &campaigner{
		client: client, prefix: electionPrefix, candidate: candidate, newWorker: newWorker, opts: o,
		log: o.logger.With(zap.String("election", electionPrefix), zap.String("candidate", candidate)),
	}
	return c.loop(ctx)
}

// campaigner is the state of one Run.
type campaigner struct {
	client    *clientv3.Client
	prefix    string
	candidate string
	newWorker NewWorkerFunc
	opts      options
	log       *zap.Logger
}

// loop campaigns and leads, term after term, until a term or a failed
// campaign says to stop.
func (c *campaigner) loop(ctx context.Context) error {
	bo := backoff.New(minRetryDelay, maxRetryDelay)
	for {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("leader: %w", err)
		}
		session, election, err := c.campaign(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("leader: %w", ctx.Err())
			}
			if etcderr.EndsRetries(c.client, err) { // the worker's rule
				return fmt.Errorf("leader: %w: campaign: %w", orchestrator.ErrEtcdRejected, err)
			}
			delay := bo.Next()
			c.log.Warn("campaign failed, retrying", zap.Duration("delay", delay), zap.Error(err))
			if err := sleep(ctx, delay); err != nil {
				return fmt.Errorf("leader: %w", err)
			}
			continue
		}
		bo.Reset()
		again, err := c.lead(ctx, session, election)
		if !again {
			return err
		}
	}
}

// campaign creates a session and blocks until it wins the election, the
// session is lost or ctx is done. On error nothing is left behind.
func (c *campaigner) campaign(ctx context.Context) (*concurrency.Session, *concurrency.Election, error) {
	// No request of a campaign waits on a closed client (clientv3 would
	// retry it until ctx ends).
	ctx, cancel := context.WithCancel(ctx)
	ctx, cancel = etcdreq.Bound(ctx, cancel, c.client)
	defer cancel()
	// Granting the lease ourselves lets ctx bound it; the session itself
	// lives on the client's context so that Close can still revoke the
	// lease after ctx is done.
	lease, err := c.client.Grant(ctx, int64(c.opts.sessionTTL))
	if err != nil {
		return nil, nil, fmt.Errorf("grant session lease: %w", err)
	}
	session, err := concurrency.NewSession(c.client,
		concurrency.WithLease(lease.ID), concurrency.WithTTL(c.opts.sessionTTL))
	if err != nil {
		c.revoke(ctx, lease.ID)
		return nil, nil, fmt.Errorf("new session: %w", err)
	}
	campaignCtx, stop := cancelOnClose(ctx, session.Done())
	election, err := c.elect(campaignCtx, session)
	stop()
	if err == nil {
		err = c.checkElectionKey(ctx, election)
	}
	if err != nil {
		c.closeSession(session)
		return nil, nil, fmt.Errorf("campaign: %w", err)
	}
	return session, election, nil
}

// elect is concurrency.Election.Campaign without its clean-up, which resigns
// on client.Ctx() when ctx ends and so waits for as long as etcd does not
// answer. Every request here ends with ctx; on error the caller closes the
// session, whose lease revocation (bounded by the TTL) deletes the key.
func (c *campaigner) elect(ctx context.Context, session *concurrency.Session) (*concurrency.Election, error) {
	dir := electionDir(c.prefix)
	key := fmt.Sprintf("%s%x", dir, session.Lease())
	resp, err := c.client.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, c.candidate, clientv3.WithLease(session.Lease()))).
		Else(clientv3.OpGet(key)).Commit()
	if err != nil {
		return nil, err
	}
	rev := resp.Header.Revision
	if !resp.Succeeded { // the lease is new, so the key is ours: a retried Txn
		kvs := resp.Responses[0].GetResponseRange().GetKvs()
		if len(kvs) == 0 {
			return nil, errElectionKeyLost
		}
		rev = kvs[0].CreateRevision
	}
	if err := c.waitDeletes(ctx, dir, rev-1); err != nil {
		return nil, err
	}
	return concurrency.ResumeElection(session, dir, key, rev), nil
}

// waitDeletes waits until no key under dir created at or before maxRev is
// left: the candidates ahead of this one.
func (c *campaigner) waitDeletes(ctx context.Context, dir string, maxRev int64) error {
	opts := append(clientv3.WithLastCreate(), clientv3.WithMaxCreateRev(maxRev))
	for {
		resp, err := c.client.Get(ctx, dir, opts...)
		if err != nil {
			return err
		}
		if len(resp.Kvs) == 0 {
			return nil
		}
		if err := c.waitDelete(ctx, string(resp.Kvs[0].Key), resp.Header.Revision); err != nil {
			return err
		}
	}
}

// errWatchLost says that the watch of a key ahead ended without an error.
var errWatchLost = errors.New("leader: watch lost while waiting for a delete")

// waitDelete waits until key is deleted after revision rev.
func (c *campaigner) waitDelete(ctx context.Context, key string, rev int64) error {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for wr := range c.client.Watch(wctx, key, clientv3.WithRev(rev)) {
		if err := wr.Err(); err != nil {
			return err
		}
		for _, ev := range wr.Events {
			if ev.Type == clientv3.EventTypeDelete {
				return nil
			}
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return errWatchLost
}

// errElectionKeyLost says that the election was won with a key that was
// already gone (its lease revoked while waiting).
var errElectionKeyLost = errors.New("leader: election key lost while campaigning")

// checkElectionKey verifies that the key that won the election still exists.
// Campaign only waits for the keys ahead of it to go, so it also "wins" after
// its own session was lost in the meantime.
func (c *campaigner) checkElectionKey(ctx context.Context, election *concurrency.Election) error {
	resp, err := c.client.Get(ctx, election.Key())
	if err != nil {
		return err
	}
	if len(resp.Kvs) == 0 || resp.Kvs[0].CreateRevision != election.Rev() {
		return errElectionKeyLost
	}
	return nil
}

// lead runs one term. again reports whether to campaign again; if not, err
// is what Run returns.
func (c *campaigner) lead(ctx context.Context, session *concurrency.Session,
	election *concurrency.Election) (again bool, err error) {
	defer c.closeSession(session)
	term := Term{Candidate: c.candidate, Key: election.Key(), Rev: election.Rev(), Lease: session.Lease()}
	log := c.log.With(zap.Int64("term", term.Rev))
	log.Info("elected")
	w, spec, err := c.buildWorker(ctx, term)
	if err != nil {
		c.resign(ctx, election, log)
		return false, fmt.Errorf("leader: term %d: %w", term.Rev, err)
	}
	if c.opts.onElected != nil {
		if perr := userfn.Do("leader.WithOnElected callback", func() { c.opts.onElected(term) }); perr != nil {
			log.Error("the elected callback panicked, resigning", zap.Error(perr))
			c.resign(ctx, election, log)
			return false, fmt.Errorf("leader: term %d: %w", term.Rev, perr)
		}
	}
	err = w.Run(ctx, session, spec.TimerInterval, spec.Role)
	if c.opts.onTermEnd != nil {
		if perr := userfn.Do("leader.WithOnTermEnd callback", func() { c.opts.onTermEnd(term, err) }); perr != nil {
			log.Error("the term-end callback panicked, resigning", zap.Error(perr), zap.NamedError("worker", err))
			c.resign(ctx, election, log)
			if err != nil {
				return false, fmt.Errorf("leader: term %d: %w (worker: %w)", term.Rev, perr, err)
			}
			return false, fmt.Errorf("leader: term %d: %w", term.Rev, perr)
		}
	}
	switch {
	case err == nil:
		log.Info("reactor finished, resigning")
		c.resign(ctx, election, log)
		return false, nil
	case ctx.Err() != nil:
		log.Info("stopping, resigning", zap.Error(err))
		c.resign(ctx, election, log)
		if errors.Is(err, ctx.Err()) {
			return false, fmt.Errorf("leader: term %d: %w", term.Rev, err)
		}
		return false, fmt.Errorf("leader: term %d: %w (worker: %w)", term.Rev, ctx.Err(), err)
	case errors.Is(err, orchestrator.ErrNotOwner), errors.Is(err, orchestrator.ErrEtcdSessionDone),
		errors.Is(err, orchestrator.ErrEtcdUnavailable):
		log.Warn("leadership lost, campaigning again", zap.Error(err))
		return true, nil
	default:
		log.Error("worker failed, resigning", zap.Error(err))
		c.resign(ctx, election, log)
		return false, fmt.Errorf("leader: term %d: %w", term.Rev, err)
	}
}

// buildWorker calls newWorker and builds the fenced EtcdWorker.
func (c *campaigner) buildWorker(ctx context.Context, term Term) (*orchestrator.EtcdWorker, Worker, error) {
	spec, err := c.callNewWorker(ctx, term)
	if err != nil {
		return nil, spec, err
	}
	if err := checkOverlap(c.prefix, spec.Prefix); err != nil {
		return nil, spec, err
	}
	if spec.TimerInterval == 0 {
		spec.TimerInterval = DefaultTimerInterval
	}
	if spec.Role == "" {
		spec.Role = DefaultRole
	}
	opts := append(slices.Clip(spec.Options), orchestrator.WithFencingKey(term.Key, term.Rev))
	w, err := orchestrator.NewEtcdWorker(c.client, spec.Prefix, spec.Reactor, spec.State, opts...)
	return w, spec, err
}

// checkOverlap returns an error when the election's keys (electionPrefix +
// "/") and the worker's keys (its prefix + "/") overlap: the state would see
// the election keys, or the worker's keys, older than any later candidate's
// key, would keep every later campaign waiting for them to be deleted.
func checkOverlap(electionPrefix, workerPrefix string) error {
	electionDir := electionDir(electionPrefix)
	workerDir := util.NormalizePrefix(workerPrefix).Dir()
	if strings.HasPrefix(electionDir, workerDir) || strings.HasPrefix(workerDir, electionDir) {
		return fmt.Errorf("leader: election prefix %q and worker prefix %q overlap: %w",
			electionPrefix, workerPrefix, orchestrator.ErrInvalidArgument)
	}
	return nil
}

// electionDir returns where the candidates' keys of the election on prefix
// lie: prefix + "/", with prefix used as is, as concurrency.NewElection does.
func electionDir(prefix string) string { return prefix + "/" }

// callNewWorker calls newWorker, turning a panic into an error.
func (c *campaigner) callNewWorker(ctx context.Context, term Term) (Worker, error) {
	return userfn.Call("leader.NewWorkerFunc", func() (Worker, error) { return c.newWorker(ctx, term) })
}

// resign deletes the election key so that another candidate is elected at
// once, instead of after the session's TTL.
func (c *campaigner) resign(ctx context.Context, election *concurrency.Election, log *zap.Logger) {
	rctx, cancel := etcdreq.Context(context.WithoutCancel(ctx), resignTimeout, c.client)
	defer cancel()
	if err := election.Resign(rctx); err != nil {
		log.Warn("resign failed; the session's lease revocation or expiry ends the term", zap.Error(err))
	}
}

// closeSession stops renewing the session's lease and revokes it (bounded by
// the TTL), which also deletes the election key if it is still there.
func (c *campaigner) closeSession(session *concurrency.Session) {
	if err := session.Close(); err != nil && !etcderr.LeaseNotFound(err) {
		c.log.Debug("revoking the session lease failed; it expires on its own", zap.Error(err))
	}
}

// revoke revokes a lease that has no session, bounded by the TTL.
func (c *campaigner) revoke(ctx context.Context, id clientv3.LeaseID) {
	rctx, cancel := etcdreq.Context(context.WithoutCancel(ctx), time.Duration(c.opts.sessionTTL)*time.Second, c.client)
	defer cancel()
	_, _ = c.client.Revoke(rctx, id) // best effort: the lease expires anyway
}

// cancelOnClose returns a context that is also cancelled when done closes.
// stop cancels it and waits for the goroutine watching done.
func cancelOnClose(ctx context.Context, done <-chan struct{}) (ctxOut context.Context, stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		select {
		case <-done:
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, func() { cancel(); <-exited }
}

// sleep waits for d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
