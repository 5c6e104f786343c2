package orchestrator

import (
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/util"
)

// ReadDependency is a DataPatch that writes nothing: it makes its group
// depend on Key, a key the group reads but does not necessarily write. The
// group's Txn then also requires that Key still has the mod revision it had
// in the values the group's patches ran on (absent then: absent now). When
// another writer changed, created or deleted Key in between, the Txn does not
// land and the group re-runs on newer state, like any conflict.
//
// The dependency protects what the group's patches read at commit time
// (valueMap, or a SingleDataPatch's old value), not what Tick read: decide in
// a patch of the group, and return ErrEtcdSkipGroup (or write nothing) when
// the condition does not hold. A group that writes nothing sends nothing, and
// its dependencies are not checked. Key must lie under the worker's prefix +
// "/" and outside the reserved area, or Run returns ErrKeyOutsidePrefix. See
// "Read dependencies" in docs/DESIGN.md.
type ReadDependency struct {
	Key util.EtcdKey
}

// Patch implements DataPatch: it changes nothing.
func (ReadDependency) Patch(map[util.EtcdKey][]byte, map[util.EtcdKey]struct{}) error { return nil }

// ReadRangeDependency is a DataPatch that writes nothing: it makes its group
// depend on every key that starts with Prefix (used as is: "/app/res/" covers
// "/app/res/a" but not "/app/resx"). The group's Txn then also requires that
// no key in the range was put (created or changed) after the revision of the
// snapshot the group's patches ran on; a key another writer put there makes
// the Txn fail and the group re-run on newer state.
//
// A delete inside the range is caught only when it was committed by a worker
// on the same prefix (it bumps that prefix's delete counter, which every
// commit compares); a delete by any other client is not noticed. The range is
// read by etcd for every Txn that carries the dependency, so keep it small.
// Keys of workers' bookkeeping inside the range (for a range that covers the
// reserved area) count like any other key: any commit of such a worker is a
// change. A group with a range dependency re-runs after a conflict only once
// the state has the conflicting revision: the failed Txn does not read the
// range back. Prefix must lie under the worker's prefix + "/" and not inside the
// reserved area, or Run returns ErrKeyOutsidePrefix. See ReadDependency for
// where the decision belongs, and "Read dependencies" in docs/DESIGN.md.
type ReadRangeDependency struct {
	Prefix string
}

// Patch implements DataPatch: it changes nothing.
func (ReadRangeDependency) Patch(map[util.EtcdKey][]byte, map[util.EtcdKey]struct{}) error {
	return nil
}

var (
	_ DataPatch = ReadDependency{}
	_ DataPatch = ReadRangeDependency{}
)

// groupDeps are the dependencies of one group: keys (never keys the group
// writes) and range prefixes, each once, in the order declared.
type groupDeps struct {
	keys     []util.EtcdKey
	prefixes []string
}

// addDependency records p in d when p is a dependency, and reports whether
// it was one.
func (d *groupDeps) addDependency(p DataPatch) bool {
	switch dp := p.(type) {
	case ReadDependency:
		d.addKey(dp.Key)
	case *ReadDependency:
		d.addKey(dp.Key)
	default:
		prefix, ok := rangeDependency(p)
		if !ok {
			return false
		}
		d.addPrefix(prefix)
	}
	return true
}

// rangeDependency returns the prefix of p when p is a ReadRangeDependency.
func rangeDependency(p DataPatch) (string, bool) {
	switch dp := p.(type) {
	case ReadRangeDependency:
		return dp.Prefix, true
	case *ReadRangeDependency:
		return dp.Prefix, true
	}
	return "", false
}

// rangeHolds reports whether a group of groups depends on a range that
// holds key.
func rangeHolds(groups [][]DataPatch, key string) bool {
	for _, group := range groups {
		for _, p := range group {
			if isNil(p) {
				continue
			}
			if prefix, ok := rangeDependency(p); ok && strings.HasPrefix(key, prefix) {
				return true
			}
		}
	}
	return false
}

func (d *groupDeps) addKey(k util.EtcdKey) {
	for _, have := range d.keys {
		if have == k {
			return
		}
	}
	d.keys = append(d.keys, k)
}

func (d *groupDeps) addPrefix(p string) {
	for _, have := range d.prefixes {
		if have == p {
			return
		}
	}
	d.prefixes = append(d.prefixes, p)
}

// without returns d without the keys the group writes (their write compare
// already checks them).
func (d groupDeps) without(writes groupWrites) groupDeps {
	if len(d.keys) == 0 || len(writes) == 0 {
		return d
	}
	keys := make([]util.EtcdKey, 0, len(d.keys))
	for _, k := range d.keys {
		if !writes.has(k) {
			keys = append(keys, k)
		}
	}
	d.keys = keys
	return d
}

// has reports whether g writes key.
func (g groupWrites) has(key util.EtcdKey) bool {
	for _, w := range g {
		if w.key == key {
			return true
		}
	}
	return false
}

// depCompares are the compares of the dependencies of batch b: each key
// still has the revision the patches saw (written by an earlier Txn of this
// flush, else the commit view's; 0 when absent), and no key of a range was
// put after snapRev, the revision of the snapshot the patches ran on. revs
// holds the revision each of b.depKeys is compared with. Each compare is
// added to cost.
func depCompares(b txnBatch, m *commitView, written revisions, snapRev int64, cost *txnCost) (cmps []clientv3.Cmp, revs []int64) {
	cmps = make([]clientv3.Cmp, 0, len(b.depKeys)+len(b.prefixes))
	revs = make([]int64, 0, len(b.depKeys))
	for _, k := range b.depKeys {
		key := k.String()
		rev, ok := written[key]
		if !ok {
			e, _ := m.entry(k)
			rev = e.modRev
		}
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(key), "=", rev))
		revs = append(revs, rev)
		cost.addDepKey(k)
	}
	for _, p := range b.prefixes {
		end := clientv3.GetPrefixRangeEnd(p)
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(p), "<", snapRev+1).WithRange(end))
		cost.addRange(p)
	}
	return cmps, revs
}

// rangeWritten reports whether an earlier Txn of this flush wrote a key in
// one of the ranges b depends on (tokenKey is written by every landed Txn).
// Such a key has a revision newer than the snapshot, so the range compare
// would fail; the batch waits until the state has caught up instead.
func rangeWritten(b txnBatch, written revisions, tokenKey string) bool {
	if len(b.prefixes) == 0 || len(written) == 0 {
		return false
	}
	for _, p := range b.prefixes {
		if strings.HasPrefix(tokenKey, p) {
			return true
		}
		for key := range written {
			if strings.HasPrefix(key, p) {
				return true
			}
		}
	}
	return false
}
