package orchestrator

import (
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/util"
)

// The cost of a commit Txn against etcd's limits has one home: txnCost. The
// check of a group alone (checkGroupFits), the packer that fills a Txn with
// groups (packTxns) and the builder of the Txn (buildTxn, depCompares) all
// add to a txnCost and ask it whether it fits, so what is checked, what is
// packed and what is sent cannot disagree. See "Txn cost" in
// docs/DESIGN.md.

// txnLimits are the limits one commit Txn must respect, and the share of them
// the worker's own compares and ops take.
type txnLimits struct {
	maxOps   int
	maxBytes int

	// overheadOps is how many ops the worker adds to every Txn on top of one
	// per written key: max(compares, then, else) = keys + overheadOps.
	overheadOps int
	// overheadBytes is the size of the worker's own compares and ops in a
	// Txn without deletes; deleteBytes is added when the Txn deletes a key.
	overheadBytes int
	deleteBytes   int
}

// newTxnLimits returns the limits of a worker on prefix: every Txn compares
// the delete counter and the commit token (its mod revision or its value),
// puts the token and reads it back in its Else; fencing adds a compare and a
// get. The Else also reads every compared key (see commitTxn), one op per
// compare, so max(compares, then, else) is keys + 2 (+1 with fencing). It
// fails when the limits leave no room for one key.
func newTxnLimits(o *options, ks keyspace) (txnLimits, error) {
	counterKey := len(ks.counterKey)
	l := txnLimits{maxOps: o.txnMaxOps, maxBytes: o.txnMaxBytes, overheadOps: 2}
	// The token: a compare (with a value, for a chained Txn), a put and a
	// get; the counter: a compare.
	l.overheadBytes = 3*ks.tokenKeyLen() + 2*tokenValueMaxLen + counterKey
	l.deleteBytes = counterKey
	if o.hasFencing {
		l.overheadOps++
		l.overheadBytes += 2 * len(o.fencingKey)
	}
	if l.maxOps < l.overheadOps+1 {
		return l, fmt.Errorf("%w: WithTxnLimits: op limit %d leaves no room for a key (the worker needs %d)",
			ErrInvalidArgument, l.maxOps, l.overheadOps)
	}
	if l.maxBytes <= l.overheadBytes+l.deleteBytes {
		return l, fmt.Errorf("%w: WithTxnLimits: byte limit %d leaves no room for a key (the worker needs %d)",
			ErrInvalidArgument, l.maxBytes, l.overheadBytes+l.deleteBytes)
	}
	return l, nil
}

// txnCost is what the keys of one commit Txn cost, summed as they are
// added: how many keys it writes, depends on (without writing them) and
// ranges it depends on, each counted once, the bytes they take, and how
// many written keys are deleted. The worker's own share (txnLimits'
// overheads) is added by ops and size.
type txnCost struct {
	writes  int // written keys (a put or a delete each)
	depKeys int // keys depended on and not written
	ranges  int // ranges depended on
	bytes   int // keys, values and ranges, as writeSize, depKeySize and depRangeSize count them
	deletes int // written keys whose value is a delete
}

// writeKeyCopies is how often a written key's bytes are in its Txn: in its
// compare, its put (or delete) and its get in the Else.
const writeKeyCopies = 3

// writeSize is what one written key costs: a compare on the key, a put of
// key and value (or a delete of the key), and the get of the key in the Else.
func writeSize(w keyWrite) int { return writeKeyCopies*len(w.key.String()) + len(w.value) }

// depKeySize is what a dependency on one key costs: a compare on the key
// and its get in the Else.
func depKeySize(k util.EtcdKey) int { return 2 * len(k.String()) }

// depRangeSize is what a range dependency costs: a compare on the range.
func depRangeSize(prefix string) int { return len(prefix) + len(clientv3.GetPrefixRangeEnd(prefix)) }

// addWrite adds a key the Txn did not write or compare yet, written as w.
func (c *txnCost) addWrite(w keyWrite) {
	c.writes++
	c.bytes += writeSize(w)
	if w.value == nil {
		c.deletes++
	}
}

// rewrite replaces old, the write of a key the Txn writes already, with w
// (the same key): the Txn writes the key once, with its last value.
func (c *txnCost) rewrite(old, w keyWrite) {
	c.bytes += len(w.value) - len(old.value)
	if old.value == nil {
		c.deletes--
	}
	if w.value == nil {
		c.deletes++
	}
}

// writeDepKey turns a key the Txn depends on into a key it writes as w: the
// write's compare takes the place of the dependency's.
func (c *txnCost) writeDepKey(w keyWrite) {
	c.depKeys--
	c.bytes -= depKeySize(w.key)
	c.addWrite(w)
}

// addDepKey adds a dependency on key k, which the Txn neither writes nor
// compares yet.
func (c *txnCost) addDepKey(k util.EtcdKey) {
	c.depKeys++
	c.bytes += depKeySize(k)
}

// addRange adds a dependency on the range prefix, which the Txn does not
// compare yet.
func (c *txnCost) addRange(prefix string) {
	c.ranges++
	c.bytes += depRangeSize(prefix)
}

// ops is the Txn's op count: its compares (one per written or depended-on
// key, one per range) and the worker's own. The compares are the largest
// part of a Txn (its then holds writes + at most 2 ops, its Else one get per
// compared key and the worker's own), so they are its count.
func (c txnCost) ops(l txnLimits) int { return c.writes + c.depKeys + c.ranges + l.overheadOps }

// size is the Txn's size as the limits count it: its keys' bytes, the
// worker's own, and the delete counter's bump when the Txn deletes.
func (c txnCost) size(l txnLimits) int {
	size := c.bytes + l.overheadBytes
	if c.deletes > 0 {
		size += l.deleteBytes
	}
	return size
}

// fits reports whether a Txn of this cost respects l.
func (c txnCost) fits(l txnLimits) bool { return c.ops(l) <= l.maxOps && c.size(l) <= l.maxBytes }

// check returns nil when a Txn of this cost fits l, otherwise
// ErrEtcdTxnOpsExceed or ErrEtcdTxnSizeExceed (ops first) with the figures.
func (c txnCost) check(l txnLimits) error {
	if c.fits(l) {
		return nil
	}
	if ops := c.ops(l); ops > l.maxOps {
		return fmt.Errorf("%w: writes %d keys, depends on %d keys and %d ranges and needs %d ops, limit %d",
			ErrEtcdTxnOpsExceed, c.writes, c.depKeys, c.ranges, ops, l.maxOps)
	}
	return fmt.Errorf("%w: needs %d bytes, limit %d", ErrEtcdTxnSizeExceed, c.size(l), l.maxBytes)
}
