package orchestrator

import (
	"testing"

	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/mvccpb"

	"github.com/etcdworker/orchestrator/util"
)

// TestMirrorApplyFiltersBookkeeping: the mirror passes user keys (an empty
// value as a non-nil empty slice, a delete as nil) and keeps every worker's
// bookkeeping out, its own delete counter moving counterRev.
func TestMirrorApplyFiltersBookkeeping(t *testing.T) {
	m := newMirror(util.NormalizePrefix("/r/app"))
	tests := []struct {
		key     string
		value   []byte
		deleted bool
		visible bool
		counter int64
	}{
		{"/r/app/a", []byte("1"), false, true, 0},
		{"/r/app/empty", nil, false, true, 0},
		{"/r/app/gone", nil, true, true, 0},
		{"/r/app/__orchestrator/delete-counter", nil, false, false, 7},
		{"/r/app/__orchestrator/token/0123456789abcdef", []byte("3"), false, false, 7},
		{"/r/app/b/__orchestrator/delete-counter", nil, false, false, 7},
		{"/r/app/b/c/__orchestrator/token/x", []byte("1"), false, false, 7},
		{"/r/app/__orchestratorx", []byte("1"), false, true, 7},
		{"/r/app/__orchestrator/delete-counter", nil, true, false, 0},
	}
	for _, tt := range tests {
		c, visible := m.apply(&mvccpb.KeyValue{Key: []byte(tt.key), Value: tt.value, ModRevision: 7}, tt.deleted)
		require.Equal(t, tt.visible, visible, tt.key)
		require.Equal(t, tt.counter, m.counterRev, tt.key)
		if !visible {
			continue
		}
		require.Equal(t, tt.key, c.key.String())
		if tt.deleted {
			require.Nil(t, c.value, tt.key)
		} else {
			require.NotNil(t, c.value, "%s: an empty value must be a non-nil slice", tt.key)
		}
		require.Equal(t, tt.visible, m.writable(c.key) == nil, tt.key)
	}
	require.ErrorIs(t, m.writable(util.NewEtcdKey("/r/app/b/__orchestrator/x")), ErrKeyOutsidePrefix)
	require.ErrorIs(t, m.writable(util.NewEtcdKey("/r/apple")), ErrKeyOutsidePrefix)
}

// TestMirrorSweepFindsVanishedKeys: a load marks what it finds; a complete
// load reports exactly the keys it did not find, a failed load leaves no
// stale marks for the next one, and the mark never shows in a revision.
func TestMirrorSweepFindsVanishedKeys(t *testing.T) {
	m := newMirror(util.NormalizePrefix("/p"))
	key := func(s string) util.EtcdKey { return util.NewEtcdKey("/p/" + s) }
	load := func(complete bool, found ...string) []util.EtcdKey {
		m.beginSweep()
		for _, f := range found {
			if e, ok := m.entry(key(f)); ok {
				m.visit(key(f), e)
			} else {
				m.set(keyChange{key: key(f), value: []byte(f), modRev: 5})
			}
		}
		return m.endSweep(complete, len(found))
	}
	require.Empty(t, load(true, "a", "b", "c"), "a first load finds everything")
	e, ok := m.entry(key("b"))
	require.True(t, ok)
	require.Equal(t, int64(5), e.modRev, "the sweep mark must not show in a revision")

	require.ElementsMatch(t, []util.EtcdKey{key("b")}, load(true, "a", "c"))
	m.set(keyChange{key: key("b")}) // the load deletes what vanished

	require.Empty(t, load(false, "a"), "a failed load reports nothing")
	require.ElementsMatch(t, []util.EtcdKey{key("c")}, load(true, "a"),
		"after a failed load, the next load must not take its marks for its own")
	m.set(keyChange{key: key("c")})
	require.Empty(t, load(true, "a"))
	require.Equal(t, 1, m.len())
}
