package orchestrator

// Patch isolation: a patch never changes what another patch, a retry or a
// later flush sees, unless its change is accepted. Whatever bytes a patch
// edits in place (a SingleDataPatch's old, a value of a general DataPatch's
// valueMap, a slice another patch put there) and however its change is
// dropped (ErrEtcdIgnore, changed == false, ErrEtcdSkipGroup,
// ErrEtcdTryAgain, its group skipped by a later patch, a conflict), only
// accepted changes reach etcd, the value map and the patches after it.

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/util"
)

// isoDrop is how an editing patch drops the edit it made in place.
type isoDrop string

const (
	isoIgnore    isoDrop = "ErrEtcdIgnore"
	isoUnchanged isoDrop = "unchanged" // changed == false: SingleDataPatch only
	isoSkipGroup isoDrop = "ErrEtcdSkipGroup"
	isoTryAgain  isoDrop = "ErrEtcdTryAgain" // on its first run; ErrEtcdIgnore after
	isoSkipLater isoDrop = "skipped-later"   // reports the change; the next patch of its group skips the group
	isoAccept    isoDrop = "accepted"        // no drop: the change is written
)

// isoOutcome returns what the run-th run (from 1) of a patch dropping as d
// reports.
func isoOutcome(d isoDrop, run int) (changed bool, err error) {
	switch d {
	case isoIgnore:
		return true, ErrEtcdIgnore
	case isoUnchanged:
		return false, nil
	case isoSkipGroup:
		return true, ErrEtcdSkipGroup
	case isoTryAgain:
		if run == 1 {
			return true, ErrEtcdTryAgain
		}
		return true, ErrEtcdIgnore
	}
	return true, nil
}

// isoInputs records the values each run of a labelled patch was given.
// Patches and Tick run on Run's goroutine, which is the test's.
type isoInputs map[string][]string

func (in isoInputs) add(label string, v []byte) { in[label] = append(in[label], string(v)) }

// requireSaw checks that label ran and that every run was given want.
func (in isoInputs) requireSaw(t testing.TB, label, want string) {
	t.Helper()
	require.NotEmpty(t, in[label], "%s never ran", label)
	for i, got := range in[label] {
		require.Equal(t, want, got, "what run %d of %s was given", i+1, label)
	}
}

// isoEditGroup is a group whose patch (kind "single" or "general") edits the
// bytes of key in place with edit and then drops the edit as drop says.
func isoEditGroup(kind string, key util.EtcdKey, drop isoDrop, edit func([]byte), in isoInputs, label string) []DataPatch {
	runs := 0
	var p DataPatch = SingleDataPatch{Key: key, Func: func(old []byte) ([]byte, bool, error) {
		runs++
		in.add(label, old)
		edit(old)
		changed, err := isoOutcome(drop, runs)
		return old, changed, err
	}}
	if kind == "general" {
		p = patchFunc(func(values map[util.EtcdKey][]byte, changedSet map[util.EtcdKey]struct{}) error {
			runs++
			in.add(label, values[key])
			edit(values[key])
			changedSet[key] = struct{}{}
			_, err := isoOutcome(drop, runs)
			return err
		})
	}
	if drop == isoSkipLater {
		return []DataPatch{p, patchFunc(func(map[util.EtcdKey][]byte, map[util.EtcdKey]struct{}) error {
			return ErrEtcdSkipGroup
		})}
	}
	return []DataPatch{p}
}

func isoFirstX(v []byte) { v[0] = 'X' }
func isoIncr(v []byte)   { v[0]++ }

// isoAppend is a SingleDataPatch appending suffix to key (on a copy).
func isoAppend(key util.EtcdKey, suffix string, in isoInputs, label string) DataPatch {
	return SingleDataPatch{Key: key, Func: func(old []byte) ([]byte, bool, error) {
		in.add(label, old)
		return append(bytes.Clone(old), suffix...), true, nil
	}}
}

// isoSet is a general DataPatch setting key to value.
func isoSet(key util.EtcdKey, value string) DataPatch {
	return patchFunc(func(values map[util.EtcdKey][]byte, changedSet map[util.EtcdKey]struct{}) error {
		values[key] = []byte(value)
		changedSet[key] = struct{}{}
		return nil
	})
}

// isoCopy is a general DataPatch copying the value of from to to.
func isoCopy(from, to util.EtcdKey) DataPatch {
	return patchFunc(func(values map[util.EtcdKey][]byte, changedSet map[util.EtcdKey]struct{}) error {
		values[to] = bytes.Clone(values[from])
		changedSet[to] = struct{}{}
		return nil
	})
}

// isoStep is the marker group that ends flush n: it sets /step to n.
func isoStep(st *mapState, n int) []DataPatch {
	return []DataPatch{setPatch(st.key("/step"), []byte(strconv.Itoa(n)))}
}

// isoEditCase: a patch of kind edits /d and /k in place and drops the edit
// as drop says; with generalFirst a general DataPatch on another key runs
// first in each flush (so every later patch runs on the value map).
type isoEditCase struct {
	kind         string
	drop         isoDrop
	generalFirst bool
}

func (c isoEditCase) name() string {
	return fmt.Sprintf("%s/%s/generalFirst=%v", c.kind, c.drop, c.generalFirst)
}

func isoEditCases() []isoEditCase {
	var out []isoEditCase
	for _, kind := range []string{"single", "general"} {
		for _, drop := range []isoDrop{isoIgnore, isoUnchanged, isoSkipGroup, isoTryAgain, isoSkipLater} {
			if kind == "general" && drop == isoUnchanged {
				continue // a general patch reports a change by recording the key
			}
			for _, gf := range []bool{false, true} {
				out = append(out, isoEditCase{kind: kind, drop: drop, generalFirst: gf})
			}
		}
	}
	return out
}

// flush1 (/k = /d = "original"): the edits of /d and /k, then "!" appended
// to /k. flush2: /k and /d copied by a general patch, then "?" appended to
// both.
func (c isoEditCase) flush1(st *mapState, in isoInputs) [][]DataPatch {
	var groups [][]DataPatch
	if c.generalFirst {
		groups = append(groups, []DataPatch{isoSet(st.key("/o"), "g1")})
	}
	return append(groups,
		isoEditGroup(c.kind, st.key("/d"), c.drop, isoFirstX, in, "edit /d"),
		isoEditGroup(c.kind, st.key("/k"), c.drop, isoFirstX, in, "edit /k"),
		[]DataPatch{isoAppend(st.key("/k"), "!", in, "append /k 1")},
		isoStep(st, 1))
}

func (c isoEditCase) flush2(st *mapState, in isoInputs) [][]DataPatch {
	var groups [][]DataPatch
	if c.generalFirst {
		groups = append(groups, []DataPatch{isoSet(st.key("/o"), "g2")})
	}
	return append(groups,
		[]DataPatch{isoCopy(st.key("/k"), st.key("/kc")), isoCopy(st.key("/d"), st.key("/dc"))},
		[]DataPatch{isoAppend(st.key("/d"), "?", in, "append /d 2")},
		[]DataPatch{isoAppend(st.key("/k"), "?", in, "append /k 2")},
		isoStep(st, 2))
}

// want is every key after both flushes, by relative key.
func (c isoEditCase) want() map[string]string {
	want := map[string]string{
		"/k": "original!?", "/d": "original?", "/kc": "original!", "/dc": "original", "/step": "2",
	}
	if c.generalFirst {
		want["/o"] = "g2"
	}
	return want
}

func (c isoEditCase) requireInputs(t testing.TB, in isoInputs) {
	t.Helper()
	in.requireSaw(t, "edit /d", "original")
	in.requireSaw(t, "edit /k", "original")
	in.requireSaw(t, "append /k 1", "original")
	in.requireSaw(t, "append /d 2", "original")
	in.requireSaw(t, "append /k 2", "original!")
}

// isoPutCase: a patch of kind putter puts a slice P of its own ("put") to
// /k; a general patch then edits /k in place (its first byte incremented)
// and drops the edit as edit says; then a later group makes the flush run
// again (retry: ErrEtcdTryAgain once, or a conflict), so the putter puts P
// again.
type isoPutCase struct {
	putter       string
	edit         isoDrop
	retry        string
	generalFirst bool
}

func (c isoPutCase) name() string {
	return fmt.Sprintf("%s/%s/%s/generalFirst=%v", c.putter, c.edit, c.retry, c.generalFirst)
}

func isoPutCases(retries ...string) []isoPutCase {
	var out []isoPutCase
	for _, putter := range []string{"single", "general"} {
		for _, edit := range []isoDrop{isoIgnore, isoSkipGroup, isoAccept} {
			for _, retry := range retries {
				for _, gf := range []bool{false, true} {
					out = append(out, isoPutCase{putter: putter, edit: edit, retry: retry, generalFirst: gf})
				}
			}
		}
	}
	return out
}

// flush returns the groups and P. ext writes /z behind the worker's back
// (retry "conflict").
func (c isoPutCase) flush(st *mapState, in isoInputs, ext func(key util.EtcdKey) error) ([][]DataPatch, []byte) {
	put := []byte("put")
	k, z := st.key("/k"), st.key("/z")
	var groups [][]DataPatch
	if c.generalFirst {
		groups = append(groups, []DataPatch{isoSet(st.key("/o"), "g1")})
	}
	putter := setPatch(k, put)
	if c.putter == "general" {
		putter = patchFunc(func(values map[util.EtcdKey][]byte, changedSet map[util.EtcdKey]struct{}) error {
			values[k] = put
			changedSet[k] = struct{}{}
			return nil
		})
	}
	runs := 0
	retry := SingleDataPatch{Key: z, Func: func([]byte) ([]byte, bool, error) {
		runs++
		if runs == 1 {
			if c.retry == "conflict" {
				return []byte("z"), true, ext(z)
			}
			return nil, false, ErrEtcdTryAgain
		}
		return []byte("z"), true, nil
	}}
	return append(groups,
		[]DataPatch{putter},
		isoEditGroup("general", k, c.edit, isoIncr, in, "edit /k"),
		[]DataPatch{retry},
		isoStep(st, 1)), put
}

func (c isoPutCase) want() map[string]string {
	want := map[string]string{"/k": "put", "/z": "z", "/step": "1"}
	if c.edit == isoAccept {
		want["/k"] = "qut"
	}
	if c.generalFirst {
		want["/o"] = "g1"
	}
	return want
}

// isoRun runs a worker on prefix with a mapState: the first Tick leaves the
// groups of flushes[0], the Tick that sees /step = n those of flushes[n],
// and the one that sees the last step checks the value map and finishes.
func isoRun(ctx context.Context, t *testing.T, cli *clientv3.Client, prefix string,
	flushes ...func(st *mapState) [][]DataPatch,
) {
	t.Helper()
	var (
		w      *EtcdWorker
		mapErr error
		next   int
	)
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		want := ""
		if next > 0 {
			want = strconv.Itoa(next)
		}
		if string(st.values["/step"]) != want {
			return st, nil
		}
		if next == len(flushes) {
			mapErr = isoValueMapErr(&w.view)
			return st, ErrReactorFinished
		}
		st.patches = flushes[next](st)
		next++
		return st, nil
	})
	w = mustNewEtcdWorker(t, cli, prefix, reactor, newMapState(prefix))
	require.NoError(t, w.Run(ctx, nil, behaviourTick, t.Name()))
	require.NoError(t, mapErr)
}

// testerView is the view of a ReactorStateTester's mirror: its value map and
// committed entries.
func testerView(m *mirror) *view {
	v := &view{values: m.values}
	if m.values != nil {
		v.committed = map[util.EtcdKey]kvEntry{}
		m.each(func(k util.EtcdKey, e kvEntry) { v.committed[k] = e })
	}
	return v
}

// isoValueMapErr reports a value map of general patches (if built) that
// differs from the committed entries.
func isoValueMapErr(m *view) error {
	if m.values == nil {
		return nil
	}
	committed, live := map[string]string{}, map[string]string{}
	for k, e := range m.committed {
		committed[k.String()] = string(e.value)
	}
	for k, v := range m.values {
		live[k.String()] = string(v)
	}
	if !maps.Equal(committed, live) {
		return fmt.Errorf("value map %v, committed %v", live, committed)
	}
	return nil
}

// TestPatchDroppedEditIsInvisible: a patch that edits its input in place and
// drops the change (ErrEtcdIgnore, changed == false, ErrEtcdSkipGroup,
// ErrEtcdTryAgain, its group skipped later) changes nothing: the patches
// after it in the flush, its own retries and the next flush see the
// committed bytes, with or without a general patch earlier in the flush.
func TestPatchDroppedEditIsInvisible(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	for i, c := range isoEditCases() {
		t.Run(c.name(), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			prefix := fmt.Sprintf("/test/iso/edit-%d", i)
			mustPutKV(ctx, t, cli, prefix+"/k", "original")
			mustPutKV(ctx, t, cli, prefix+"/d", "original")
			in := isoInputs{}
			isoRun(ctx, t, cli, prefix,
				func(st *mapState) [][]DataPatch { return c.flush1(st, in) },
				func(st *mapState) [][]DataPatch { return c.flush2(st, in) })
			require.Equal(t, c.want(), etcdSnapshot(ctx, t, cli, prefix))
			c.requireInputs(t, in)
		})
	}
}

// TestPatchPutValueIsNotShared: a value a patch puts stays the patch's own.
// A later patch that edits it in place in the value map (and drops or keeps
// the edit) changes neither the slice the putter holds nor what the putter
// writes when the flush runs again (after ErrEtcdTryAgain or a conflict).
func TestPatchPutValueIsNotShared(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	for i, c := range isoPutCases("ErrEtcdTryAgain", "conflict") {
		t.Run(c.name(), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			prefix := fmt.Sprintf("/test/iso/put-%d", i)
			in := isoInputs{}
			var put []byte
			ext := func(key util.EtcdKey) error {
				_, err := cli.Put(ctx, key.String(), "ext")
				return err
			}
			isoRun(ctx, t, cli, prefix, func(st *mapState) [][]DataPatch {
				var groups [][]DataPatch
				groups, put = c.flush(st, in, ext)
				return groups
			})
			require.Equal(t, c.want(), etcdSnapshot(ctx, t, cli, prefix))
			require.Equal(t, "put", string(put), "the putter's own slice")
			in.requireSaw(t, "edit /k", "put")
			require.Len(t, in["edit /k"], 2, "the flush ran again")
		})
	}
}

// reusedBufferGroups returns one group per key, each a SingleDataPatch
// whose Func writes its value into one buffer they share and returns it:
// each call overwrites what the call before returned.
func reusedBufferGroups(prefix string, values map[string]string) [][]DataPatch {
	var buf []byte
	var groups [][]DataPatch
	for _, rel := range slices.Sorted(maps.Keys(values)) {
		v := values[rel]
		groups = append(groups, []DataPatch{SingleDataPatch{Key: util.NewEtcdKey(prefix + rel),
			Func: func([]byte) ([]byte, bool, error) {
				buf = append(buf[:0], v...)
				return buf, true, nil
			}}})
	}
	return groups
}

// TestAReturnedValueIsTheWorkersOwn: the slice a SingleDataPatch returns
// becomes the worker's: patches that reuse one buffer for what they return
// (each call overwriting the last one's bytes) still write each its own
// value, on the worker and on the ReactorStateTester. Before, every key of
// the flush got the last patch's bytes.
func TestAReturnedValueIsTheWorkersOwn(t *testing.T) {
	t.Parallel()
	want := map[string]string{"/a": "1", "/b": "22", "/c": "333"}
	t.Run("worker", func(t *testing.T) {
		t.Parallel()
		cli := sharedClient(t)
		ctx := testContext(t)
		const prefix = "/test/iso/reused-buffer"
		sent := false
		reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
			st := s.(*mapState)
			if sent {
				return st, ErrReactorFinished
			}
			st.patches, sent = reusedBufferGroups(prefix, want), true
			return st, nil
		})
		w := mustNewEtcdWorker(t, cli, prefix, reactor, newMapState(prefix))
		require.NoError(t, w.Run(ctx, nil, behaviourTick, t.Name()))
		require.Equal(t, want, etcdSnapshot(ctx, t, cli, prefix))
	})
	t.Run("tester", func(t *testing.T) {
		t.Parallel()
		st := newMapState("/iso")
		tester := NewReactorStateTester(t, st, nil)
		st.patches = reusedBufferGroups("/iso", want)
		tester.MustApplyPatches()
		require.Equal(t, isoFull("/iso", want), tester.KVEntries())
	})
}

// isoApply applies groups with tester like the worker: a flush aborted by
// ErrEtcdTryAgain runs again with the same patches.
func isoApply(t *testing.T, tester *ReactorStateTester, st *mapState, groups [][]DataPatch) {
	t.Helper()
	for range 10 {
		st.patches = groups
		tryAgain, err := tester.ApplyPatches()
		require.NoError(t, err)
		if !tryAgain {
			return
		}
	}
	t.Fatal("the flush kept asking to try again")
}

// isoFull turns relative keys into the tester's full keys under prefix.
func isoFull(prefix string, kv map[string]string) map[string]string {
	out := make(map[string]string, len(kv))
	for k, v := range kv {
		out[prefix+k] = v
	}
	return out
}

// TestReactorStateTesterDroppedEditIsInvisible is
// TestPatchDroppedEditIsInvisible on the ReactorStateTester.
func TestReactorStateTesterDroppedEditIsInvisible(t *testing.T) {
	for _, c := range isoEditCases() {
		t.Run(c.name(), func(t *testing.T) {
			st := newMapState("/iso")
			tester := NewReactorStateTester(t, st, map[string]string{"/iso/k": "original", "/iso/d": "original"})
			in := isoInputs{}
			isoApply(t, tester, st, c.flush1(st, in))
			isoApply(t, tester, st, c.flush2(st, in))
			require.Equal(t, isoFull("/iso", c.want()), tester.KVEntries())
			require.NoError(t, isoValueMapErr(testerView(tester.mirror)))
			c.requireInputs(t, in)
		})
	}
}

// TestReactorStateTesterPutValueIsNotShared is TestPatchPutValueIsNotShared
// on the ReactorStateTester; besides, the state never holds the putter's
// slice (the worker's state gets etcd's bytes).
func TestReactorStateTesterPutValueIsNotShared(t *testing.T) {
	for _, c := range isoPutCases("ErrEtcdTryAgain") {
		t.Run(c.name(), func(t *testing.T) {
			st := newMapState("/iso")
			tester := NewReactorStateTester(t, st, nil)
			in := isoInputs{}
			groups, put := c.flush(st, in, nil)
			isoApply(t, tester, st, groups)
			want := isoFull("/iso", c.want())
			require.Equal(t, want, tester.KVEntries())
			require.NoError(t, isoValueMapErr(testerView(tester.mirror)))
			require.Equal(t, "put", string(put), "the putter's own slice")
			in.requireSaw(t, "edit /k", "put")
			require.Len(t, in["edit /k"], 2, "the flush ran again")
			put[0] = 'Z' // the putter reuses its slice
			require.Equal(t, want, tester.KVEntries())
			require.Equal(t, want["/iso/k"], string(st.values["/k"]))
		})
	}
}

// TestSingleDataPatchPatchGivesACopy: called directly as a DataPatch (by a
// wrapping patch), a SingleDataPatch still gives Func a copy: an edit it
// drops leaves valueMap and changedSet alone.
func TestSingleDataPatchPatchGivesACopy(t *testing.T) {
	key := ptKey("k")
	for _, drop := range []isoDrop{isoIgnore, isoUnchanged, isoSkipGroup} {
		t.Run(string(drop), func(t *testing.T) {
			values := map[util.EtcdKey][]byte{key: []byte("original")}
			changed := map[util.EtcdKey]struct{}{}
			in := isoInputs{}
			p := isoEditGroup("single", key, drop, isoFirstX, in, "edit")[0]
			_, wantErr := isoOutcome(drop, 1)
			require.ErrorIs(t, p.Patch(values, changed), wantErr)
			require.Equal(t, "original", string(values[key]))
			require.Empty(t, changed)
			in.requireSaw(t, "edit", "original")
		})
	}
}

// TestReactorStateTesterTryAgainKeepsValueMap: a flush aborted by
// ErrEtcdTryAgain undoes what its patches changed in the value map (an
// in-place edit included) instead of dropping the map, which would cost a
// copy of the whole state at the next general patch.
func TestReactorStateTesterTryAgainKeepsValueMap(t *testing.T) {
	st := newMapState("/iso")
	tester := NewReactorStateTester(t, st, map[string]string{"/iso/k": "original"})
	in := isoInputs{}
	isoApply(t, tester, st, [][]DataPatch{
		isoEditGroup("general", st.key("/k"), isoTryAgain, isoFirstX, in, "edit /k"),
		{isoAppend(st.key("/k"), "!", in, "append /k")},
	})
	before := tester.mirror.values
	require.NotNil(t, before)
	st.patches = [][]DataPatch{isoEditGroup("general", st.key("/k"), isoTryAgain, isoFirstX, in, "edit /k again")}
	tryAgain, err := tester.ApplyPatches()
	require.NoError(t, err)
	require.True(t, tryAgain)
	require.Equal(t, fmt.Sprintf("%p", before), fmt.Sprintf("%p", tester.mirror.values), "the value map was dropped")
	require.NoError(t, isoValueMapErr(testerView(tester.mirror)))
	require.Equal(t, map[string]string{"/iso/k": "original!"}, tester.KVEntries())
	in.requireSaw(t, "edit /k", "original")
	in.requireSaw(t, "edit /k again", "original!")
}
