package orchestrator

// The rules of key names under one prefix (keyspace): which keys a worker
// watches, sees, may write and may depend on. The bare key prefix + "/"
// (an empty relative key) is a key of the prefix for every one of them.

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator/util"
)

func TestKeyspaceRules(t *testing.T) {
	t.Parallel()
	ks := newKeyspace(util.NewEtcdPrefix("/p"))
	tests := []struct {
		key                string
		contains, visible  bool
		writable           bool
		reserved, isTheCtr bool
	}{
		{key: "/p/a", contains: true, visible: true, writable: true},
		{key: "/p/", contains: true, visible: true, writable: true},
		{key: "/p/a/b/", contains: true, visible: true, writable: true},
		{key: "/p", contains: false},
		{key: "/pa", contains: false},
		{key: "/q/a", contains: false},
		{key: "", contains: false},
		{key: "/p/__orchestrator/token/x", contains: true, reserved: true},
		{key: "/p/__orchestrator/delete-counter", contains: true, reserved: true, isTheCtr: true},
		{key: "/p/sub/__orchestrator/delete-counter", contains: true, reserved: true, isTheCtr: true},
		{key: "/p/__orchestratorx", contains: true, visible: true, writable: true},
	}
	for _, tt := range tests {
		t.Run(tt.key, func(t *testing.T) {
			require.Equal(t, tt.contains, ks.contains(tt.key), "contains")
			require.Equal(t, tt.visible, ks.visible(tt.key), "visible")
			require.Equal(t, tt.visible, InScope(util.NewEtcdPrefix("/p"), tt.key), "InScope")
			require.Equal(t, tt.writable, ks.writable(util.NewEtcdKey(tt.key)) == nil, "writable")
			require.Equal(t, tt.writable, ks.dependable(groupDeps{keys: []util.EtcdKey{util.NewEtcdKey(tt.key)}}) == nil, "dependable key")
			require.Equal(t, tt.writable, ks.dependable(groupDeps{prefixes: []string{tt.key}}) == nil, "dependable range")
			if tt.contains {
				require.Equal(t, tt.reserved, ks.isReserved([]byte(tt.key)), "reserved")
			}
			require.Equal(t, tt.isTheCtr, isCounter([]byte(tt.key)), "counter")
		})
	}
	require.Equal(t, "/p/__orchestrator/delete-counter", ks.counterKey)
	require.Len(t, ks.tokenKey("0123456789abcdef"[:tokenIDLen]), ks.tokenKeyLen())
}

// TestAPrefixInAReservedAreaIsRefused: a worker or a Source on a prefix with
// a segment __orchestrator would see the bookkeeping of a worker on a prefix
// above it, and its patches could delete that worker's delete counter, so
// NewEtcdWorker and NewSource refuse it with ErrInvalidArgument. (Before, a
// worker on parent + "/__orchestrator" got the parent's counter in its state
// and deleted it.)
func TestAPrefixInAReservedAreaIsRefused(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	for _, tt := range []struct {
		prefix  string
		refused bool
	}{
		{"/app/__orchestrator", true},
		{"/app/__orchestrator/", true},
		{"/app/__orchestrator/token", true},
		{"/__orchestrator", true},
		{"/a/__orchestrator/b/c", true},
		{"/app/__orchestratorx", false},
		{"/app/x__orchestrator", false},
		{"/app/orchestrator", false},
	} {
		t.Run(tt.prefix, func(t *testing.T) {
			_, werr := NewEtcdWorker(cli, tt.prefix, idleReactor(), newMapState(tt.prefix))
			_, serr := NewSource(cli, tt.prefix)
			if !tt.refused {
				require.NoError(t, werr)
				require.NoError(t, serr)
				return
			}
			for _, err := range []error{werr, serr} {
				require.ErrorIs(t, err, ErrInvalidArgument)
				require.Contains(t, err.Error(), util.NormalizePrefix(tt.prefix).String(), "the error names the prefix")
			}
		})
	}
}

// TestTheBarePrefixKeyIsFollowedLikeAnyOther: the key prefix + "/" is loaded,
// and its later delete reaches the state, for a lone worker and for a worker
// on a nested prefix of a shared Source (the Source's catch-up). Before, the
// load passed it on and the watch dropped its changes: the state kept a key
// etcd no longer held.
func TestTheBarePrefixKeyIsFollowedLikeAnyOther(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	for _, shared := range []bool{false, true} {
		name := map[bool]string{false: "lone worker", true: "nested worker on a Source"}[shared]
		t.Run(name, func(t *testing.T) {
			ctx := testContext(t)
			base := "/test/barekey-" + map[bool]string{false: "lone", true: "shared"}[shared]
			prefix, opts := base, []Option(nil)
			if shared {
				prefix = base + "/sub"
				opts = append(opts, WithSource(mustNewSource(t, cli, base)))
			}
			mustPutKV(ctx, t, cli, prefix+"/", "v0")
			mustPutKV(ctx, t, cli, prefix+"/a", "1")
			st := newRecordingState(prefix)
			reactor := newStepReactor(
				when(func(st *recordingState) bool { return st.has("/a", "1") }, func(ctx context.Context, st *recordingState) error {
					if !st.has("/", "v0") {
						t.Errorf("the load did not pass %q on", prefix+"/")
					}
					if _, err := cli.Delete(ctx, prefix+"/"); err != nil {
						return err
					}
					_, err := cli.Put(ctx, prefix+"/b", "2")
					return err
				}),
				when(func(st *recordingState) bool { return st.has("/b", "2") }, nil),
			)
			require.NoError(t, runWorker(ctx, t, cli, prefix, reactor, st, opts...))
			require.True(t, st.absent("/"), "the state holds %q, which etcd deleted; updates: %+v", prefix+"/", st.updatesOf("/"))
		})
	}
}

// TestAPatchMayWriteTheBarePrefixKey: a patch writes prefix + "/" (a key
// the worker may write), and the worker sees its own write: its next Tick
// comes and finds the value.
func TestAPatchMayWriteTheBarePrefixKey(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	ctx := testContext(t)
	const prefix = "/test/barekey-patch"
	st := newRecordingState(prefix)
	reactor := newStepReactor(
		when(always, func(_ context.Context, st *recordingState) error {
			st.group(setKey(prefix+"/", []byte("x")))
			return nil
		}),
		when(func(st *recordingState) bool { return st.has("/", "x") }, nil),
	)
	require.NoError(t, runWorker(ctx, t, cli, prefix, reactor, st))
	v, ok := getValue(ctx, t, cli, prefix+"/")
	require.True(t, ok)
	require.Equal(t, "x", v)
}
