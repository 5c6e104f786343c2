package orchestrator

// The ReactorStates and the Reactor the tests drive: recordingState (every
// Update recorded, keys outside the prefix or reserved rejected), mapState
// (raw values and update counts) and stepReactor (a scripted sequence of
// stages). The shared harness is in harness_test.go.

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/etcdworker/orchestrator/util"
)

// reservedMarker is the reserved area under every prefix (API contract).
const reservedMarker = "/__orchestrator/"

// updateRecord is one ReactorState.Update call seen by a recordingState.
type updateRecord struct {
	rel    string
	value  []byte
	isInit bool
}

// recordingState is a ReactorState over the keys under one prefix, kept by
// relative key ("/a" for prefix+"/a"). It records every Update, rejects keys
// outside the prefix or in the reserved area (so a worker leaking them fails
// the test through Run's error), and queues patch groups.
type recordingState struct {
	prefix  string // normalized, no trailing "/"
	values  map[string][]byte
	log     []updateRecord
	patches [][]DataPatch
	// onUpdate, if set, runs after the update was recorded; its error is
	// Update's error.
	onUpdate func(rel string, value []byte, isInit bool) error
}

func newRecordingState(prefix string) *recordingState {
	return &recordingState{prefix: util.NormalizePrefix(prefix).String(), values: map[string][]byte{}}
}

func (s *recordingState) Update(key util.EtcdKey, value []byte, isInit bool) error {
	k := key.String()
	if strings.Contains(k, reservedMarker) {
		return fmt.Errorf("reserved key %q reached the ReactorState", k)
	}
	if !strings.HasPrefix(k, s.prefix+"/") {
		return fmt.Errorf("key %q outside prefix %q reached the ReactorState", k, s.prefix)
	}
	rel := k[len(s.prefix):]
	s.log = append(s.log, updateRecord{rel: rel, value: value, isInit: isInit})
	if value == nil {
		delete(s.values, rel)
	} else {
		s.values[rel] = value
	}
	if s.onUpdate != nil {
		return s.onUpdate(rel, value, isInit)
	}
	return nil
}

func (s *recordingState) GetPatches() [][]DataPatch {
	p := s.patches
	s.patches = nil
	return p
}

func (s *recordingState) key(rel string) util.EtcdKey { return util.NewEtcdKey(s.prefix + rel) }

// group queues one patch group.
func (s *recordingState) group(ps ...DataPatch) { s.patches = append(s.patches, ps) }

// appendTo returns a SingleDataPatch appending suffix to rel's value.
func (s *recordingState) appendTo(rel, suffix string) DataPatch {
	return SingleDataPatch{Key: s.key(rel), Func: func(old []byte) ([]byte, bool, error) {
		return append(old, suffix...), true, nil
	}}
}

func (s *recordingState) has(rel, value string) bool {
	v, ok := s.values[rel]
	return ok && string(v) == value
}

func (s *recordingState) absent(rel string) bool {
	_, ok := s.values[rel]
	return !ok
}

// updatesOf returns the recorded updates of rel, in order.
func (s *recordingState) updatesOf(rel string) []updateRecord {
	var out []updateRecord
	for _, u := range s.log {
		if u.rel == rel {
			out = append(out, u)
		}
	}
	return out
}

// step is one stage of a stepReactor. It returns advance = true when the
// stage is done (its patches, if any, are queued in st).
type step func(ctx context.Context, st *recordingState) (advance bool, err error)

// stepReactor runs steps in order, one stage per Tick until it advances.
// When the last stage advances the reactor returns ErrReactorFinished with
// the patches that stage queued. ticks counts every Tick.
type stepReactor struct {
	steps []step
	next  int
	ticks atomic.Int64
}

func newStepReactor(steps ...step) *stepReactor { return &stepReactor{steps: steps} }

func (r *stepReactor) Tick(ctx context.Context, state ReactorState) (ReactorState, error) {
	r.ticks.Add(1)
	st, ok := state.(*recordingState)
	if !ok {
		return nil, fmt.Errorf("unexpected state type %T", state)
	}
	if r.next >= len(r.steps) {
		return st, errors.New("stepReactor ticked after it finished")
	}
	advance, err := r.steps[r.next](ctx, st)
	if err != nil {
		return st, err
	}
	if advance {
		r.next++
	}
	if r.next == len(r.steps) {
		return st, ErrReactorFinished
	}
	return st, nil
}

// when returns a step that waits until cond holds, then runs act.
func when(cond func(st *recordingState) bool, act func(ctx context.Context, st *recordingState) error) step {
	return func(ctx context.Context, st *recordingState) (bool, error) {
		if !cond(st) {
			return false, nil
		}
		if act != nil {
			if err := act(ctx, st); err != nil {
				return false, err
			}
		}
		return true, nil
	}
}

func always(*recordingState) bool { return true }

// stateSnapshot converts a recordingState's values for comparison with
// etcdSnapshot.
func stateSnapshot(st *recordingState) map[string]string {
	out := map[string]string{}
	for k, v := range st.values {
		out[k] = string(v)
	}
	return out
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

// counterReactor queues one increment of /n on a mapState at every Tick and
// counts the increments queued in queued.
func counterReactor(queued *atomic.Int64) Reactor {
	return ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*mapState)
		st.patches = append(st.patches, []DataPatch{incrPatch(st.key("/n"), 1)})
		queued.Add(1)
		return st, nil
	})
}
