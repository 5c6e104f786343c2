package orchestrator

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/util"
)

// randomCostGroups returns n groups on a pool of keys under microPrefix of
// different lengths: each writes up to four distinct keys (puts, empty
// values and deletes) and depends on up to three other keys and up to two
// ranges, so that groups of one Txn rewrite each other's keys, write keys
// others depend on and share dependencies.
func randomCostGroups(rng *rand.Rand, n int) ([]groupWrites, []groupDeps) {
	key := func() util.EtcdKey {
		i := rng.IntN(12)
		return util.NewEtcdKey(fmt.Sprintf("%s/k%0*d", microPrefix, 1+i%4, i))
	}
	ranges := []string{microPrefix + "/k", microPrefix + "/k0", microPrefix + "/k00"}
	groups, deps := make([]groupWrites, n), make([]groupDeps, n)
	for i := range groups {
		var g groupWrites
		for range rng.IntN(5) {
			k := key()
			if g.has(k) {
				continue
			}
			w := keyWrite{key: k}
			switch rng.IntN(4) {
			case 0: // a delete
			case 1:
				w.value = []byte{}
			default:
				w.value = bytes.Repeat([]byte{'v'}, rng.IntN(80))
			}
			g = append(g, w)
		}
		var d groupDeps
		for range rng.IntN(4) {
			d.addKey(key())
		}
		for range rng.IntN(3) {
			d.addPrefix(ranges[rng.IntN(len(ranges))])
		}
		groups[i], deps[i] = g, d.without(g)
	}
	return groups, deps
}

// TestTxnCostBuiltEqualsPacked: for random groups with dependencies, the
// Txn buildTxn builds for each packed batch costs exactly what the packer
// counted for the batch (the packer adds group by group, with rewrites and
// dependencies that become writes; buildTxn adds the final keys once), and
// its compares are the op count the limits were checked with. The check,
// the packing and the Txn so never disagree on what a Txn costs.
func TestTxnCostBuiltEqualsPacked(t *testing.T) {
	r := newMicroRun(t, newMapState(microPrefix), 0, benchValue)
	cv, ok, err := r.commitView(nil, nil)
	require.NoError(t, err)
	require.True(t, ok)
	rng := rand.New(rand.NewPCG(7, 11))
	for round := range 200 {
		l := r.w.limits
		l.maxOps = l.overheadOps + 1 + rng.IntN(12)
		l.maxBytes = l.overheadBytes + l.deleteBytes + 100 + rng.IntN(1500)
		groups, deps := randomFittingGroups(rng, 1+rng.IntN(30), l)
		for i, b := range packTxns(groups, deps, l) {
			msg := fmt.Sprintf("round %d, txn %d", round, i)
			require.NoError(t, b.cost.check(l), msg)
			txn := r.buildTxn(&b, revisions{}, cv, r.token.compareRev(0), 1)
			require.Equal(t, b.cost, txn.cost, msg)
			require.Len(t, txn.compares, b.cost.ops(l), msg)
		}
	}
}

// randomFittingGroups is randomCostGroups(rng, n) without the groups that
// alone do not fit l (the worker refuses those before packing).
func randomFittingGroups(rng *rand.Rand, n int, l txnLimits) ([]groupWrites, []groupDeps) {
	all, allDeps := randomCostGroups(rng, n)
	var groups []groupWrites
	var deps []groupDeps
	for i, g := range all {
		if checkGroupFits(g, allDeps[i], l) == nil {
			groups, deps = append(groups, g), append(deps, allDeps[i])
		}
	}
	return groups, deps
}

// cmpBytes and opBytes are the key, range end and value bytes of a built
// compare or op, read from clientv3's own types: an oracle that does not go
// through txnCost or txnLimits.
func cmpBytes(c clientv3.Cmp) int {
	pc := c.GetCompare()
	return len(pc.Key) + len(pc.RangeEnd) + len(pc.GetValue())
}

func opBytes(op clientv3.Op) int {
	return len(op.KeyBytes()) + len(op.RangeBytes()) + len(op.ValueBytes())
}

// TestTxnSizeCoversTheBuiltTxn: the size the limits are checked with
// (txnCost.size) is never below the key and value bytes of the Txn buildTxn
// actually builds, the worker's own compares and ops (token, delete counter,
// fencing key) included. The other byte-limit tests derive their
// expectations from the worker's own l.overheadBytes, so they cannot catch
// a wrong overhead (newTxnLimits with overheadBytes = 0 passed all of
// them).
func TestTxnSizeCoversTheBuiltTxn(t *testing.T) {
	t.Parallel()
	for _, fencing := range []bool{false, true} {
		t.Run(fmt.Sprint("fencing=", fencing), func(t *testing.T) {
			var opts []Option
			if fencing {
				opts = append(opts, WithFencingKey("/some/election/key/0123456789abcdef", 7))
			}
			st := newMapState(microPrefix)
			r := newMicroRun(t, st, 0, benchValue)
			if fencing {
				w, err := NewEtcdWorker(&clientv3.Client{}, microPrefix, idleReactor(), newMapState(microPrefix), opts...)
				require.NoError(t, err)
				r.w.opts, r.w.limits = w.opts, w.limits
			}
			cv, ok, err := r.commitView(nil, nil)
			require.NoError(t, err)
			require.True(t, ok)
			rng := rand.New(rand.NewPCG(3, 5))
			l := r.w.limits
			for round := range 100 {
				groups, deps := randomFittingGroups(rng, 1+rng.IntN(10), l)
				for i, b := range packTxns(groups, deps, l) {
					// A chained link: its token compare holds the largest value.
					txn := r.buildTxn(&b, revisions{}, cv, r.token.compareValue(^uint64(0)), ^uint64(0))
					inTxn := 0
					for _, c := range txn.compares {
						inTxn += cmpBytes(c)
					}
					for _, op := range txn.writes {
						inTxn += opBytes(op)
					}
					for _, op := range txn.reads.ops {
						inTxn += opBytes(op)
					}
					require.GreaterOrEqual(t, txn.cost.size(l), inTxn, "round %d, txn %d: the limits count fewer bytes than the Txn holds", round, i)
				}
			}
		})
	}
}
