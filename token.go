package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/internal/backoff"
	"github.com/etcdworker/orchestrator/internal/etcderr"
)

// tokenValueMaxLen bounds the decimal commit sequence written to the token.
const tokenValueMaxLen = 20

// tokenIDLen is the length of the random part of a token key.
const tokenIDLen = 16

// commitToken is the key one Run writes with every commit: its value is a
// number the worker never writes twice (see alloc), so the token's value
// only grows. A commit Txn requires the token to be where the worker last
// saw it: the first Txn of a chain compares its mod revision, every later
// Txn of the chain compares its value with the value the Txn before it
// writes, so a Txn can land only right after the one before it (see "Commit
// token fence" and "Pipelined commits" in docs/DESIGN.md). That is also what
// lets the worker resolve an unknown outcome: it fences the token (see
// fence) and reads who moved it. The token lives on a lease (the session's,
// or one the worker keeps alive), so a Run that dies without cleanup leaves
// nothing behind for longer than the lease's TTL.
type commitToken struct {
	key  string
	rev  int64  // mod revision of key as the worker last saw it (0: absent)
	last uint64 // the highest value the worker sent in a Txn or a fence
	// lease is the lease the token is put on.
	lease clientv3.LeaseID
}

// alloc returns a value the worker never sent before: one for each commit
// Txn and each fence it sends, so that a Txn that compares a value can only
// ever land right after the one Txn that writes it.
func (t *commitToken) alloc() uint64 {
	t.last++
	return t.last
}

// compareRev is the token part of the If of the first Txn of a chain (and
// of a fence): the token still has mod revision rev (0: it is absent).
func (t *commitToken) compareRev(rev int64) clientv3.Cmp {
	return clientv3.Compare(clientv3.ModRevision(t.key), "=", rev)
}

// compareValue is the token part of the If of a chained Txn: the token
// holds value, which only the Txn before it in the chain writes.
func (t *commitToken) compareValue(value uint64) clientv3.Cmp {
	return clientv3.Compare(clientv3.Value(t.key), "=", strconv.FormatUint(value, 10))
}

// put writes value.
func (t *commitToken) put(value uint64) clientv3.Op {
	v := strconv.FormatUint(value, 10)
	if t.lease != clientv3.NoLease {
		return clientv3.OpPut(t.key, v, clientv3.WithLease(t.lease))
	}
	return clientv3.OpPut(t.key, v)
}

// get reads the token back (an Else operation).
func (t *commitToken) get() clientv3.Op { return clientv3.OpGet(t.key) }

// fence builds the Txn that settles a chain whose Txns' outcomes are not all
// known: it moves the token to value (fresh from alloc) only if the token
// still has mod revision rev, where the chain was last seen. If the fence
// lands, no Txn of the chain after that point can ever land (each compares
// a value that only a Txn that is now dead writes); if not, the Else read
// says how far the chain got.
func (t *commitToken) fence(txn clientv3.Txn, rev int64, value uint64) clientv3.Txn {
	return txn.If(t.compareRev(rev)).Then(t.put(value)).Else(t.get())
}

// tokenRead is the token as a read (an Else get) found it.
type tokenRead struct {
	present bool
	numeric bool   // the value is a decimal number (the worker's own writes are)
	value   uint64 // when numeric
	modRev  int64  // 0: absent
}

// readToken parses the kvs of a get of the token.
func readToken(kvs []*mvccpb.KeyValue) tokenRead {
	if len(kvs) != 1 {
		return tokenRead{}
	}
	tr := tokenRead{present: true, modRev: kvs[0].ModRevision}
	if v, err := strconv.ParseUint(string(kvs[0].Value), 10, 64); err == nil {
		tr.value, tr.numeric = v, true
	}
	return tr
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

// ensureToken puts the commit token when the worker knows it as absent: on
// the Run's first commit, after the token vanished (a wipe of the prefix)
// and after its lease expired. A chain never starts from an absent token,
// because a deleted token is absent too: a fence at "absent" could not tell
// a chain whose first Txn landed and whose token someone then deleted from
// a chain that never landed, and would take a landed commit for one that
// did not (see "Commit token fence" in docs/DESIGN.md). From a token that
// exists, a deletion moves its mod revision, and the fence sees it. The put
// writes a fresh value only if the token is still absent; otherwise the
// worker takes the token where it is (a put of its own whose answer was
// lost, or someone else's write). It retries until etcd answers, as a
// commit does.
func (r *run) ensureToken() error {
	t := r.token
	bo := newBackoff()
	for t.rev == 0 {
		if err := r.ensureTokenLease(); err != nil {
			return err
		}
		sent := r.now()
		ctx, cancel := r.requestCtx(false)
		resp, err := r.w.client.Txn(ctx).If(t.compareRev(0)).Then(t.put(t.alloc())).Else(t.get()).Commit()
		cancel()
		switch {
		case err == nil:
			r.answered(resp.Header.Revision)
			if resp.Succeeded {
				t.rev = resp.Header.Revision
			} else {
				t.rev = readToken(resp.Responses[0].GetResponseRange().GetKvs()).modRev
			}
			continue
		case etcderr.LeaseNotFound(err) && r.lease != nil:
			r.lease.expired() // granted again by ensureTokenLease
			continue
		}
		if r.ended() {
			// A cancel (and perhaps a close of the client after it) cut the
			// put: a stop, not a rejection. No commit was sent.
			return r.stopErr()
		}
		if rej := commitRejected(r.w.client, err); rej != nil {
			return rej
		}
		if err := r.retryAfter("put commit token", sent, err, &bo); err != nil {
			return err
		}
	}
	return nil
}

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
		if err := r.retryAfter("grant lease", sent, err, &bo); err != nil {
			return err
		}
	}
}

// retryAfter handles the failed request of a set-up step of the run (sent
// at sent, failed with err): it returns the error Run must end with (a
// stop, a rejection that retrying cannot heal), or nil once it has waited
// bo's next back-off, for the caller to try again.
func (r *run) retryAfter(request string, sent time.Time, err error, bo *backoff.Backoff) error {
	if stop := r.checkStop(); stop != nil {
		return stop
	}
	if err := r.rejectionOrOutage(request, sent, err); err != nil {
		return err
	}
	return r.sleep(bo.Next(), false)
}
