package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// tokenValueMaxLen bounds the decimal commit sequence written to the token.
const tokenValueMaxLen = 20

// tokenIDLen is the length of the random part of a token key.
const tokenIDLen = 16

// commitToken is the key one Run writes with every commit: its value is the
// sequence number of the last commit that landed. A commit Txn compares the
// token's mod revision with the one the worker last saw, so at most one Txn
// of the worker can land per token revision. That is what lets the worker
// resolve an unknown outcome: it fences the token (see fence) and reads who
// moved it. The token lives on a lease (the session's, or one the worker
// keeps alive), so a Run that dies without cleanup leaves nothing behind for
// longer than the lease's TTL.
type commitToken struct {
	key   string
	rev   int64  // mod revision of key as the worker last saw it (0: absent)
	seq   uint64 // sequence of the last commit that landed
	lease clientv3.LeaseID
}

// compare is the token part of a commit's If.
func (t *commitToken) compare() clientv3.Cmp {
	return clientv3.Compare(clientv3.ModRevision(t.key), "=", t.rev)
}

// put writes sequence seq.
func (t *commitToken) put(seq uint64) clientv3.Op {
	v := strconv.FormatUint(seq, 10)
	if t.lease != clientv3.NoLease {
		return clientv3.OpPut(t.key, v, clientv3.WithLease(t.lease))
	}
	return clientv3.OpPut(t.key, v)
}

// get reads the token back (an Else operation).
func (t *commitToken) get() clientv3.Op { return clientv3.OpGet(t.key) }

// moved records that sequence seq landed at rev.
func (t *commitToken) moved(seq uint64, rev int64) {
	t.seq = seq
	t.rev = rev
}

// adopt takes the token as etcd has it now (kvs of a get) after a Txn of
// the worker failed with nothing of the worker's in flight, and reports
// whether it differed: someone deleted or rewrote it (a wipe of the prefix),
// or it vanished with its lease.
func (t *commitToken) adopt(kvs []*mvccpb.KeyValue) bool {
	var rev int64
	if len(kvs) > 0 {
		rev = kvs[0].ModRevision
	}
	if rev == t.rev {
		return false
	}
	t.rev = rev
	return true
}

// fenceOutcome is what a fence found out about the Txn that wrote seq.
type fenceOutcome int

const (
	fenceNotLanded fenceOutcome = iota // the fence landed: the Txn never will
	fenceLanded                        // the token holds seq: the Txn landed
	fenceUnknown                       // the token was changed by someone else, or vanished
)

// fence builds the Txn that resolves an unknown outcome of the commit that
// wrote seq: it moves the token to seq+1 only if the token still has the
// revision that commit compared against. If the fence lands, that commit can
// never land; if not, only that commit (or an earlier fence of the same
// resolution) can have moved the token.
func (t *commitToken) fence(txn clientv3.Txn, seq uint64) clientv3.Txn {
	return txn.If(t.compare()).Then(t.put(seq + 1)).Else(t.get())
}

// fenced reads a fence's response and updates the token.
func (t *commitToken) fenced(resp *clientv3.TxnResponse, seq uint64) fenceOutcome {
	if resp.Succeeded {
		t.moved(seq+1, resp.Header.Revision)
		return fenceNotLanded
	}
	kvs := resp.Responses[0].GetResponseRange().GetKvs()
	if len(kvs) != 1 {
		return fenceUnknown
	}
	switch string(kvs[0].Value) {
	case strconv.FormatUint(seq, 10):
		t.moved(seq, kvs[0].ModRevision)
		return fenceLanded
	case strconv.FormatUint(seq+1, 10):
		// An earlier fence of this resolution landed but its answer was
		// lost: the token moved only through it.
		t.moved(seq+1, kvs[0].ModRevision)
		return fenceNotLanded
	}
	return fenceUnknown
}

// tokenLease is the lease a Run without a session puts its token on. It is
// granted on the first commit (a worker that never writes needs none), kept
// alive by a goroutine the lease owns, and revoked by close. When it expires
// (an outage longer than its TTL) the next commit is rejected as a whole and
// the worker grants a new one.
type tokenLease struct {
	lease clientv3.Lease
	ttl   time.Duration

	id   clientv3.LeaseID
	stop context.CancelFunc
	wg   sync.WaitGroup
}

func newTokenLease(client *clientv3.Client, ttl time.Duration) *tokenLease {
	return &tokenLease{lease: clientv3.NewLease(client), ttl: ttl}
}

// ensure returns the lease, granting it and starting its keep-alive first
// when there is none.
func (l *tokenLease) ensure(ctx context.Context, base context.Context) (clientv3.LeaseID, error) {
	if l.id != clientv3.NoLease {
		return l.id, nil
	}
	resp, err := l.lease.Grant(ctx, int64(max(l.ttl/time.Second, 1)))
	if err != nil {
		return clientv3.NoLease, fmt.Errorf("orchestrator: grant commit token lease: %w", err)
	}
	kctx, stop := context.WithCancel(base)
	ch, err := l.lease.KeepAlive(kctx, resp.ID)
	if err != nil {
		stop()
		return clientv3.NoLease, fmt.Errorf("orchestrator: keep commit token lease alive: %w", err)
	}
	l.id, l.stop = resp.ID, stop
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for range ch { // drain: clientv3 needs the responses consumed
		}
	}()
	return l.id, nil
}

// expired forgets a lease etcd no longer has; the next ensure grants another.
func (l *tokenLease) expired() {
	l.release()
	l.id = clientv3.NoLease
}

// release stops the keep-alive and joins its goroutine.
func (l *tokenLease) release() {
	if l.stop != nil {
		l.stop()
		l.stop = nil
	}
	l.wg.Wait()
}

// close revokes the lease (best effort, bounded by timeout), which deletes
// the token, and releases everything.
func (l *tokenLease) close(ctx context.Context) error {
	id := l.id
	l.expired()
	var err error
	if id != clientv3.NoLease {
		_, err = l.lease.Revoke(ctx, id)
	}
	if cerr := l.lease.Close(); cerr != nil && err == nil && !errors.Is(cerr, context.Canceled) {
		err = cerr
	}
	return err
}

// isLeaseNotFound reports whether err says a lease is gone.
func isLeaseNotFound(err error) bool { return errors.Is(err, rpctypes.ErrLeaseNotFound) }

// ensureTokenLease grants the token's own lease when the run has none yet
// (runs without a session), retrying transient errors.
func (r *run) ensureTokenLease() error {
	if r.lease == nil {
		return nil
	}
	bo := newBackoff()
	for {
		sent := r.now()
		ctx, cancel := r.requestCtx(false)
		id, err := r.lease.ensure(ctx, r.ctx)
		cancel()
		if err == nil {
			r.token.lease = id
			return nil
		}
		if stop := r.checkStop(); stop != nil {
			return stop
		}
		if err := r.failed("grant lease", sent, err); err != nil {
			return err
		}
		if err := r.sleep(bo.next(), false); err != nil {
			return err
		}
	}
}
