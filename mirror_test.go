package orchestrator

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/mvccpb"

	"github.com/etcdworker/orchestrator/util"
)

// TestMirrorApplyFiltersBookkeeping: the mirror passes user keys (an empty
// value as a non-nil empty slice, a delete as nil) and keeps every worker's
// bookkeeping out, its own delete counter moving counterRev.
func TestMirrorApplyFiltersBookkeeping(t *testing.T) {
	t.Parallel()
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

// TestMirrorWalkFindsVanishedKeys: a load walks the mirror in key order; a
// complete load reports exactly the held keys it did not find, a failed
// load reports none and leaves nothing behind for the next one.
func TestMirrorWalkFindsVanishedKeys(t *testing.T) {
	t.Parallel()
	m := newMirror(util.NormalizePrefix("/p"))
	key := func(s string) util.EtcdKey { return util.NewEtcdKey("/p/" + s) }
	load := func(complete bool, found ...string) []util.EtcdKey {
		w := m.walk()
		for _, f := range found {
			if e, ok := w.find(key(f)); !ok || e.modRev != 5 {
				m.set(keyChange{key: key(f), value: []byte(f), modRev: 5, created: !ok})
			}
		}
		return w.finish(complete)
	}
	require.Empty(t, load(true, "a", "b", "c"), "a first load finds everything")
	require.Len(t, m.base, 3, "a first load appends to the sorted base")
	require.Empty(t, m.over)

	require.ElementsMatch(t, []util.EtcdKey{key("b")}, load(true, "a", "c"))
	m.set(keyChange{key: key("b")}) // the load deletes what vanished

	require.Empty(t, load(false, "a"), "a failed load reports nothing")
	require.ElementsMatch(t, []util.EtcdKey{key("c")}, load(true, "a"),
		"after a failed load, the next load finds the vanished keys again")
	m.set(keyChange{key: key("c")})
	require.Empty(t, load(true, "a"))
	require.Equal(t, 1, m.len())
	require.ElementsMatch(t, []util.EtcdKey{key("a")}, load(true, "0", "b"),
		"a walk passes keys before, between and after the held ones")
}

// TestMirrorMatchesAModel drives the mirror with random loads, watch events
// and failed Updates, in both parts (sorted base, overlay) and across
// compactions, and checks after each step that it holds exactly what a
// plain map holds: lookups, iteration, count, and the vanished keys of every
// load.
func TestMirrorMatchesAModel(t *testing.T) {
	t.Parallel()
	for seed := range int64(4) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			t.Parallel()
			rng := rand.New(rand.NewPCG(uint64(seed), 1))
			h := &mirrorModel{t: t, m: newMirror(util.NormalizePrefix("/p")), want: map[string]kvEntry{}}
			for step := range 300 {
				before := len(h.m.over)
				switch op := rng.IntN(10); {
				case op == 0:
					h.load(rng, step)
				case op < 8:
					h.event(rng, step)
				default:
					h.failed(rng, step)
				}
				if step%5 == 0 {
					h.check()
				}
				if before > len(h.m.over) && len(h.m.over) < 300 {
					h.compactions++
				}
			}
			h.check()
			require.Positive(t, h.compactions, "the run crossed the compaction threshold")
		})
	}
}

// mirrorModel runs TestMirrorMatchesAModel: want is what the mirror must
// hold. Keys come from a small space, so puts, deletes and re-creations of
// the same keys mix; a few thousand events cross the compaction threshold.
type mirrorModel struct {
	t    *testing.T
	m    *mirror
	want map[string]kvEntry
	rev  int64
	// compactions counts the steps after which over was merged.
	compactions int
	// unsettled counts the writes to the mirror since it last settled
	// (eventsApplied, loaded): over may exceed its bound by that many.
	unsettled int
}

const mirrorModelKeys = 3000

func (h *mirrorModel) key(rng *rand.Rand) string {
	return fmt.Sprintf("/p/k%05d", rng.IntN(mirrorModelKeys))
}

// event applies a burst of watch events (puts and deletes).
func (h *mirrorModel) event(rng *rand.Rand, step int) {
	for range 1 + rng.IntN(300) {
		k := h.key(rng)
		h.rev++
		_, held := h.want[k]
		kv := &mvccpb.KeyValue{Key: []byte(k), ModRevision: h.rev}
		deleted := held && rng.IntN(3) == 0
		if !deleted {
			kv.Value = []byte(fmt.Sprint(step))
			kv.Version = 2
			if !held {
				kv.Version = 1
			}
		} else if !held {
			continue
		}
		c, ok := h.m.apply(kv, deleted)
		require.True(h.t, ok)
		h.m.set(c)
		h.unsettled++
		if deleted {
			delete(h.want, k)
		} else {
			h.want[k] = kvEntry{value: c.value, modRev: h.rev}
		}
	}
	h.m.eventsApplied(h.rev)
	h.unsettled = 0
}

// failed: the state refuses a change; the mirror keeps the key with an
// impossible revision.
func (h *mirrorModel) failed(rng *rand.Rand, step int) {
	k := h.key(rng)
	prev, held := h.want[k]
	h.unsettled++
	if held && rng.IntN(2) == 0 {
		h.m.forget(keyChange{key: util.NewEtcdKey(k)})
		h.want[k] = kvEntry{value: prev.value, modRev: unsyncedRev}
		return
	}
	v := []byte(fmt.Sprint("failed", step))
	h.m.forget(keyChange{key: util.NewEtcdKey(k), value: v, created: !held})
	h.want[k] = kvEntry{value: v, modRev: unsyncedRev}
}

// load reloads a random etcd content (some keys kept, some changed, some
// new, some gone), sometimes failing halfway, as load does.
func (h *mirrorModel) load(rng *rand.Rand, step int) {
	h.rev++
	etcd := map[string]kvEntry{}
	for k, e := range h.want {
		switch rng.IntN(4) {
		case 0: // gone
		case 1:
			etcd[k] = kvEntry{value: []byte(fmt.Sprint("load", step)), modRev: h.rev}
		default:
			if e.modRev != unsyncedRev {
				etcd[k] = e
			}
		}
	}
	for range rng.IntN(50) {
		etcd[h.key(rng)] = kvEntry{value: []byte("new"), modRev: h.rev}
	}
	keys := slices.Sorted(maps.Keys(etcd))
	complete := rng.IntN(4) != 0
	if !complete {
		keys = keys[:rng.IntN(len(keys)+1)]
	}
	w := h.m.walk()
	for _, k := range keys {
		e := etcd[k]
		prev, had := w.find(util.NewEtcdKey(k))
		if want, ok := h.want[k]; ok != had || (had && want.modRev != prev.modRev) {
			h.t.Fatalf("walk found %q = %v %v, want %v %v", k, prev, had, want, ok)
		}
		if had && prev.modRev == e.modRev {
			continue
		}
		h.m.set(keyChange{key: util.NewEtcdKey(k), value: e.value, modRev: e.modRev, created: !had})
		h.unsettled++
		h.want[k] = e
	}
	vanished := w.finish(complete)
	if !complete {
		require.Empty(h.t, vanished)
		return
	}
	var wantVanished []string
	for k := range h.want {
		if _, ok := etcd[k]; !ok {
			wantVanished = append(wantVanished, k)
		}
	}
	got := make([]string, 0, len(vanished))
	for _, k := range vanished {
		got = append(got, k.String())
		h.m.set(keyChange{key: k})
		h.unsettled++
		delete(h.want, k.String())
	}
	require.ElementsMatch(h.t, wantVanished, got)
	h.m.loaded(h.rev, nil)
	h.unsettled = 0
}

func (h *mirrorModel) check() {
	require.Equal(h.t, len(h.want), h.m.len(), "count")
	got := map[string]kvEntry{}
	dup := ""
	h.m.each(func(k util.EtcdKey, e kvEntry) {
		if _, ok := got[k.String()]; ok {
			dup = k.String()
		}
		got[k.String()] = e
	})
	require.Empty(h.t, dup, "each passes a key twice")
	if !maps.EqualFunc(h.want, got, entriesEqual) {
		require.Equal(h.t, h.want, got) // shows the difference
	}
	for k, e := range h.want {
		if g, ok := h.m.entry(util.NewEtcdKey(k)); !ok || !entriesEqual(e, g) {
			h.t.Fatalf("entry(%q) = %v %v, want %v", k, g, ok, e)
		}
	}
	_, ok := h.m.entry(util.NewEtcdKey("/p/absent"))
	require.False(h.t, ok)
	require.True(h.t, slices.IsSortedFunc(h.m.base, func(a, b baseEntry) int {
		return strings.Compare(a.key.String(), b.key.String())
	}), "base stays sorted")
	require.LessOrEqual(h.t, len(h.m.over), max(overMinCompact, len(h.m.base)/2)+h.unsettled, "over stays bounded")
}

func entriesEqual(a, b kvEntry) bool {
	return a.modRev == b.modRev && string(a.value) == string(b.value)
}
