package orchestrator

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator/util"
)

// singleKeyFlush returns n groups of one SingleDataPatch each, on keys
// /rf/k0 .. /rf/k(n-1).
func singleKeyFlush(n int) [][]DataPatch {
	groups := make([][]DataPatch, n)
	for i := range groups {
		groups[i] = []DataPatch{SingleDataPatch{
			Key:  util.NewEtcdKey(fmt.Sprintf("/rf/k%d", i)),
			Func: func([]byte) ([]byte, bool, error) { return nil, false, nil },
		}}
	}
	return groups
}

// TestFlushReadsReusedAcrossFlushes: every flush gets the keys its patches
// name and an empty entries map, the same buffers as the flush before it
// (a flush allocates neither), except after a flush of many more keys:
// then it gets buffers of its own size.
func TestFlushReadsReusedAcrossFlushes(t *testing.T) {
	var f flushReads
	k := util.NewEtcdKey
	dep := []DataPatch{ReadDependency{Key: k("/rf/dep")}, ReadRangeDependency{Prefix: "/rf/r/"}}
	general := patchFunc(func(map[util.EtcdKey][]byte, map[util.EtcdKey]struct{}) error { return nil })

	req := f.request(append(singleKeyFlush(2), dep))
	require.Equal(t, []util.EtcdKey{k("/rf/k0"), k("/rf/k1"), k("/rf/dep")}, req.keys)
	require.False(t, req.values)
	require.NotNil(t, req.entries)
	require.Empty(t, req.entries)
	first := req.entries
	first[k("/rf/k0")] = kvEntry{value: []byte("v"), modRev: 3}

	req = f.request([][]DataPatch{{general}, singleKeyFlush(1)[0]})
	require.Equal(t, []util.EtcdKey{k("/rf/k0")}, req.keys)
	require.True(t, req.values)
	require.Empty(t, first, "the previous flush's map is emptied and given again")
	req.entries[k("/rf/k0")] = kvEntry{}
	require.Len(t, first, 1, "it is the same map")

	groups := singleKeyFlush(100)
	require.Zero(t, testing.AllocsPerRun(10, func() {
		req := f.request(groups)
		for _, key := range req.keys {
			req.entries[key] = kvEntry{}
		}
	}), "a flush like the one before it allocates nothing")

	big := f.request(singleKeyFlush(4 * flushReadsKeep)).entries
	big[k("/rf/k0")] = kvEntry{}
	req = f.request(singleKeyFlush(10))
	require.Len(t, req.keys, 10)
	require.Less(t, cap(req.keys), flushReadsKeep, "a small flush after a large one does not keep the large buffers")
	require.Empty(t, req.entries)
	require.Len(t, big, 1, "the large map is let go, not emptied")
}
