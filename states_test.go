package orchestrator

// The ReactorStates and the Reactor the tests drive: recordingState (every
// Update recorded, keys outside the prefix or reserved rejected, and one
// key on demand; on the empty prefix its relative keys are the full keys,
// as the ReactorStateTester tests use it), mapState (raw values and update
// counts; also the plain map state the benchmarks measure) and
// sizedMapState (a mapState that is a SizedState), and stepReactor (a
// scripted sequence of stages). The shared harness is in harness_test.go.

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/etcdworker/orchestrator/util"
)

// patchQueue is the patch queue of the test states that embed it: the
// groups a Tick queues in patches, handed to the worker (and cleared) by
// GetPatches.
type patchQueue struct{ patches [][]DataPatch }

// GetPatches returns the queued groups and empties the queue.
func (q *patchQueue) GetPatches() [][]DataPatch {
	p := q.patches
	q.patches = nil
	return p
}

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
	patchQueue
	prefix string // normalized, no trailing "/"
	values map[string][]byte
	log    []updateRecord
	// onUpdate, if set, runs after the update was recorded; its error is
	// Update's error.
	onUpdate func(rel string, value []byte, isInit bool) error
	// failKey, if set, is a relative key whose Updates are recorded in log,
	// then rejected with errUpdateRejected, leaving values as they were.
	failKey string
}

// errUpdateRejected is the error of a recordingState's Update of failKey.
var errUpdateRejected = errors.New("test state: update rejected")

// newRecordingState returns an empty recordingState over prefix ("" for
// full keys as relative keys).
func newRecordingState(prefix string) *recordingState {
	return &recordingState{prefix: util.NormalizePrefix(prefix).String(), values: map[string][]byte{}}
}

func (s *recordingState) Update(key util.EtcdKey, value []byte, isInit bool) error {
	k := key.String()
	if strings.Contains(k, reservedDir) {
		return fmt.Errorf("reserved key %q reached the ReactorState", k)
	}
	if !strings.HasPrefix(k, s.prefix+"/") {
		return fmt.Errorf("key %q outside prefix %q reached the ReactorState", k, s.prefix)
	}
	rel := k[len(s.prefix):]
	s.log = append(s.log, updateRecord{rel: rel, value: value, isInit: isInit})
	if s.failKey != "" && rel == s.failKey {
		return fmt.Errorf("%w: %s", errUpdateRejected, k)
	}
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

// stringValues converts a test state's values for comparison with
// etcdSnapshot.
func stringValues(values map[string][]byte) map[string]string {
	out := make(map[string]string, len(values))
	for k, v := range values {
		out[k] = string(v)
	}
	return out
}

// mapState is a ReactorState holding raw values by key relative to a prefix,
// with a patch queue, and counting its initial and later updates. It is
// also the plain map state a user would write that the benchmarks measure:
// its relative key is a substring of the key the worker gives, so it holds
// no copy of it, and the counts cost next to nothing.
type mapState struct {
	patchQueue
	prefix  string
	values  map[string][]byte
	inits   int
	updates int
}

// newMapState returns an empty mapState over prefix.
func newMapState(prefix string) *mapState {
	return &mapState{prefix: util.NormalizePrefix(prefix).String(), values: map[string][]byte{}}
}

// sizedMapState is a mapState that is also a SizedState: told how many keys
// a load brings, its empty map is made with room for them. The benchmarks
// compare it with a plain mapState. It is a type of its own, not an option
// of mapState, so that the other tests' states are not SizedStates.
type sizedMapState struct{ *mapState }

// ExpectKeys makes the state's map with room for n keys if it is empty.
func (s sizedMapState) ExpectKeys(n int) {
	if len(s.values) == 0 {
		s.values = make(map[string][]byte, n)
	}
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

// rdState is a ReactorState that keeps nothing but a patch queue: the
// read-dependency tests decide in their patches, on the values they are
// given at commit time, and BenchmarkSource measures the worker's own
// memory with it.
type rdState struct{ patchQueue }

func (s *rdState) Update(util.EtcdKey, []byte, bool) error { return nil }

// tickSnapshotter is a reactor that publishes a copy of the state each Tick
// sees, for another goroutine to compare with etcd.
type tickSnapshotter struct {
	mu   sync.Mutex
	last map[string]string
}

func (s *tickSnapshotter) Tick(_ context.Context, st ReactorState) (ReactorState, error) {
	snap := stringValues(st.(*recordingState).values)
	s.mu.Lock()
	s.last = snap
	s.mu.Unlock()
	return st, nil
}

func (s *tickSnapshotter) equals(want map[string]string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return fmt.Sprint(s.last) == fmt.Sprint(want)
}

// finishAtOnce is a reactor that ends Run at its first Tick, after a load.
var finishAtOnce = ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
	return s, ErrReactorFinished
})

// logReactor publishes, at every Tick, the state's values and the updates it
// has seen so far, for the test goroutine to inspect.
type logReactor struct {
	mu     sync.Mutex
	values map[string]string
	log    []updateRecord
	// act, if set, runs at every Tick in the worker's goroutine.
	act func(st *recordingState)
}

func (r *logReactor) Tick(_ context.Context, s ReactorState) (ReactorState, error) {
	st := s.(*recordingState)
	r.mu.Lock()
	r.values = stringValues(st.values)
	r.log = append([]updateRecord(nil), st.log...)
	act := r.act
	r.mu.Unlock()
	if act != nil {
		act(st)
	}
	return st, nil
}

func (r *logReactor) snapshot() (map[string]string, []updateRecord) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.values, r.log
}

func (r *logReactor) equals(want map[string]string) bool {
	got, _ := r.snapshot()
	return fmt.Sprint(got) == fmt.Sprint(want)
}

// retainingState is a SizedState that keeps every key string and value slice
// it was given by Update (as given: no copy), next to a copy made at the time
// of the call.
type retainingState struct {
	*recordingState
	mu       sync.Mutex
	given    []retained
	expected []int // n of each ExpectKeys
}

type retained struct {
	key      util.EtcdKey
	keyCopy  string
	value    []byte
	valueCpy string
}

func (s *retainingState) Update(key util.EtcdKey, value []byte, isInit bool) error {
	s.mu.Lock()
	r := retained{key: key, keyCopy: strings.Clone(key.String())}
	if value != nil {
		r.value, r.valueCpy = value, string(value)
	}
	s.given = append(s.given, r)
	s.mu.Unlock()
	return s.recordingState.Update(key, value, isInit)
}

func (s *retainingState) GetPatches() [][]DataPatch {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.recordingState.GetPatches()
}

func (s *retainingState) ExpectKeys(n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.expected = append(s.expected, n)
}

// corrupted returns the retained keys or values that no longer read as they
// did when Update got them.
func (s *retainingState) corrupted() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var bad []string
	for _, r := range s.given {
		if r.key.String() != r.keyCopy {
			bad = append(bad, fmt.Sprintf("key %q became %q", r.keyCopy, r.key.String()))
		}
		if r.value != nil && string(r.value) != r.valueCpy {
			bad = append(bad, fmt.Sprintf("value of %q: %q became %q", r.keyCopy, r.valueCpy, r.value))
		}
	}
	return bad
}

type retainingSnapshotter struct{ tickSnapshotter }

func (r *retainingSnapshotter) Tick(ctx context.Context, st ReactorState) (ReactorState, error) {
	s := st.(*retainingState)
	s.mu.Lock()
	defer s.mu.Unlock()
	_, err := r.tickSnapshotter.Tick(ctx, s.recordingState)
	return st, err
}

// sizedRecordingState is a recordingState that records its ExpectKeys calls
// and how many Updates it had seen at each.
type sizedRecordingState struct {
	*recordingState
	mu       sync.Mutex
	expected []int // n of each ExpectKeys call
	updates  []int // len(log) at each call
	panics   bool
}

func (s *sizedRecordingState) ExpectKeys(n int) {
	if s.panics {
		panic("ExpectKeys exploded")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.expected = append(s.expected, n)
	s.updates = append(s.updates, len(s.log))
}

func (s *sizedRecordingState) calls() ([]int, []int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]int(nil), s.expected...), append([]int(nil), s.updates...)
}

// sizedSnapshotter is tickSnapshotter for a sizedRecordingState.
type sizedSnapshotter struct{ tickSnapshotter }

func (s *sizedSnapshotter) Tick(ctx context.Context, st ReactorState) (ReactorState, error) {
	_, err := s.tickSnapshotter.Tick(ctx, st.(*sizedRecordingState).recordingState)
	return st, err
}

// panickyPatchesState calls fail from GetPatches (which has no error
// return: only a panic can come out of it).
type panickyPatchesState struct {
	*recordingState
	fail func() error
}

func (s *panickyPatchesState) GetPatches() [][]DataPatch {
	if err := s.fail(); err != nil {
		panic(err)
	}
	return nil
}

// failingState fails Update for one key once.
type failingState struct {
	*mapState
	failKey string
	failed  bool
}

func (s *failingState) Update(key util.EtcdKey, value []byte, isInit bool) error {
	if key.String() == s.failKey && !s.failed {
		s.failed = true
		return errors.New("transient update failure")
	}
	return s.mapState.Update(key, value, isInit)
}

// keyLog records every key a ReactorState was told about.
type keyLog struct {
	*mapState
	mu   sync.Mutex
	keys map[string]struct{}
}

func (s *keyLog) Update(key util.EtcdKey, value []byte, isInit bool) error {
	s.mu.Lock()
	s.keys[key.String()] = struct{}{}
	s.mu.Unlock()
	return s.mapState.Update(key, value, isInit)
}

func (s *keyLog) reserved() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for k := range s.keys {
		if strings.Contains(k, "__orchestrator") {
			out = append(out, k)
		}
	}
	return out
}

// incrWriter is a reactor that commits one increment of /n per Tick, as many
// times as writes says, and records the value of /n it sees.
type incrWriter struct {
	writes atomic.Int64 // increments still to emit
	seen   atomic.Int64 // value of /n the last Tick saw
}

func (x *incrWriter) Tick(_ context.Context, s ReactorState) (ReactorState, error) {
	st := s.(*mapState)
	x.seen.Store(st.int("/n"))
	if x.writes.Load() > 0 {
		x.writes.Add(-1)
		st.patches = append(st.patches, []DataPatch{incrPatch(st.key("/n"), 1)})
	}
	return st, nil
}

// limReactor queues its groups in the first Tick and finishes: Run commits
// them and returns nil, or returns the commit's error.
type limReactor struct {
	groups [][]DataPatch
}

func (r *limReactor) Tick(_ context.Context, s ReactorState) (ReactorState, error) {
	st := s.(*mapState)
	st.patches = append(st.patches, r.groups...)
	r.groups = nil
	return st, ErrReactorFinished
}

func idleReactor() Reactor {
	return ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) { return s, nil })
}

// countingReactor is idleReactor counting its Ticks in ticks.
func countingReactor(ticks *atomic.Int64) Reactor {
	return ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		ticks.Add(1)
		return s, nil
	})
}
