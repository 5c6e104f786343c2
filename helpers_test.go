package orchestrator

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator/util"
)

// testTimeout bounds every test that talks to etcd.
const testTimeout = 60 * time.Second

func testContext(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

// mapState is a ReactorState holding raw values by key relative to a prefix,
// with a patch queue. It counts updates and checks that deletions only hit
// present keys.
type mapState struct {
	prefix  string
	values  map[string][]byte
	patches [][]DataPatch
	inits   int
	updates int
}

func newMapState(prefix string) *mapState {
	return &mapState{prefix: util.NormalizePrefix(prefix).String(), values: map[string][]byte{}}
}

func (s *mapState) Update(key util.EtcdKey, value []byte, isInit bool) error {
	rel := strings.TrimPrefix(key.String(), s.prefix)
	if isInit {
		s.inits++
	} else {
		s.updates++
	}
	if value == nil {
		delete(s.values, rel)
		return nil
	}
	s.values[rel] = value
	return nil
}

func (s *mapState) GetPatches() [][]DataPatch {
	p := s.patches
	s.patches = nil
	return p
}

func (s *mapState) key(rel string) util.EtcdKey { return util.NewEtcdKey(s.prefix + rel) }

func (s *mapState) int(rel string) int64 {
	v, ok := s.values[rel]
	if !ok {
		return 0
	}
	n, err := strconv.ParseInt(string(v), 10, 64)
	if err != nil {
		panic(err)
	}
	return n
}

// addPatch returns a SingleDataPatch adding delta to the integer at rel
// (absent = 0): a non-idempotent increment.
func (s *mapState) addPatch(rel string, delta int64) DataPatch {
	return SingleDataPatch{Key: s.key(rel), Func: func(old []byte) ([]byte, bool, error) {
		var n int64
		if old != nil {
			var err error
			if n, err = strconv.ParseInt(string(old), 10, 64); err != nil {
				return nil, false, err
			}
		}
		return []byte(strconv.FormatInt(n+delta, 10)), true, nil
	}}
}

// putPatch returns a SingleDataPatch setting rel to value (nil deletes).
func (s *mapState) putPatch(rel string, value []byte) DataPatch {
	return SingleDataPatch{Key: s.key(rel), Func: func([]byte) ([]byte, bool, error) {
		return value, true, nil
	}}
}

func mustInt(t testing.TB, b []byte) int64 {
	t.Helper()
	n, err := strconv.ParseInt(string(b), 10, 64)
	require.NoError(t, err)
	return n
}
