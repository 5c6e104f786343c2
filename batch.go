package orchestrator

import (
	"github.com/etcdworker/orchestrator/util"
)

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
	cost       txnCost // what the Txn of the batch costs (see txnCost)
}

// hasDelete reports whether b deletes a key: its Txn then bumps the delete
// counter.
func (b txnBatch) hasDelete() bool { return b.cost.deletes > 0 }

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

// checkGroupFits returns ErrEtcdTxnOpsExceed or ErrEtcdTxnSizeExceed when
// group g with dependencies d (which never hold a key g writes) could not be
// committed even in a Txn of its own. A group that writes nothing always
// fits: it sends nothing.
func checkGroupFits(g groupWrites, d groupDeps, l txnLimits) error {
	if len(g) == 0 {
		return nil
	}
	var alone packer // an empty Txn: the group shares nothing
	return alone.costWith(g, d).check(l)
}

// packTxns splits groups, in order, into as few Txns as the limits allow;
// deps[i] (if any) are the dependencies of groups[i] (deps may be nil). A
// group is never split; a key written by several groups of one Txn is
// written once with its last value, and a key or range depended on is
// compared once (not at all when the Txn writes the key: its write compare
// checks it). Groups with no writes ride along in the Txn that is open when
// they come, without their dependencies. Every group must already pass
// checkGroupFits.
func packTxns(groups []groupWrites, deps []groupDeps, l txnLimits) []txnBatch {
	var out []txnBatch
	p := newPacker()
	for i, g := range groups {
		var d groupDeps
		if i < len(deps) && len(g) > 0 {
			d = deps[i]
		}
		cost := p.costWith(g, d)
		if len(g) > 0 && len(p.cur.writes) > 0 && !cost.fits(l) {
			out = append(out, p.close())
			p.reset(i)
			cost = p.costWith(g, d)
		}
		p.add(g, d, cost)
		p.cur.end = i + 1
	}
	if p.cur.end > p.cur.start {
		out = append(out, p.close())
	}
	return out
}

// packer builds one txnBatch at a time.
type packer struct {
	cur      txnBatch
	index    map[util.EtcdKey]int      // key -> position in cur.writes
	depOnly  map[util.EtcdKey]struct{} // depended on, not (yet) written
	prefixes map[string]struct{}
}

func newPacker() *packer {
	return &packer{index: map[util.EtcdKey]int{}, depOnly: map[util.EtcdKey]struct{}{},
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
	keys := b.depKeys[:0:0]
	for _, k := range b.depKeys {
		if _, ok := p.depOnly[k]; ok {
			keys = append(keys, k)
		}
	}
	b.depKeys = keys
	return b
}

// costWith returns the cost of the open batch with group g and its
// dependencies d added (a group writes each key once, see applyGroup, and d
// never holds a key g writes, see groupDeps.without). It changes nothing:
// on a packer with nil maps it is the cost of g alone.
func (p *packer) costWith(g groupWrites, d groupDeps) txnCost {
	c := p.cur.cost
	for _, w := range g {
		if pos, ok := p.index[w.key]; ok {
			c.rewrite(p.cur.writes[pos], w)
		} else if _, ok := p.depOnly[w.key]; ok {
			c.writeDepKey(w)
		} else {
			c.addWrite(w)
		}
	}
	for _, k := range d.keys {
		if !p.compared(k) {
			c.addDepKey(k)
		}
	}
	for _, pre := range d.prefixes {
		if _, ok := p.prefixes[pre]; !ok {
			c.addRange(pre)
		}
	}
	return c
}

// add puts group g with dependencies d into the open batch, whose cost
// becomes cost (costWith(g, d)).
func (p *packer) add(g groupWrites, d groupDeps, cost txnCost) {
	cur := &p.cur
	cur.cost = cost
	for _, w := range g {
		if pos, ok := p.index[w.key]; ok {
			cur.writes[pos] = w
			continue
		}
		delete(p.depOnly, w.key) // a dependency's compare is now the write's
		p.index[w.key] = len(cur.writes)
		cur.writes = append(cur.writes, w)
	}
	for _, k := range d.keys {
		if p.compared(k) {
			continue
		}
		p.depOnly[k] = struct{}{}
		cur.depKeys = append(cur.depKeys, k)
	}
	for _, pre := range d.prefixes {
		if _, ok := p.prefixes[pre]; !ok {
			p.prefixes[pre] = struct{}{}
			cur.prefixes = append(cur.prefixes, pre)
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
	if b.hasDelete() {
		w[counterKey] = rev
	}
}
