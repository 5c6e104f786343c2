package orchestrator

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/util"
)

// These tests prove on real etcd that the worker's txn limits match the
// server's: every group the worker accepts is accepted by a server with the
// matching limits, one key or byte more is refused before anything is sent,
// and a server with lower limits than the worker's ends Run with the same
// errors instead of a retry loop.

// limRunTimeout bounds one Run in these tests; a retry loop or a hang shows up
// as a deadline error instead of the expected one.
const limRunTimeout = 30 * time.Second

// limWorker returns a worker on prefix with a limReactor whose groups the
// caller sets before running it.
func limWorker(t testing.TB, cli *clientv3.Client, prefix string, opts ...Option) (*EtcdWorker, *limReactor) {
	t.Helper()
	r := &limReactor{}
	w := mustNewEtcdWorker(t, cli, prefix, r, newMapState(prefix), opts...)
	return w, r
}

// limKeys returns n keys under prefix + "/" + kind, all of the same length.
func limKeys(prefix, kind string, n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("%s/%s%04d", prefix, kind, i)
	}
	return keys
}

// limGet returns the visible keys under prefix (the worker's reserved area
// left out).
func limGet(t testing.TB, cli *clientv3.Client, prefix string) map[string]*mvccKV {
	t.Helper()
	kvs, _ := userKVs(testContext(t), t, cli, prefix, 0)
	return kvs
}

// limPutAll writes keys directly (not through a worker).
func limPutAll(t testing.TB, cli *clientv3.Client, keys []string, value string) {
	t.Helper()
	ctx := testContext(t)
	for _, k := range keys {
		_, err := cli.Put(ctx, k, value)
		require.NoError(t, err)
	}
}

// limGroup is one group deleting deletes, then putting value(j, k) to the
// j-th key k of puts.
func limGroup(deletes, puts []string, value func(j int, k string) []byte) []DataPatch {
	group := make([]DataPatch, 0, len(deletes)+len(puts))
	for _, k := range deletes {
		group = append(group, deletePatch(util.NewEtcdKey(k)))
	}
	for j, k := range puts {
		group = append(group, setKey(k, value(j, k)))
	}
	return group
}

// limValue is the value function of limGroup writing v to every key.
func limValue(v string) func(int, string) []byte {
	return func(int, string) []byte { return []byte(v) }
}

// limBytesGroup is a group deleting oldKeys and putting newKeys, with values
// whose sizes bring the group to l.maxBytes + over. It returns the group, the
// value sizes and the group's size as the test counts it.
func limBytesGroup(l txnLimits, oldKeys, newKeys []string, over int) (group []DataPatch, sizes []int, estimate int) {
	// Spread what the values may take over the puts.
	budget := l.maxBytes - l.overheadBytes + over
	for _, k := range oldKeys {
		budget -= writeKeyCopies * len(k)
	}
	if len(oldKeys) > 0 {
		budget -= l.deleteBytes
	}
	for _, k := range newKeys {
		budget -= writeKeyCopies * len(k)
	}
	sizes = make([]int, len(newKeys))
	for j := range sizes {
		sizes[j] = budget / len(newKeys)
	}
	sizes[0] += budget % len(newKeys)

	estimate = l.overheadBytes
	for _, k := range oldKeys {
		estimate += writeKeyCopies * len(k)
	}
	if len(oldKeys) > 0 {
		estimate += l.deleteBytes
	}
	for j, k := range newKeys {
		estimate += writeKeyCopies*len(k) + sizes[j]
	}
	group = limGroup(oldKeys, newKeys, func(j int, _ string) []byte { return bytes.Repeat([]byte{byte('a' + j%26)}, sizes[j]) })
	return group, sizes, estimate
}

// limKeysPerTxn counts the keys of each Txn that landed after rev (at most
// txns), checking that they landed in order and that no group of groupSize
// keys was split.
func limKeysPerTxn(t testing.TB, got map[string]*mvccKV, keys []string, rev int64, groupSize, txns int) []int {
	t.Helper()
	perRev := make([]int, txns)
	last := limFirstCommit(rev)
	for j, k := range keys {
		kv := got[k]
		require.Equal(t, k, string(kv.value))
		require.GreaterOrEqual(t, kv.modRev, last, "key %d landed before an earlier group", j)
		last = kv.modRev
		idx := int(kv.modRev - limFirstCommit(rev))
		require.Less(t, idx, len(perRev), "key %d at revision %d: more Txns than expected", j, kv.modRev)
		perRev[idx]++
		if j%groupSize != 0 {
			require.Equal(t, got[keys[j-1]].modRev, kv.modRev, "group %d split over two Txns", j/groupSize)
		}
	}
	return perRev
}

// limFirstCommit is the revision of the first commit of a Run that starts
// on a server at rev: the worker puts its commit token first, at rev+1 (see
// run.ensureToken).
func limFirstCommit(rev int64) int64 { return rev + 2 }

// limRequireNothingWritten checks that a failed Run left etcd as it was: the
// same visible keys, nothing in the worker's reserved area, and the same
// revision; or, when the server refused the first commit (tokenPut), two
// revisions on: the worker's commit token, put before that commit and
// removed when Run returned.
func limRequireNothingWritten(t testing.TB, srv *etcdtest.Server, cli *clientv3.Client, prefix string, rev int64,
	before map[string]*mvccKV, tokenPut bool,
) {
	t.Helper()
	want := rev
	if tokenPut {
		want = rev + 2
	}
	require.Equal(t, want, srv.Revision(), "a refused group must write nothing")
	require.Equal(t, before, limGet(t, cli, prefix))
	resp, err := cli.Get(testContext(t), prefix+reservedDir, clientv3.WithPrefix(), clientv3.WithCountOnly())
	require.NoError(t, err)
	require.Zero(t, resp.Count, "nothing may stay in the reserved area")
}

// limFencing is WithFencingKey(key, rev) when fencing, else nothing.
func limFencing(fencing bool, key string, rev int64) []Option {
	if !fencing {
		return nil
	}
	return []Option{WithFencingKey(key, rev)}
}

// limFence creates a fencing key and returns it with its create revision.
func limFence(t testing.TB, cli *clientv3.Client, key string) (string, int64) {
	t.Helper()
	resp, err := cli.Put(testContext(t), key, "owner")
	require.NoError(t, err)
	return key, resp.Header.Revision
}

// TestLimitsServerDefaultsAreTheLimits checks the premise of the tests below:
// a default server takes a Txn of exactly 128 compares and refuses 129.
func TestLimitsServerDefaultsAreTheLimits(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	ctx := testContext(t)
	cmps := func(n int) []clientv3.Cmp {
		out := make([]clientv3.Cmp, n)
		for i := range out {
			out[i] = clientv3.Compare(clientv3.ModRevision(fmt.Sprintf("/premise/%d", i)), "=", 0)
		}
		return out
	}
	_, err := cli.Txn(ctx).If(cmps(DefaultTxnMaxOps)...).Commit()
	require.NoError(t, err)
	_, err = cli.Txn(ctx).If(cmps(DefaultTxnMaxOps + 1)...).Commit()
	require.ErrorIs(t, err, rpctypes.ErrTooManyOps)
	require.ErrorIs(t, commitRejected(cli, err), ErrEtcdTxnOpsExceed)
}

// TestLimitsOpsDefaultServer: with default options on a default server, a
// group of exactly the largest size the worker accepts commits in one Txn,
// and one key more fails with ErrEtcdTxnOpsExceed writing nothing; with and
// without fencing, with and without deletes.
func TestLimitsOpsDefaultServer(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, ownServer())
	cli := env.cli
	fenceKey, fenceRev := limFence(t, cli, "/limfence/owner")
	tests := []struct {
		name           string
		fencing        bool
		deletes, puts  int
		wantMaxWrites  int // what the worker's limits allow, pinned
		wantOpsExceed  bool
		wantDeleteOnly bool
	}{
		{name: "puts at the op limit", puts: 126, wantMaxWrites: 126},
		{name: "puts one over", puts: 127, wantMaxWrites: 126, wantOpsExceed: true},
		{name: "fenced puts at the op limit", fencing: true, puts: 125, wantMaxWrites: 125},
		{name: "fenced puts one over", fencing: true, puts: 126, wantMaxWrites: 125, wantOpsExceed: true},
		{name: "deletes and puts at the op limit", deletes: 60, puts: 66, wantMaxWrites: 126},
		{name: "deletes and puts one over", deletes: 60, puts: 67, wantMaxWrites: 126, wantOpsExceed: true},
		{name: "fenced deletes and puts at the op limit", fencing: true, deletes: 60, puts: 65, wantMaxWrites: 125},
		{name: "fenced deletes and puts one over", fencing: true, deletes: 61, puts: 65, wantMaxWrites: 125, wantOpsExceed: true},
		{name: "only deletes at the op limit", deletes: 126, wantMaxWrites: 126},
		{name: "only deletes one over", deletes: 127, wantMaxWrites: 126, wantOpsExceed: true},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prefix := fmt.Sprintf("/limops/%d", i)
			w, r := limWorker(t, cli, prefix, limFencing(tt.fencing, fenceKey, fenceRev)...)
			require.Equal(t, tt.wantMaxWrites, w.limits.maxOps-w.limits.overheadOps)

			oldKeys := limKeys(prefix, "old", tt.deletes)
			limPutAll(t, cli, oldKeys, "old")
			newKeys := limKeys(prefix, "new", tt.puts)
			r.groups = [][]DataPatch{limGroup(oldKeys, newKeys, func(_ int, k string) []byte { return []byte("v-" + k) })}
			rev := env.srv.Revision()
			before := limGet(t, cli, prefix)

			err := runWithin(t, w, limRunTimeout, "limits")
			if tt.wantOpsExceed {
				require.ErrorIs(t, err, ErrEtcdTxnOpsExceed)
				require.NotErrorIs(t, err, rpctypes.ErrTooManyOps, "the worker must refuse the group, not the server")
				require.NotErrorIs(t, err, context.DeadlineExceeded)
				limRequireNothingWritten(t, env.srv, cli, prefix, rev, before, false)
				return
			}
			require.NoError(t, err)
			got := limGet(t, cli, prefix)
			require.Len(t, got, tt.puts, "deleted keys must be gone, new keys present")
			for _, k := range newKeys {
				require.Equal(t, "v-"+k, string(got[k].value))
				require.Equal(t, limFirstCommit(rev), got[k].modRev, "the whole group must land in one Txn")
			}
			if tt.deletes > 0 {
				resp, err := cli.Get(testContext(t), keysOf(prefix).counterKey)
				require.NoError(t, err)
				require.Len(t, resp.Kvs, 1)
				require.Equal(t, limFirstCommit(rev), resp.Kvs[0].ModRevision, "the delete counter moves in the same Txn")
			}
		})
	}
}

// TestLimitsBytesDefaultServer: with default options on a default server
// (--max-request-bytes 1.5 MiB), a group whose estimated size is exactly the
// default 1.25 MiB limit commits; one byte more fails with
// ErrEtcdTxnSizeExceed writing nothing. The worst case for protobuf framing,
// a group at both the op and the byte limit, commits too.
func TestLimitsBytesDefaultServer(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, ownServer())
	cli := env.cli
	fenceKey, fenceRev := limFence(t, cli, "/limfence/"+strings.Repeat("f", 300))
	tests := []struct {
		name          string
		fencing       bool
		deletes, puts int
		over          int // bytes over the limit
	}{
		{name: "four big values at the byte limit", puts: 4},
		{name: "four big values one byte over", puts: 4, over: 1},
		{name: "delete and big values at the byte limit", deletes: 1, puts: 3},
		{name: "delete and big values one byte over", deletes: 1, puts: 3, over: 1},
		{name: "fenced big values at the byte limit", fencing: true, puts: 2},
		{name: "fenced big values one byte over", fencing: true, puts: 2, over: 1},
		{name: "at both the op and the byte limit", deletes: 26, puts: 100},
		{name: "fenced at both the op and the byte limit", fencing: true, deletes: 25, puts: 100},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prefix := fmt.Sprintf("/limbytes/%d", i)
			w, r := limWorker(t, cli, prefix, limFencing(tt.fencing, fenceKey, fenceRev)...)
			l := w.limits
			require.Equal(t, DefaultTxnMaxBytes, l.maxBytes)
			require.Equal(t, 1310720, l.maxBytes, "1.25 MiB")

			oldKeys := limKeys(prefix, "old", tt.deletes)
			limPutAll(t, cli, oldKeys, "old")
			newKeys := limKeys(prefix, "new", tt.puts)

			group, sizes, estimate := limBytesGroup(l, oldKeys, newKeys, tt.over)
			require.Equal(t, l.maxBytes+tt.over, estimate, "test setup: group size")
			require.LessOrEqual(t, len(group)+l.overheadOps, l.maxOps, "test setup: group within the op limit")

			r.groups = [][]DataPatch{group}
			rev := env.srv.Revision()
			before := limGet(t, cli, prefix)
			err := runWithin(t, w, limRunTimeout, "limits")
			if tt.over > 0 {
				require.ErrorIs(t, err, ErrEtcdTxnSizeExceed)
				require.NotErrorIs(t, err, ErrEtcdTxnOpsExceed)
				require.NotErrorIs(t, err, rpctypes.ErrRequestTooLarge, "the worker must refuse the group, not the server")
				limRequireNothingWritten(t, env.srv, cli, prefix, rev, before, false)
				return
			}
			require.NoError(t, err)
			got := limGet(t, cli, prefix)
			require.Len(t, got, tt.puts)
			for j, k := range newKeys {
				require.Len(t, got[k].value, sizes[j])
				require.Equal(t, limFirstCommit(rev), got[k].modRev, "the whole group must land in one Txn")
			}
		})
	}
}

// TestLimitsMatchingServer runs a server with --max-txn-ops 16 and workers
// with the same op limit: the largest group the worker accepts commits, one
// key more is refused before anything is sent, and many small groups are
// packed into exactly as many Txns as the limit requires.
func TestLimitsMatchingServer(t *testing.T) {
	t.Parallel()
	const serverOps = 16
	env := newTestEnv(t, ownServer(etcdtest.WithMaxTxnOps(serverOps)))
	cli := env.cli
	perTxn := serverOps - 2

	t.Run("largest group", func(t *testing.T) {
		for _, n := range []int{perTxn, perTxn + 1} {
			prefix := fmt.Sprintf("/limmatch/largest%d", n)
			w, r := limWorker(t, cli, prefix, WithTxnLimits(serverOps, DefaultTxnMaxBytes))
			require.Equal(t, perTxn, w.limits.maxOps-w.limits.overheadOps)
			r.groups = [][]DataPatch{limGroup(nil, limKeys(prefix, "k", n), limValue("v"))}
			rev := env.srv.Revision()
			err := runWithin(t, w, limRunTimeout, "limits")
			if n > perTxn {
				require.ErrorIs(t, err, ErrEtcdTxnOpsExceed)
				require.NotErrorIs(t, err, rpctypes.ErrTooManyOps, "the worker must refuse the group, not the server")
				limRequireNothingWritten(t, env.srv, cli, prefix, rev, map[string]*mvccKV{}, false)
				continue
			}
			require.NoError(t, err)
			got := limGet(t, cli, prefix)
			require.Len(t, got, n)
			for _, kv := range got {
				require.Equal(t, limFirstCommit(rev), kv.modRev)
			}
		}
	})

	tests := []struct {
		name      string
		groups    int
		groupSize int
		wantTxns  []int // keys per Txn, in order
	}{
		// 100 single-key groups, 14 per Txn.
		{"single-key groups", 100, 1, []int{14, 14, 14, 14, 14, 14, 14, 2}},
		// 30 three-key groups: 4 groups (12 keys) per Txn, a fifth would
		// need 15; groups are never split.
		{"three-key groups", 30, 3, []int{12, 12, 12, 12, 12, 12, 12, 6}},
		// 10 groups of the largest size: one Txn each.
		{"largest groups", 10, perTxn, []int{14, 14, 14, 14, 14, 14, 14, 14, 14, 14}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prefix := fmt.Sprintf("/limmatch/many%d", i)
			reg := prometheus.NewRegistry()
			role := "packing"
			w, r := limWorker(t, cli, prefix, WithTxnLimits(serverOps, DefaultTxnMaxBytes), WithMetrics(reg))
			keys := limKeys(prefix, "k", tt.groups*tt.groupSize)
			for g := 0; g < tt.groups; g++ {
				r.groups = append(r.groups, limGroup(nil, keys[g*tt.groupSize:(g+1)*tt.groupSize],
					func(_ int, k string) []byte { return []byte(k) }))
			}
			rev := env.srv.Revision()
			require.NoError(t, runWithin(t, w, limRunTimeout, role))

			require.Equal(t, float64(len(tt.wantTxns)), metricValue(t, reg, "orchestrator_commits_total", role))
			require.Equal(t, float64(tt.groups), metricValue(t, reg, "orchestrator_patch_groups_applied_total", role))

			// Txns land at consecutive revisions, in group order; count the
			// keys of each.
			got := limGet(t, cli, prefix)
			require.Len(t, got, len(keys))
			perRev := limKeysPerTxn(t, got, keys, rev, tt.groupSize, len(tt.wantTxns))
			require.Equal(t, tt.wantTxns, perRev)
		})
	}
}

// limLowCase is one case of TestLimitsServerLowerThanWorker.
type limLowCase struct {
	name    string
	srv     *etcdtest.Server
	cli     *clientv3.Client
	opts    []Option
	groups  func(prefix string) [][]DataPatch
	wantErr error
	cause   error // the server's refusal, when etcd (not gRPC) refused
}

// limLowCases returns the cases of TestLimitsServerLowerThanWorker.
func limLowCases(serverOps int, ops, big *testEnv) []limLowCase {
	return []limLowCase{
		{
			name: "one group above the server's op limit", srv: ops.srv, cli: ops.cli,
			opts: []Option{WithTxnLimits(200, DefaultTxnMaxBytes)},
			groups: func(prefix string) [][]DataPatch {
				return [][]DataPatch{limGroup(nil, limKeys(prefix, "k", 20), limValue("v"))}
			},
			wantErr: ErrEtcdTxnOpsExceed,
			cause:   rpctypes.ErrTooManyOps,
		},
		{
			// The largest group a worker limited to 17 ops accepts needs
			// exactly 17: the worker's count is tight.
			name: "worker limit one above the server's", srv: ops.srv, cli: ops.cli,
			opts: []Option{WithTxnLimits(serverOps+1, DefaultTxnMaxBytes)},
			groups: func(prefix string) [][]DataPatch {
				return [][]DataPatch{limGroup(nil, limKeys(prefix, "k", serverOps+1-2), limValue("v"))}
			},
			wantErr: ErrEtcdTxnOpsExceed,
			cause:   rpctypes.ErrTooManyOps,
		},
		{
			name: "small groups packed above the server's op limit", srv: ops.srv, cli: ops.cli,
			opts: []Option{WithTxnLimits(200, DefaultTxnMaxBytes)},
			groups: func(prefix string) [][]DataPatch {
				var gs [][]DataPatch
				for _, k := range limKeys(prefix, "k", 100) {
					gs = append(gs, []DataPatch{setKey(k, []byte("v"))})
				}
				return gs
			},
			wantErr: ErrEtcdTxnOpsExceed,
			cause:   rpctypes.ErrTooManyOps,
		},
		{
			name: "group above the server's request size", srv: big.srv, cli: big.cli,
			groups: func(prefix string) [][]DataPatch {
				return [][]DataPatch{{setKey(prefix+"/big", bytes.Repeat([]byte{'x'}, 100*1024))}}
			},
			wantErr: ErrEtcdTxnSizeExceed,
			cause:   rpctypes.ErrRequestTooLarge,
		},
		{
			// Above the server's gRPC message limit (max-request-bytes +
			// 512 KiB): refused by gRPC rather than by etcd.
			name: "group above the server's gRPC message size", srv: big.srv, cli: big.cli,
			groups: func(prefix string) [][]DataPatch {
				return [][]DataPatch{{setKey(prefix+"/big", bytes.Repeat([]byte{'x'}, 700*1024))}}
			},
			wantErr: ErrEtcdTxnSizeExceed,
		},
	}
}

// TestLimitsServerLowerThanWorker: a worker whose limits are higher than the
// server's gets its Txn refused by etcd; Run must return the matching error
// promptly (not retry forever), having written nothing.
func TestLimitsServerLowerThanWorker(t *testing.T) {
	t.Parallel()
	const serverOps = 16
	const serverBytes = 64 * 1024
	tests := limLowCases(serverOps,
		newTestEnv(t, ownServer(etcdtest.WithMaxTxnOps(serverOps))),
		newTestEnv(t, ownServer(etcdtest.WithMaxRequestBytes(serverBytes))))
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prefix := fmt.Sprintf("/limlow/%d", i)
			w, r := limWorker(t, tt.cli, prefix, tt.opts...)
			r.groups = tt.groups(prefix)
			rev := tt.srv.Revision()
			start := time.Now()
			err := runWithin(t, w, limRunTimeout, "limits")
			require.ErrorIs(t, err, tt.wantErr)
			if tt.cause != nil {
				require.ErrorIs(t, err, tt.cause, "the server must be the one refusing")
			}
			require.NotErrorIs(t, err, context.DeadlineExceeded)
			require.Less(t, time.Since(start), limRunTimeout/2, "Run must fail promptly, not retry")
			limRequireNothingWritten(t, tt.srv, tt.cli, prefix, rev, map[string]*mvccKV{}, true)
		})
	}
}
