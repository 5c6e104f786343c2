package orchestrator

import (
	"bytes"
	"fmt"
	"slices"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/etcdworker/orchestrator/internal/etcderr"
	"github.com/etcdworker/orchestrator/util"
)

// Pipelined commits: the Txns of one flush go out as a chain, up to the
// pipeline depth of them before the first one answers. The first Txn of a
// chain compares the commit token's mod revision with the one the worker
// last saw; every later one compares the token's value with the value the
// Txn before it writes, which no other Txn or fence ever writes, so a Txn
// can land only right after the one before it. A Txn that writes or depends
// on a key an earlier Txn in flight writes (or the delete counter, when one
// in flight deletes) is sent only once that one answered: its compare needs
// the revision the earlier one produces. See "Pipelined commits" in
// docs/DESIGN.md.

// The pause between the sends of two links of a chain (run.spacing). Sent
// at once, concurrent Txns reach etcd's raft log in any order: the server
// runs a goroutine for each request, and on a busy server the newest one
// often runs first (about half of the pairs sent back to back arrived
// swapped in the benchmark). A link that overtakes the one before it fails
// and is sent again, which costs a round trip. The pause lets the server
// take a link before the next arrives; a timer shorter than a millisecond
// often fires about a millisecond late when the process is idle, which in
// the benchmark kept about one link in twelve from overtaking while still
// letting etcd batch the rest of a chain into one raft round. The pause
// doubles (up to maxSpacing) whenever a link overtook the one before it and
// shrinks by an eighth after each chain that arrived in order.
const (
	initialSpacing = 200 * time.Microsecond
	minSpacing     = 50 * time.Microsecond
	maxSpacing     = time.Millisecond
)

// linkState is what the worker knows of one Txn of a chain.
type linkState int

const (
	linkInFlight linkState = iota // sent, not answered yet
	linkLanded                    // answered: it landed
	linkFailed                    // answered: a compare failed, nothing was written
	linkUnknown                   // no answer: it may have landed, or land later
	linkRejected                  // etcd refused it whole: nothing was written
	linkDead                      // was unknown; now it is known it never lands
)

// Where the token stood when etcd evaluated a failed link (link.evalAt),
// besides a position of the window (0: where the window starts, j: after
// its j-th link).
const (
	evalEarlier = -1 // before the window: the link overtook the one before it
	evalForeign = -2 // nowhere the worker put it: someone changed the token
)

// link is one commit Txn of a chain.
type link struct {
	batch        int // index of its batch in the flush
	txn          commitTxn
	value        uint64 // the token value it writes
	chained      bool   // it compares the value of the link before it (else the token's mod revision)
	sent         time.Time
	state        linkState
	resp         *clientv3.TxnResponse // linkLanded, linkFailed
	err          error                 // linkUnknown, linkRejected
	rev          int64                 // linkLanded: the revision it landed at
	leaseGone    bool                  // linkRejected: the token's own lease was not found
	unresolvable bool                  // linkUnknown: the client is closed, nothing can tell
	evalAt       int                   // linkFailed: see evalEarlier
}

// linkResult is the answer to one link, from the goroutine that sent it.
type linkResult struct {
	l    *link
	resp *clientv3.TxnResponse
	err  error
	took time.Duration
}

// chain sends the Txns of one flush and settles what became of them.
type chain struct {
	r       *run
	cv      *commitView
	groups  [][]DataPatch
	writes  []groupWrites
	batches []txnBatch
	depth   int

	written    revisions // revisions the landed Txns of the flush wrote
	landed     int       // batches[:landed] landed (or wrote nothing)
	landedAt   []int64   // the revision each landed batch landed at (0: none or not known)
	revUnknown bool      // a Txn landed at a revision the worker does not know
	next       int       // the next batch to send
	window     []*link   // sent and not settled, in chain order
	busy       map[util.EtcdKey]struct{}
	busyDelete bool               // a link of the window deletes (bumps the counter)
	earlier    map[int64]struct{} // token revisions of the flush before the window's start
	results    chan linkResult
	wg         sync.WaitGroup
	res        flushResult
	lastSent   time.Time
	chained    bool // a link was sent while another was in flight
	overtaken  bool // a link overtook the one before it
}

// newChain returns the chain that commits batches, the packed writes of
// groups, which ran on cv.
func (r *run) newChain(cv *commitView, groups [][]DataPatch, writes []groupWrites, batches []txnBatch) *chain {
	depth := min(max(r.w.opts.pipelineDepth, 1), max(len(batches), 1))
	return &chain{
		r: r, cv: cv, groups: groups, writes: writes, batches: batches, depth: depth,
		written:  make(revisions),
		landedAt: make([]int64, len(batches)),
		busy:     make(map[util.EtcdKey]struct{}),
		earlier:  map[int64]struct{}{r.token.rev: {}},
		results:  make(chan linkResult, depth),
	}
}

// run sends the batches in order, up to depth at once, until all landed, one
// did not, or the flush must stop. Every goroutine it starts has ended when
// it returns.
func (c *chain) run() (flushResult, error) {
	defer c.wg.Wait()
	var stop error
	for {
		halt := false
		if stop == nil {
			halt, stop = c.fill()
		}
		if len(c.window) == 0 {
			if stop != nil {
				return flushResult{}, stop
			}
			if halt {
				c.res.retryAtRev = c.res.barrierRev // re-run once the state has it
			}
			return c.finish(), nil
		}
		c.receive()
		c.popLanded()
		if len(c.window) == 0 || c.window[0].state == linkInFlight {
			continue
		}
		// The first Txn in flight did not land (or nothing tells yet): no
		// Txn behind it can land unless it did.
		c.drain()
		more, err := c.settle()
		if err != nil {
			return flushResult{}, err
		}
		if !more && stop == nil {
			return c.finish(), nil
		}
	}
}

// fill sends batches while the window has room and the next batch does not
// need what a Txn in flight writes. halt: the next batch depends on a range
// an earlier Txn of the flush wrote into; it waits for the state.
func (c *chain) fill() (halt bool, err error) {
	for c.next < len(c.batches) && len(c.window) < c.depth {
		b := &c.batches[c.next]
		if len(b.writes) == 0 {
			// Only when every group of the flush is a no-op (packTxns).
			if len(c.window) > 0 {
				return false, nil
			}
			c.next++
			c.landed = c.next
			continue
		}
		if len(c.window) > 0 && (len(b.prefixes) > 0 || c.overlaps(b)) {
			return false, nil // its compares need the revisions those Txns produce
		}
		if len(b.prefixes) > 0 && rangeWritten(*b, c.written, c.r.token.key) {
			return true, nil
		}
		if len(c.window) == 0 {
			if err := c.r.ensureTokenLease(); err != nil {
				return false, err
			}
		}
		if err := c.r.checkStop(); err != nil {
			return false, err // stopping: start no new Txn
		}
		c.send(b)
	}
	return false, nil
}

// overlaps reports whether b writes, depends on or compares a key a link of
// the window writes.
func (c *chain) overlaps(b *txnBatch) bool {
	if c.busyDelete {
		return true // every Txn compares the delete counter
	}
	for _, kw := range b.writes {
		if _, ok := c.busy[kw.key]; ok {
			return true
		}
	}
	for _, k := range b.depKeys {
		if _, ok := c.busy[k]; ok {
			return true
		}
	}
	return false
}

// send sends batch b as the next link of the chain.
func (c *chain) send(b *txnBatch) {
	r, t := c.r, c.r.token
	clock := r.w.opts.clock
	l := &link{batch: c.next, value: t.alloc(), evalAt: evalForeign}
	cmp := t.compareRev(t.rev)
	if n := len(c.window); n > 0 {
		cmp, l.chained = t.compareValue(c.window[n-1].value), true
	}
	l.txn = r.buildTxn(b, c.written, c.cv, cmp, l.value)
	if len(c.window) > 0 {
		c.chained = true
		if wait := r.spacing - clock.Since(c.lastSent); wait > 0 {
			clock.Sleep(wait) // let etcd take the link before it first
		}
	}
	for _, kw := range b.writes {
		c.busy[kw.key] = struct{}{}
	}
	c.busyDelete = c.busyDelete || b.hasDelete()
	c.window = append(c.window, l)
	c.next++

	ctx, cancel := r.requestCtx(true) // once sent, a Txn runs to its outcome
	txn := r.w.client.Txn(ctx).If(l.txn.compares...).Then(l.txn.writes...).Else(l.txn.reads.ops...)
	l.sent = r.now()
	c.lastSent = l.sent
	started := make(chan struct{})
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		defer cancel()
		close(started)
		resp, err := txn.Commit()
		c.results <- linkResult{l: l, resp: resp, err: err, took: clock.Since(l.sent)}
	}()
	<-started
}

// receive takes one answer and records it.
func (c *chain) receive() {
	res := <-c.results
	l, r := res.l, c.r
	r.m.txnDuration.Observe(res.took.Seconds())
	r.m.txnBytes.Observe(float64(l.txn.cost.bytes))
	switch {
	case res.err == nil:
		rev := res.resp.Header.Revision
		r.answered(rev)
		l.resp = res.resp
		if res.resp.Succeeded {
			l.state, l.rev = linkLanded, rev
		} else {
			l.state = linkFailed
		}
	case etcderr.LeaseNotFound(res.err) && r.lease != nil:
		// The worker's token lease expired (an outage longer than its TTL)
		// and took the token with it; the Txn was rejected whole.
		l.state, l.err, l.leaseGone = linkRejected, res.err, true
	default:
		if answerTooLarge(res.err, &l.txn) {
			// etcd took the Txn, and its answer was over the client's
			// receive limit (MaxCallRecvMsgSize): what its Else read is
			// lost. A landed Txn answers with little, so it failed, but
			// the worker resolves it like any lost answer.
			r.m.unknownCommit.Inc()
			l.state, l.err = linkUnknown, res.err
			return
		}
		if rej := commitRejected(r.w.client, res.err); rej != nil {
			l.state, l.err = linkRejected, rej
			if etcderr.ClientClosed(r.w.client) {
				// The Txn may have been sent: nothing can tell now.
				l.state, l.err, l.unresolvable = linkUnknown, fmt.Errorf("%w: %w", rej, ErrCommitUnresolved), true
			}
			return
		}
		r.m.unknownCommit.Inc()
		l.state, l.err = linkUnknown, res.err
		if err := r.rejectionOrOutage("commit", l.sent, res.err); err != nil {
			l.state, l.err = linkRejected, err
		}
	}
}

// answerTooLarge reports whether err is gRPC refusing, on the client, the
// answer of txn: the refused message is larger than the request can be on
// the wire (a request the server refused as too large is its own size, and
// is a rejection).
func answerTooLarge(err error, txn *commitTxn) bool {
	size, ok := etcderr.ReceivedTooLarge(err)
	return ok && size > requestBound(txn)
}

// requestBound is at least the size of txn's request on the wire: its keys
// and values as txnCost counts them (each written key three times, though
// the request holds it twice when nothing is read back), plus a generous
// protobuf framing of 64 bytes an op and 4 KiB for the rest.
func requestBound(txn *commitTxn) int64 {
	ops := len(txn.compares) + len(txn.writes) + len(txn.reads.ops)
	return int64(txn.cost.bytes) + 64*int64(ops) + 4<<10
}

// drain waits for the answer of every link in flight.
func (c *chain) drain() {
	for {
		n := 0
		for _, l := range c.window {
			if l.state == linkInFlight {
				n++
			}
		}
		if n == 0 {
			return
		}
		c.receive()
	}
}

// popLanded settles the landed links at the head of the window.
func (c *chain) popLanded() {
	for len(c.window) > 0 && c.window[0].state == linkLanded {
		l := c.window[0]
		c.window = c.window[1:]
		c.land(l, l.rev)
	}
}

// land records that link l landed at rev (0: at a revision not known).
func (c *chain) land(l *link, rev int64) {
	r, b := c.r, &c.batches[l.batch]
	for _, kw := range b.writes {
		delete(c.busy, kw.key)
	}
	if b.hasDelete() {
		c.busyDelete = false
		for _, w := range c.window {
			c.busyDelete = c.busyDelete || c.batches[w.batch].hasDelete()
		}
	}
	if rev != 0 {
		c.earlier[r.token.rev] = struct{}{}
		r.token.rev = rev
		c.written.landed(*b, r.ks.counterKey, rev)
		c.res.barrierRev = max(c.res.barrierRev, rev)
	} else {
		c.revUnknown = true
	}
	c.landedAt[l.batch] = rev
	c.landed = l.batch + 1
	r.m.commits.Inc()
	r.m.patches.Add(float64(b.groups(c.writes)))
	r.log.Debug("commit landed", zap.Int64("revision", rev), zap.Int("keys", len(l.txn.writes)),
		zap.Int("bytes", l.txn.cost.bytes))
}

// position tells where the chain stood when a read found the token as tr:
// j after the window's j-th link (0: where the window starts), evalEarlier
// before it, evalForeign where the worker never put it.
func (c *chain) position(w []*link, tr tokenRead) int {
	if tr.modRev == c.r.token.rev {
		return 0
	}
	if tr.present && tr.numeric {
		for j, l := range w {
			if l.value == tr.value {
				return j + 1
			}
		}
	}
	if _, ok := c.earlier[tr.modRev]; ok {
		return evalEarlier
	}
	return evalForeign
}

// settle finds out, once every link of the window has answered (or failed
// to), how far the chain landed: from the answers, the tokens the Else of
// failed links read, and, while the first link after that may still land,
// fences. It records what landed and reports whether the flush sends on
// (the link after them overtook the one before it and is sent again);
// otherwise c.res says what the rest waits for.
func (c *chain) settle() (more bool, err error) {
	r, t, w := c.r, c.r.token, c.window
	c.window = nil
	clear(c.busy)
	c.busyDelete = false

	// pos: how many links of w landed, as far as the answers tell; posRev:
	// the token's mod revision there.
	pos, posRev := 0, t.rev
	var lost error
	for j, l := range w {
		switch l.state {
		case linkLanded:
			if j+1 > pos {
				pos, posRev = j+1, l.rev
			}
		case linkFailed:
			if err := r.checkFencing(&l.txn, l.resp); err != nil {
				lost = err
			}
			tr := readToken(l.txn.reads.token(l.resp))
			l.evalAt = c.position(w, tr)
			if l.evalAt > pos {
				pos, posRev = l.evalAt, tr.modRev
			}
		}
	}
	// The link after pos may still land only while its outcome is unknown:
	// fence the token where the chain stands. See "Commit token fence".
	tokenRev := int64(0)
	var fences []uint64
	for pos < len(w) && w[pos].state == linkUnknown {
		if w[pos].unresolvable {
			return false, w[pos].err
		}
		value := t.alloc()
		fences = append(fences, value)
		resp, err := r.fenceToken(posRev, value)
		if err != nil {
			return false, err
		}
		if resp.Succeeded {
			tokenRev = resp.Header.Revision
			break
		}
		tr := readToken(resp.Responses[0].GetResponseRange().GetKvs())
		if p := c.position(w, tr); p > pos {
			pos, posRev = p, tr.modRev
			continue
		}
		if tr.present && tr.numeric && slices.Contains(fences, tr.value) {
			// A fence of this resolution landed; its answer was lost.
			tokenRev = tr.modRev
			break
		}
		return false, r.tokenLost()
	}

	for j, l := range w[:pos] {
		rev := l.rev
		if j == pos-1 {
			rev = posRev
		}
		if l.state != linkLanded {
			r.log.Info("unknown commit outcome resolved: landed", zap.Int64("revision", posRev))
			if j != pos-1 {
				rev = 0 // landed before posRev, exactly when is not known
			}
		}
		c.land(l, rev)
	}
	t.rev = posRev
	if tokenRev != 0 {
		t.rev = tokenRev
	}
	for _, l := range w[pos:] {
		if l.state == linkUnknown {
			// Fenced, or behind a link that never lands.
			r.log.Info("unknown commit outcome resolved: not landed", zap.Int64("revision", t.rev))
			l.state = linkDead
		}
	}
	if lost != nil {
		return false, lost
	}
	if c.revUnknown {
		// The revisions of what landed are not all known, and later Txns
		// would compare them: re-run once the state has them.
		c.res.retryAtRev = c.res.barrierRev
		return false, nil
	}
	if pos == len(w) {
		return true, nil
	}
	head := w[pos]
	c.next = head.batch
	switch head.state {
	case linkRejected:
		if !head.leaseGone {
			return false, head.err
		}
		r.log.Warn("commit token lease expired, granting a new one", zap.Error(head.err))
		r.lease.expired()
		t.rev = 0
		c.res.retryAtRev = r.view.completeRev
	case linkDead:
		c.res.retryAtRev = t.rev
	case linkFailed:
		switch head.evalAt {
		case pos: // the token was where it should be: a compare of its own failed
			c.conflict(head, w[pos:])
		case evalForeign:
			c.foreignToken(head)
		default:
			if !head.chained {
				// It compared the token's mod revision, and the token is
				// back at an earlier state of the chain (absent, after a
				// first commit): nothing of the worker's does that.
				c.foreignToken(head)
				return false, nil
			}
			// It overtook the link before it, which has landed since: send
			// it and the links behind it again (the same writes and
			// compares, chained anew), further apart.
			r.m.resends.Add(float64(len(w) - pos))
			c.overtaken = true
			r.spacing = min(2*r.spacing, maxSpacing)
			return true, nil
		}
	}
	return false, nil
}

// foreignToken records that head, the first link that did not land, found
// the token where no Txn of the worker put it. Nothing of the worker's is in
// flight any more: someone deleted or rewrote the token (a wipe of the
// prefix), or it vanished with an expired session lease (then the next Txn
// fails whole). The worker takes the token as it is, and the rest re-runs
// once the state has head's revision.
func (c *chain) foreignToken(head *link) {
	r, t := c.r, c.r.token
	t.rev = readToken(head.txn.reads.token(head.resp)).modRev
	r.log.Warn("commit token changed behind the worker's back", zap.String("key", t.key),
		zap.Int64("revision", t.rev))
	r.m.conflicts.Inc()
	c.res.retryAtRev = head.resp.Header.Revision
}

// conflict records that head, the first link that did not land, failed on a
// compare of its own: the rest of the flush re-runs, at once on what head's
// Else read where every key those groups read was read (see freshAfter),
// otherwise once the state has reached head's revision.
func (c *chain) conflict(head *link, rest []*link) {
	r := c.r
	for _, l := range rest {
		if l.state == linkFailed {
			r.m.conflicts.Inc()
		}
	}
	rev := head.resp.Header.Revision
	if f := c.freshAfter(head); f != nil {
		c.res.fresh = f
		r.log.Debug("commit conflict, re-running the patches at once on the values read back", zap.Int64("revision", rev))
		return
	}
	c.res.retryAtRev = rev
	r.log.Debug("commit conflict, re-running the patches on newer state", zap.Int64("revision", rev))
}

// freshAfter returns the values the rest of the flush re-runs on at once
// after head conflicted: what the Txns of the flush that landed wrote, and
// what head's Else read, on top of what the flush ran on. It returns nil
// when the groups must wait for the state instead: no compared key moved
// (the delete counter or a range did, and the state must show how), or a
// group reads more than the keys it names (rerunsAtOnce).
func (c *chain) freshAfter(head *link) *freshValues {
	reads, resp := &head.txn.reads, head.resp
	moved := false
	for i := range reads.keys {
		if reads.key(resp, i).modRev != reads.revs[i] {
			moved = true
			break
		}
	}
	if !moved || !rerunsAtOnce(c.groups[c.doneGroups():]) {
		return nil
	}
	f := c.cv.newerFresh()
	for i, b := range c.batches[:c.landed] {
		rev := c.landedAt[i]
		if rev == 0 {
			continue // wrote nothing
		}
		for _, kw := range b.writes {
			var e kvEntry
			if kw.value != nil {
				e = kvEntry{value: bytes.Clone(kw.value), modRev: rev}
			}
			f.set(kw.key, e, rev)
		}
		if b.hasDelete() {
			f.setCounter(rev, rev)
		}
	}
	obs := resp.Header.Revision
	for i, k := range reads.keys {
		f.set(k, reads.key(resp, i), obs)
	}
	return f
}

// doneGroups is how many groups of the flush landed or were no-ops.
func (c *chain) doneGroups() int {
	if c.landed == 0 {
		return 0
	}
	return c.batches[c.landed-1].end
}

// finish returns the flush's result.
func (c *chain) finish() flushResult {
	if c.chained && !c.overtaken {
		c.r.spacing = max(c.r.spacing-c.r.spacing/8, minSpacing)
	}
	c.res.done = c.doneGroups()
	return c.res
}
