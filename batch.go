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
// the delete counter and the commit token (its mod revision or its value),
// puts the token and reads it back in its Else; fencing adds a compare and a
// get. The Else also reads every compared key (see commitTxn), one op per
// compare, so max(compares, then, else) is keys + 2 (+1 with fencing). It
// fails when the limits leave no room for one key.
func newTxnLimits(o *options, prefix string) (txnLimits, error) {
	ks := newKeyspace(util.NormalizePrefix(prefix))
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

// txnBatch is a run of consecutive patch groups committed in one Txn:
// groups[start:end]. writes holds the final value of every key written by the
// batch, in first-write order (a key written by two groups appears once).
// depKeys are the keys its groups depend on that it does not write, prefixes
// the ranges they depend on, each once (see ReadDependency).
type txnBatch struct {
	start, end int
	writes     []keyWrite
	depKeys    []util.EtcdKey
	prefixes   []string
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

// compares is how many compares b adds on top of the worker's own: one per
// written or depended-on key, one per range. It is the Txn's op count
// without overheadOps, as then (writes + at most 2) never exceeds it.
func (b txnBatch) compares() int { return len(b.writes) + len(b.depKeys) + len(b.prefixes) }

// writeKeyCopies is how often a written key's bytes are in its Txn: in its
// compare, its put (or delete) and its get in the Else.
const writeKeyCopies = 3

// writeSize is what one written key costs: a compare on the key, a put of
// key and value (or a delete of the key), and the get of the key in the Else.
func writeSize(w keyWrite) int { return writeKeyCopies*len(w.key.String()) + len(w.value) }

// checkGroupFits returns ErrEtcdTxnOpsExceed or ErrEtcdTxnSizeExceed when the
// group could not be committed even in a Txn of its own.
func checkGroupFits(g groupWrites, l txnLimits) error { return checkGroupFitsDeps(g, groupDeps{}, l) }

// checkGroupFitsDeps is checkGroupFits for a group with dependencies d
// (which never hold a key the group writes). A group that writes nothing
// always fits: it sends nothing.
func checkGroupFitsDeps(g groupWrites, d groupDeps, l txnLimits) error {
	if len(g) == 0 {
		return nil
	}
	ops := len(g) + len(d.keys) + len(d.prefixes) + l.overheadOps
	if ops > l.maxOps {
		return fmt.Errorf("%w: group writes %d keys, depends on %d keys and %d ranges and needs %d ops, limit %d",
			ErrEtcdTxnOpsExceed, len(g), len(d.keys), len(d.prefixes), ops, l.maxOps)
	}
	size := l.overheadBytes
	deletes := false
	for _, w := range g {
		size += writeSize(w)
		deletes = deletes || w.value == nil
	}
	for _, k := range d.keys {
		size += depKeySize(k)
	}
	for _, p := range d.prefixes {
		size += depRangeSize(p)
	}
	if deletes {
		size += l.deleteBytes
	}
	if size > l.maxBytes {
		return fmt.Errorf("%w: group needs %d bytes, limit %d", ErrEtcdTxnSizeExceed, size, l.maxBytes)
	}
	return nil
}

// packTxns is packTxnsDeps for groups without dependencies.
func packTxns(groups []groupWrites, l txnLimits) []txnBatch { return packTxnsDeps(groups, nil, l) }

// packTxnsDeps splits groups, in order, into as few Txns as the limits
// allow; deps[i] (if any) are the dependencies of groups[i]. A group is never
// split; a key written by several groups of one Txn is written once with its
// last value, and a key or range depended on is compared once (not at all
// when the Txn writes the key: its write compare checks it). Groups with no
// writes ride along in the Txn that is open when they come, without their
// dependencies. Every group must already pass checkGroupFitsDeps.
func packTxnsDeps(groups []groupWrites, deps []groupDeps, l txnLimits) []txnBatch {
	var out []txnBatch
	p := newPacker(l)
	for i, g := range groups {
		var d groupDeps
		if i < len(deps) && len(g) > 0 {
			d = deps[i]
		}
		if len(g) > 0 && len(p.cur.writes) > 0 && !p.fitsWith(g, d) {
			out = append(out, p.close())
			p.reset(i)
		}
		p.add(g, d)
		p.cur.end = i + 1
	}
	if p.cur.end > p.cur.start {
		out = append(out, p.close())
	}
	return out
}

// packer builds one txnBatch at a time.
type packer struct {
	l        txnLimits
	cur      txnBatch
	index    map[util.EtcdKey]int      // key -> position in cur.writes
	depOnly  map[util.EtcdKey]struct{} // depended on, not (yet) written
	prefixes map[string]struct{}
}

func newPacker(l txnLimits) *packer {
	return &packer{l: l, index: map[util.EtcdKey]int{}, depOnly: map[util.EtcdKey]struct{}{},
		prefixes: map[string]struct{}{}}
}

func (p *packer) reset(start int) {
	p.cur = txnBatch{start: start, end: start}
	clear(p.index)
	clear(p.depOnly)
	clear(p.prefixes)
}

// close returns the finished batch: its dependency keys are those it does
// not write.
func (p *packer) close() txnBatch {
	b := p.cur
	b.hasDelete = b.deletes > 0
	keys := b.depKeys[:0:0]
	for _, k := range b.depKeys {
		if _, ok := p.depOnly[k]; ok {
			keys = append(keys, k)
		}
	}
	b.depKeys = keys
	return b
}

// add puts group g with dependencies d into the open batch.
func (p *packer) add(g groupWrites, d groupDeps) {
	cur := &p.cur
	for _, w := range g {
		if w.value == nil {
			cur.deletes++
		}
		if pos, ok := p.index[w.key]; ok {
			if cur.writes[pos].value == nil {
				cur.deletes--
			}
			cur.bytes += len(w.value) - len(cur.writes[pos].value)
			cur.writes[pos] = w
			continue
		}
		if _, ok := p.depOnly[w.key]; ok {
			delete(p.depOnly, w.key) // its write compare replaces the dependency's
			cur.bytes -= depKeySize(w.key)
		}
		p.index[w.key] = len(cur.writes)
		cur.writes = append(cur.writes, w)
		cur.bytes += writeSize(w)
	}
	for _, k := range d.keys {
		if p.compared(k) {
			continue
		}
		p.depOnly[k] = struct{}{}
		cur.depKeys = append(cur.depKeys, k)
		cur.bytes += depKeySize(k)
	}
	for _, pre := range d.prefixes {
		if _, ok := p.prefixes[pre]; !ok {
			p.prefixes[pre] = struct{}{}
			cur.prefixes = append(cur.prefixes, pre)
			cur.bytes += depRangeSize(pre)
		}
	}
}

// compared reports whether the open batch already compares key.
func (p *packer) compared(key util.EtcdKey) bool {
	if _, ok := p.index[key]; ok {
		return true
	}
	_, ok := p.depOnly[key]
	return ok
}

// fitsWith reports whether the open batch still respects the limits with g
// and its dependencies d added.
func (p *packer) fitsWith(g groupWrites, d groupDeps) bool {
	cur := &p.cur
	compares := len(cur.writes) + len(p.depOnly) + len(p.prefixes)
	bytes := cur.bytes
	// Count the delete surcharge whenever either side deletes: an upper
	// bound that keeps the check simple and safe.
	deletes := cur.deletes > 0
	for _, w := range g { // a group writes each key once (see applyGroup)
		deletes = deletes || w.value == nil
		if pos, ok := p.index[w.key]; ok {
			bytes += len(w.value) - len(cur.writes[pos].value)
			continue
		}
		bytes += writeSize(w)
		if _, ok := p.depOnly[w.key]; ok {
			bytes -= depKeySize(w.key) // same compare, now a write's
			continue
		}
		compares++
	}
	for _, k := range d.keys { // never a key g writes (see groupDeps.without)
		if !p.compared(k) {
			compares++
			bytes += depKeySize(k)
		}
	}
	for _, pre := range d.prefixes {
		if _, ok := p.prefixes[pre]; !ok {
			compares++
			bytes += depRangeSize(pre)
		}
	}
	if compares+p.l.overheadOps > p.l.maxOps {
		return false
	}
	total := bytes + p.l.overheadBytes
	if deletes {
		total += p.l.deleteBytes
	}
	return total <= p.l.maxBytes
}

// revisions are the mod revisions the landed Txns of one flush wrote, which
// later Txns of the same flush compare against (0 for a deleted key).
type revisions map[string]int64

// landed records the revisions a landed batch produced.
func (w revisions) landed(b txnBatch, counterKey string, rev int64) {
	for _, kw := range b.writes {
		if kw.value == nil {
			w[kw.key.String()] = 0
		} else {
			w[kw.key.String()] = rev
		}
	}
	if b.hasDelete {
		w[counterKey] = rev
	}
}
