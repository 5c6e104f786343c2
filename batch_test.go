package orchestrator

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator/util"
)

// batchKey returns the test key number i; every batchKey has the same length
// (len("/b/k00000") = 9), so its cost is writeKeyCopies*9 + len(value).
func batchKey(i int) util.EtcdKey { return util.NewEtcdKey(fmt.Sprintf("/b/k%05d", i)) }

const batchKeyLen = 9

// batchPut is a write of n bytes to key i.
func batchPut(i, n int) keyWrite {
	return keyWrite{key: batchKey(i), value: bytes.Repeat([]byte{'v'}, n)}
}

// batchDel is a delete of key i.
func batchDel(i int) keyWrite { return keyWrite{key: batchKey(i)} }

// batchGroup builds a group of puts of n-byte values to keys from..to-1.
func batchGroup(from, to, n int) groupWrites {
	g := groupWrites{}
	for i := from; i < to; i++ {
		g = append(g, batchPut(i, n))
	}
	return g
}

// batchSpan is the [start, end) range of groups of one Txn.
type batchSpan [2]int

func batchSpans(out []txnBatch) []batchSpan {
	spans := make([]batchSpan, 0, len(out))
	for _, b := range out {
		spans = append(spans, batchSpan{b.start, b.end})
	}
	return spans
}

// batchCost recomputes, independently of batch.go, what writes (the final
// write of each key of a Txn) cost: ops = keys + overheadOps; bytes = Σ
// (writeKeyCopies*len(key) + len(value)) + overheadBytes (+ deleteBytes when a final write
// is a delete).
func batchCost(writes []keyWrite, l txnLimits) (ops, size int) {
	size = l.overheadBytes
	deletes := false
	for _, w := range writes {
		size += writeKeyCopies*len(w.key.String()) + len(w.value)
		if w.value == nil {
			deletes = true
		}
	}
	if deletes {
		size += l.deleteBytes
	}
	return len(writes) + l.overheadOps, size
}

// batchFinal merges groups in order: the final write of each key, in
// first-write order.
func batchFinal(groups []groupWrites) []keyWrite {
	var out []keyWrite
	index := map[util.EtcdKey]int{}
	for _, g := range groups {
		for _, w := range g {
			if pos, ok := index[w.key]; ok {
				out[pos] = w
				continue
			}
			index[w.key] = len(out)
			out = append(out, w)
		}
	}
	return out
}

// requireSameWrites checks two write lists are equal, telling a delete (nil)
// from an empty value.
func requireSameWrites(t testing.TB, want, got []keyWrite, msgAndArgs ...any) {
	t.Helper()
	require.Len(t, got, len(want), msgAndArgs...)
	for i := range want {
		require.Equal(t, want[i].key, got[i].key, msgAndArgs...)
		require.Equal(t, want[i].value == nil, got[i].value == nil, msgAndArgs...)
		require.True(t, bytes.Equal(want[i].value, got[i].value), msgAndArgs...)
	}
}

// requireValidPacking checks every property packTxns promises for groups
// (all of which pass checkGroupFits): every group in exactly one Txn, in
// order, no group split, no Txn without groups, each Txn's writes are the
// final writes of its groups in first-write order, each Txn within the
// limits, and a new Txn is opened only when the next group with writes does
// not fit the open one (counting the delete surcharge when the merged final
// writes delete, as the Txn would).
func requireValidPacking(t testing.TB, groups []groupWrites, l txnLimits, out []txnBatch) {
	t.Helper()
	if len(groups) == 0 {
		require.Empty(t, out)
		return
	}
	require.NotEmpty(t, out)
	allEmpty := true
	for _, g := range groups {
		allEmpty = allEmpty && len(g) == 0
	}
	next := 0
	for i, b := range out {
		require.Equal(t, next, b.start, "txn %d does not start where txn %d ended", i, i-1)
		require.Greater(t, b.end, b.start, "txn %d has no group", i)
		next = b.end

		final := batchFinal(groups[b.start:b.end])
		requireSameWrites(t, final, b.writes, "txn %d writes", i)
		ops, size := batchCost(final, l)
		require.LessOrEqual(t, ops, l.maxOps, "txn %d ops", i)
		require.LessOrEqual(t, size, l.maxBytes, "txn %d bytes", i)
		hasDelete := false
		sum := 0
		for _, w := range final {
			hasDelete = hasDelete || w.value == nil
			sum += writeKeyCopies*len(w.key.String()) + len(w.value)
		}
		require.Equal(t, hasDelete, b.hasDelete(), "txn %d hasDelete", i)
		require.Equal(t, sum, b.cost.bytes, "txn %d bytes field", i)
		if !allEmpty {
			require.NotEmpty(t, b.writes, "txn %d writes nothing", i)
		}

		if i == 0 {
			continue
		}
		// A Txn is only closed when the group opening the next one did not fit.
		first := groups[b.start]
		require.NotEmpty(t, first, "txn %d opened by a group with no writes", i)
		prev := out[i-1]
		merged := batchFinal(append(append([]groupWrites{}, groups[prev.start:prev.end]...), first))
		mops := len(merged) + l.overheadOps
		msize := l.overheadBytes
		for _, w := range merged {
			msize += writeKeyCopies*len(w.key.String()) + len(w.value)
		}
		// The surcharge counts when a final write of the merge deletes (a
		// delete rewritten by a put in the merge costs none).
		if hasFinalDelete(merged) {
			msize += l.deleteBytes
		}
		require.True(t, mops > l.maxOps || msize > l.maxBytes,
			"txn %d was split off although group %d fits txn %d (ops %d/%d, bytes %d/%d)",
			i, b.start, i-1, mops, l.maxOps, msize, l.maxBytes)
	}
	require.Equal(t, len(groups), next, "groups left out")
}

func hasFinalDelete(ws []keyWrite) bool {
	for _, w := range ws {
		if w.value == nil {
			return true
		}
	}
	return false
}

// batchLimits are small limits for table tests: 10 ops with 2 of overhead (8
// keys), 1000 bytes with 100 of overhead and a 10-byte delete surcharge.
var batchLimits = txnLimits{maxOps: 10, maxBytes: 1000, overheadOps: 2, overheadBytes: 100, deleteBytes: 10}

func TestBatchCheckGroupFits(t *testing.T) {
	t.Parallel()
	l := batchLimits
	keyCost := writeKeyCopies * batchKeyLen
	// room is what the values of a one-key group may take.
	room := l.maxBytes - l.overheadBytes - keyCost
	tests := []struct {
		name  string
		group groupWrites
		l     txnLimits
		want  error
	}{
		{"empty group", groupWrites{}, l, nil},
		{"nil group", nil, l, nil},
		{"one small key", groupWrites{batchPut(0, 1)}, l, nil},
		{"exactly at the op limit", batchGroup(0, l.maxOps-l.overheadOps, 1), l, nil},
		{"op limit + 1", batchGroup(0, l.maxOps-l.overheadOps+1, 1), l, ErrEtcdTxnOpsExceed},
		{"deletes count as ops", append(batchGroup(0, 4, 1), batchDel(4), batchDel(5), batchDel(6), batchDel(7), batchDel(8)), l, ErrEtcdTxnOpsExceed},
		{"exactly at the byte limit", groupWrites{batchPut(0, room)}, l, nil},
		{"byte limit + 1", groupWrites{batchPut(0, room+1)}, l, ErrEtcdTxnSizeExceed},
		{"several keys exactly at the byte limit", groupWrites{batchPut(0, room-keyCost-5), batchPut(1, 5)}, l, nil},
		{"several keys byte limit + 1", groupWrites{batchPut(0, room-keyCost-5), batchPut(1, 6)}, l, ErrEtcdTxnSizeExceed},
		{"empty value costs its key", groupWrites{batchPut(0, room), {key: batchKey(1), value: []byte{}}}, l, ErrEtcdTxnSizeExceed},
		{"delete surcharge exactly at the limit", groupWrites{batchPut(0, room-keyCost-l.deleteBytes), batchDel(1)}, l, nil},
		{"delete surcharge + 1", groupWrites{batchPut(0, room-keyCost-l.deleteBytes+1), batchDel(1)}, l, ErrEtcdTxnSizeExceed},
		{"same size without a delete fits", groupWrites{batchPut(0, room-keyCost-l.deleteBytes+1), batchPut(1, 0)}, l, nil},
		{"ops checked before bytes", batchGroup(0, 20, 1000), l, ErrEtcdTxnOpsExceed},
		{"fencing overhead leaves one key less", batchGroup(0, 8, 1), txnLimits{maxOps: 10, maxBytes: 1000, overheadOps: 3, overheadBytes: 100, deleteBytes: 10}, ErrEtcdTxnOpsExceed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := checkGroupFits(tt.group, groupDeps{}, tt.l)
			if tt.want == nil {
				require.NoError(t, err)
				ops, size := batchCost(tt.group, tt.l)
				require.LessOrEqual(t, ops, tt.l.maxOps)
				require.LessOrEqual(t, size, tt.l.maxBytes)
				return
			}
			require.ErrorIs(t, err, tt.want)
			other := ErrEtcdTxnSizeExceed
			if errors.Is(tt.want, ErrEtcdTxnSizeExceed) {
				other = ErrEtcdTxnOpsExceed
			}
			require.NotErrorIs(t, err, other)
		})
	}
}

// singleKeyGroups returns n groups of one one-byte put each.
func singleKeyGroups(n int) []groupWrites {
	gs := make([]groupWrites, n)
	for i := range gs {
		gs[i] = groupWrites{batchPut(i, 1)}
	}
	return gs
}

// packTxnsCase is one case of TestPackTxnsSplitsAtTheLimitsInOrder.
type packTxnsCase struct {
	name   string
	groups []groupWrites
	l      txnLimits
	want   []batchSpan
}

// packTxnsCases returns the cases of TestPackTxnsSplitsAtTheLimitsInOrder.
func packTxnsCases() []packTxnsCase {
	l := batchLimits
	perTxn := l.maxOps - l.overheadOps                                  // 8 keys
	room := l.maxBytes - l.overheadBytes - 2*writeKeyCopies*batchKeyLen // values of a two-key Txn
	return []packTxnsCase{
		{"no groups", nil, l, []batchSpan{}},
		{"only groups without writes", []groupWrites{{}, nil, {}}, l, []batchSpan{{0, 3}}},
		{"one group at the op limit", []groupWrites{batchGroup(0, perTxn, 1)}, l, []batchSpan{{0, 1}}},
		{
			"group at the op limit then one key", []groupWrites{batchGroup(0, perTxn, 1), {batchPut(100, 1)}},
			l, []batchSpan{{0, 1}, {1, 2}},
		},
		{
			"two halves fill one txn exactly", []groupWrites{batchGroup(0, 4, 1), batchGroup(4, 8, 1)},
			l, []batchSpan{{0, 2}},
		},
		{
			"one key over: next txn, group not split", []groupWrites{batchGroup(0, 4, 1), batchGroup(4, 7, 1), batchGroup(7, 9, 1)},
			l, []batchSpan{{0, 2}, {2, 3}},
		},
		{
			"two groups exactly at the byte limit", []groupWrites{{batchPut(0, room-40)}, {batchPut(1, 40)}},
			l, []batchSpan{{0, 2}},
		},
		{
			"byte limit + 1", []groupWrites{{batchPut(0, room-40)}, {batchPut(1, 41)}},
			l, []batchSpan{{0, 1}, {1, 2}},
		},
		{
			"huge group between small ones",
			[]groupWrites{{batchPut(0, 1)}, {batchPut(1, l.maxBytes-l.overheadBytes-writeKeyCopies*batchKeyLen)}, {batchPut(2, 1)}},
			l, []batchSpan{{0, 1}, {1, 2}, {2, 3}},
		},
		{
			"groups without writes ride along",
			[]groupWrites{{}, {batchPut(0, 1)}, {}, nil, batchGroup(1, 9, 1), {}, {}},
			l, []batchSpan{{0, 4}, {4, 7}},
		},
		{
			"rewritten keys are counted once",
			[]groupWrites{{batchPut(0, 1)}, {batchPut(0, 2)}, batchGroup(1, 8, 1), {batchPut(3, 5), batchPut(0, 3)}, {batchPut(8, 1)}},
			l, []batchSpan{{0, 4}, {4, 5}},
		},
		{
			"rewrite with a bigger value pays the difference",
			[]groupWrites{{batchPut(0, room-40)}, {batchPut(1, 40)}, {batchPut(1, 41)}},
			l, []batchSpan{{0, 2}, {2, 3}},
		},
		{
			"rewrite with a smaller value makes room",
			[]groupWrites{{batchPut(0, room-40)}, {batchPut(1, 40)}, {batchPut(0, room-50)}, {batchPut(1, 50)}},
			l, []batchSpan{{0, 4}},
		},
		{
			"same bytes without the delete surcharge share a txn",
			[]groupWrites{{batchPut(0, room-l.deleteBytes+1)}, {batchPut(1, 0)}},
			l, []batchSpan{{0, 2}},
		},
		{
			"delete surcharge exactly at the limit",
			[]groupWrites{{batchPut(0, room-l.deleteBytes)}, {batchDel(1)}},
			l, []batchSpan{{0, 2}},
		},
		{
			"delete surcharge + 1",
			[]groupWrites{{batchPut(0, room-l.deleteBytes+1)}, {batchDel(1)}},
			l, []batchSpan{{0, 1}, {1, 2}},
		},
		{
			"1000 single-key groups, 128 ops, 2 overhead",
			singleKeyGroups(1000), txnLimits{maxOps: 128, maxBytes: 1 << 20, overheadOps: 2, overheadBytes: 100, deleteBytes: 10},
			[]batchSpan{{0, 126}, {126, 252}, {252, 378}, {378, 504}, {504, 630}, {630, 756}, {756, 882}, {882, 1000}},
		},
	}
}

func TestPackTxnsSplitsAtTheLimitsInOrder(t *testing.T) {
	t.Parallel()
	tests := packTxnsCases()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, g := range tt.groups {
				require.NoError(t, checkGroupFits(g, groupDeps{}, tt.l))
			}
			out := packTxns(tt.groups, nil, tt.l)
			require.Equal(t, tt.want, batchSpans(out))
			requireValidPacking(t, tt.groups, tt.l, out)
		})
	}
}

func TestPackTxnsManyTinyGroups(t *testing.T) {
	t.Parallel()
	const n = 5000
	groups := make([]groupWrites, n)
	for i := range groups {
		groups[i] = groupWrites{batchPut(i, 2)} // 3*9 + 2 = 29 bytes each
	}
	tests := []struct {
		name string
		l    txnLimits
		want int
	}{
		{"op bound: 126 keys per txn", txnLimits{maxOps: 128, maxBytes: 1 << 20, overheadOps: 2}, (n + 125) / 126},
		{"op bound with fencing: 125 keys per txn", txnLimits{maxOps: 128, maxBytes: 1 << 20, overheadOps: 3}, (n + 124) / 125},
		// 100 + 29*k <= 1086: 34 keys per txn.
		{"byte bound: 34 keys per txn", txnLimits{maxOps: 128, maxBytes: 1086, overheadOps: 2, overheadBytes: 100}, (n + 33) / 34},
		// 100 + 29*k <= 1085: 33 keys per txn.
		{"byte bound - 1: 33 keys per txn", txnLimits{maxOps: 128, maxBytes: 1085, overheadOps: 2, overheadBytes: 100}, (n + 32) / 33},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := packTxns(groups, nil, tt.l)
			require.Len(t, out, tt.want)
			requireValidPacking(t, groups, tt.l, out)
		})
	}
}

func TestPackTxnsMergedRewrites(t *testing.T) {
	t.Parallel()
	l := txnLimits{maxOps: 4, maxBytes: 1000, overheadOps: 2} // two keys per txn
	groups := []groupWrites{
		{batchPut(0, 1)},
		{batchPut(0, 2)},
		{batchPut(1, 1)},
		{batchDel(0)},
		{batchPut(2, 1)},
		{batchPut(2, 3), batchPut(3, 1)},
	}
	out := packTxns(groups, nil, l)
	require.Equal(t, []batchSpan{{0, 4}, {4, 6}}, batchSpans(out))
	requireSameWrites(t, []keyWrite{batchDel(0), batchPut(1, 1)}, out[0].writes)
	require.True(t, out[0].hasDelete())
	require.False(t, out[1].hasDelete())
	requireSameWrites(t, []keyWrite{batchPut(2, 3), batchPut(3, 1)}, out[1].writes)
	requireValidPacking(t, groups, l, out)

	// A delete rewritten to a put in the same txn does not delete.
	groups = []groupWrites{{batchDel(0)}, {batchPut(0, 0)}}
	out = packTxns(groups, nil, l)
	require.Len(t, out, 1)
	require.False(t, out[0].hasDelete())
	require.NotNil(t, out[0].writes[0].value, "empty value must stay a put, not become a delete")
	requireValidPacking(t, groups, l, out)
}

// batchFuzzInput turns fuzz bytes into limits and groups: every group has
// distinct keys (as applyGroup produces), keys come from a small pool of
// different lengths (so later groups rewrite them), values are deletes,
// empty or up to 60 bytes.
func batchFuzzInput(data []byte) (txnLimits, []groupWrites) {
	pos := 0
	next := func() int {
		if pos >= len(data) {
			return 0
		}
		b := data[pos]
		pos++
		return int(b)
	}
	var l txnLimits
	l.overheadOps = 1 + next()%3
	l.maxOps = l.overheadOps + 1 + next()%12
	l.overheadBytes = next() % 40
	l.deleteBytes = next() % 12
	l.maxBytes = l.overheadBytes + l.deleteBytes + 1 + next()%8*40 + next()%40

	var groups []groupWrites
	for pos < len(data) {
		n := next() % 6
		g := groupWrites{}
		seen := map[int]bool{}
		for j := 0; j < n && pos < len(data); j++ {
			k := next() % 10
			if seen[k] {
				continue
			}
			seen[k] = true
			key := util.NewEtcdKey("/f/" + strings.Repeat("k", 1+k))
			switch v := next(); v % 5 {
			case 0:
				g = append(g, keyWrite{key: key})
			case 1:
				g = append(g, keyWrite{key: key, value: []byte{}})
			default:
				g = append(g, keyWrite{key: key, value: bytes.Repeat([]byte{byte('a' + k)}, v%61)})
			}
		}
		groups = append(groups, g)
	}
	return l, groups
}

func FuzzBatch(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{0, 0, 0, 0, 0, 0})
	f.Add([]byte{1, 5, 20, 3, 7, 9, 1, 3, 10, 2, 20, 4, 40, 0, 3, 1, 1, 2, 2, 3, 3})
	f.Add([]byte{2, 11, 39, 11, 7, 39, 5, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9})
	f.Add([]byte{0, 3, 10, 5, 1, 20, 2, 1, 5, 2, 60, 2, 1, 0, 2, 1, 1, 0, 3, 4, 60, 5, 60, 6, 60})
	f.Add(bytes.Repeat([]byte{1, 7, 250}, 200))
	f.Add([]byte("the quick brown fox jumps over the lazy dog, repeatedly rewriting keys"))
	// Pseudo-random shapes, the same on every run.
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 32; i++ {
		seed := make([]byte, 16+rng.IntN(400))
		for j := range seed {
			seed[j] = byte(rng.UintN(256))
		}
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 4096 {
			return
		}
		l, all := batchFuzzInput(data)
		var groups []groupWrites
		for _, g := range all {
			ops, size := batchCost(g, l)
			err := checkGroupFits(g, groupDeps{}, l)
			switch {
			case ops > l.maxOps:
				require.ErrorIs(t, err, ErrEtcdTxnOpsExceed)
			case size > l.maxBytes:
				require.ErrorIs(t, err, ErrEtcdTxnSizeExceed)
			default:
				require.NoError(t, err)
				groups = append(groups, g)
			}
		}
		requireValidPacking(t, groups, l, packTxns(groups, nil, l))
	})
}
