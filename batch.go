package orchestrator

import (
	"fmt"

	"github.com/etcdworker/orchestrator/util"
)

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
// the delete counter and the commit token and puts the token; fencing adds a
// compare and a get. So max(compares, then, else) is keys + 2 (+1 with
// fencing). It fails when the limits leave no room for one key.
func newTxnLimits(o *options, prefix string) (txnLimits, error) {
	counterKey := len(prefix) + len(reservedDir) + len("delete-counter")
	l := txnLimits{maxOps: o.txnMaxOps, maxBytes: o.txnMaxBytes, overheadOps: 2}
	l.overheadBytes = 3*tokenKeyLen(prefix) + tokenValueMaxLen + counterKey
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

// txnBatch is a run of consecutive patch groups committed in one Txn:
// groups[start:end]. writes holds the final value of every key written by the
// batch, in first-write order (a key written by two groups appears once).
type txnBatch struct {
	start, end int
	writes     []keyWrite
	hasDelete  bool
	bytes      int
	deletes    int // writes whose final value is a delete, while packing
}

// groups counts the groups of b that write something.
func (b txnBatch) groups(writes []groupWrites) int {
	n := 0
	for _, g := range writes[b.start:b.end] {
		if len(g) > 0 {
			n++
		}
	}
	return n
}

// writeSize is what one written key costs: a compare on the key plus a put of
// key and value (or a delete of the key).
func writeSize(w keyWrite) int { return 2*len(w.key.String()) + len(w.value) }

// checkGroupFits returns ErrEtcdTxnOpsExceed or ErrEtcdTxnSizeExceed when the
// group could not be committed even in a Txn of its own.
func checkGroupFits(g groupWrites, l txnLimits) error {
	ops := len(g) + l.overheadOps
	if ops > l.maxOps {
		return fmt.Errorf("%w: group writes %d keys and needs %d ops, limit %d", ErrEtcdTxnOpsExceed, len(g), ops, l.maxOps)
	}
	size := l.overheadBytes
	deletes := false
	for _, w := range g {
		size += writeSize(w)
		deletes = deletes || w.value == nil
	}
	if deletes {
		size += l.deleteBytes
	}
	if size > l.maxBytes {
		return fmt.Errorf("%w: group needs %d bytes, limit %d", ErrEtcdTxnSizeExceed, size, l.maxBytes)
	}
	return nil
}

// packTxns splits groups, in order, into as few Txns as the limits allow. A
// group is never split; a key written by several groups of one Txn is written
// once with its last value. Groups with no writes ride along in the Txn that
// is open when they come. Every group must already pass checkGroupFits.
func packTxns(groups []groupWrites, l txnLimits) []txnBatch {
	var out []txnBatch
	cur := txnBatch{}
	index := map[util.EtcdKey]int{} // key -> position in cur.writes
	reset := func(start int) {
		cur = txnBatch{start: start, end: start}
		clear(index)
	}
	for i, g := range groups {
		if len(g) > 0 && len(cur.writes) > 0 && !fitsWith(&cur, index, g, l) {
			out = append(out, cur)
			reset(i)
		}
		for _, w := range g {
			if w.value == nil {
				cur.deletes++
			}
			if pos, ok := index[w.key]; ok {
				if cur.writes[pos].value == nil {
					cur.deletes--
				}
				cur.bytes += len(w.value) - len(cur.writes[pos].value)
				cur.writes[pos] = w
				continue
			}
			index[w.key] = len(cur.writes)
			cur.writes = append(cur.writes, w)
			cur.bytes += writeSize(w)
		}
		cur.end = i + 1
	}
	if cur.end > cur.start {
		out = append(out, cur)
	}
	for i := range out {
		out[i].hasDelete = out[i].deletes > 0
	}
	return out
}

// fitsWith reports whether cur still respects the limits with g added.
func fitsWith(cur *txnBatch, index map[util.EtcdKey]int, g groupWrites, l txnLimits) bool {
	keys := len(cur.writes)
	bytes := cur.bytes
	// Count the delete surcharge whenever either side deletes: an upper
	// bound that keeps the check simple and safe.
	deletes := cur.deletes > 0
	for _, w := range g { // a group writes each key once (see applyGroup)
		deletes = deletes || w.value == nil
		if pos, ok := index[w.key]; ok {
			bytes += len(w.value) - len(cur.writes[pos].value)
			continue
		}
		keys++
		bytes += writeSize(w)
	}
	if keys+l.overheadOps > l.maxOps {
		return false
	}
	total := bytes + l.overheadBytes
	if deletes {
		total += l.deleteBytes
	}
	return total <= l.maxBytes
}
