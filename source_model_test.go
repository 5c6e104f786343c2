package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/etcdworker/orchestrator/util"
)

// The shared Source's catch-up, on its own: no etcd. A model store feeds the
// copy through the paths the follower uses (Source.applyWatch for watch
// responses and progress, Source.loadCopy for loads and reloads), the clock
// is fake, and workers catch up at random moments with the run's own
// catchUp, some of their Updates failing.

// modelStore is a tiny MVCC store: the keys with their values and
// revisions, and the events of the revisions not delivered yet.
type modelStore struct {
	rev     int64
	kvs     map[string]*mvccpb.KeyValue
	pending []*clientv3.Event
	history map[int64]map[string][]byte // the values at each revision
	flips   map[string][]int64          // the revisions each key was created or deleted at
}

// flipsAfter is how often key was created or deleted after rev.
func (m *modelStore) flipsAfter(key string, rev int64) int {
	n := 0
	for _, r := range m.flips[key] {
		if r > rev {
			n++
		}
	}
	return n
}

func newModelStore() *modelStore {
	return &modelStore{kvs: map[string]*mvccpb.KeyValue{}, history: map[int64]map[string][]byte{0: {}},
		flips: map[string][]int64{}}
}

// wrote records the values at the new revision.
func (m *modelStore) wrote() {
	at := make(map[string][]byte, len(m.kvs))
	for k, kv := range m.kvs {
		at[k] = kv.Value
	}
	m.history[m.rev] = at
}

func (m *modelStore) put(key, value string) {
	m.rev++
	kv := &mvccpb.KeyValue{Key: []byte(key), Value: []byte(value), ModRevision: m.rev, CreateRevision: m.rev, Version: 1}
	if old, ok := m.kvs[key]; ok {
		kv.CreateRevision, kv.Version = old.CreateRevision, old.Version+1
	} else {
		m.flips[key] = append(m.flips[key], m.rev)
	}
	m.kvs[key] = kv
	m.pending = append(m.pending, &clientv3.Event{Type: mvccpb.PUT, Kv: kv})
	m.wrote()
}

func (m *modelStore) del(key string) {
	if _, ok := m.kvs[key]; !ok {
		return
	}
	m.rev++
	delete(m.kvs, key)
	m.flips[key] = append(m.flips[key], m.rev)
	m.pending = append(m.pending, &clientv3.Event{Type: mvccpb.DELETE, Kv: &mvccpb.KeyValue{Key: []byte(key), ModRevision: m.rev}})
	m.wrote()
}

// take returns the first n undelivered events (one watch response).
func (m *modelStore) take(n int) []*clientv3.Event {
	n = min(n, len(m.pending))
	evs := m.pending[:n:n]
	m.pending = m.pending[n:]
	return evs
}

// read is a prefixReader: every key in key order at the newest revision.
// The events not delivered yet are in it: a reload after a compaction.
func (m *modelStore) read(_ bool, fn func(kv *mvccpb.KeyValue)) (int64, error) {
	for _, k := range slices.Sorted(maps.Keys(m.kvs)) {
		fn(m.kvs[k])
	}
	m.pending = nil
	return m.rev, nil
}

// visibleAt is what a worker with keyspace ks sees of the store at rev: its
// keys outside every reserved area, relative to its prefix.
func (m *modelStore) visibleAt(ks keyspace, rev int64) map[string][]byte {
	out := map[string][]byte{}
	for k, v := range m.history[rev] {
		if ks.visible(k) {
			out[k[len(ks.prefix):]] = v
		}
	}
	return out
}

// modelWorker is one worker following the Source: its run and state, and
// whether its Updates fail now.
type modelWorker struct {
	w     *EtcdWorker
	r     *run
	state *recordingState
	held  map[string]bool // keys the state was told, and not told deleted since
	fail  int             // the Update calls left before one fails (0: none fails)
	// The worker may tell the delete of a key its state never held in two
	// cases, where it cannot tell for sure and errs on the safe side:
	// failed: a catch-up failed since the last that completed (the state
	// may then hold any key created up to the newest catch-up it began);
	// or the key was created and deleted more than maxFlips times since
	// the worker's position (its change record folds the oldest).
	failed bool
	posRev int64 // the revision of the last catch-up that completed
}

var errModelUpdate = errors.New("model: Update fails")

func newModelWorker(t *testing.T, src *Source, store *modelStore, prefix string) *modelWorker {
	mw := &modelWorker{state: newRecordingState(prefix), held: map[string]bool{}}
	mw.state.onUpdate = func(rel string, value []byte, _ bool) error {
		if value == nil && !mw.held[rel] && !mw.failed && store.flipsAfter(prefix+rel, mw.posRev) < maxFlips {
			return fmt.Errorf("delete of %s%s told, a key the state never held", prefix, rel)
		}
		mw.held[rel] = value != nil
		if mw.fail > 0 {
			mw.fail--
			if mw.fail == 0 {
				return errModelUpdate
			}
		}
		return nil
	}
	mw.w = mustNewEtcdWorker(t, &clientv3.Client{}, prefix, idleReactor(), mw.state, WithSource(src))
	mw.start()
	src.lifeMu.Lock()
	src.moveCursor(mw.r.cur, true)
	src.lifeMu.Unlock()
	return mw
}

// start begins a new Run of the worker (after one that failed): the cursor
// and the state carry over, as they do in the worker.
func (mw *modelWorker) start() { mw.r = mw.w.newRun(context.Background(), nil, time.Second, "model") }

// TestSourceCatchUpMatchesAModel feeds one Source's copy random puts and
// deletes (delivered as watch responses of several events, as progress, or
// through a reload that skips the undelivered ones), for three workers (two
// on the Source's prefix, one on a sub-prefix; one of them often stuck)
// that catch up at random, with Updates failing at random. After every
// catch-up that completes, a worker's state equals the store at the
// revision it reached; no catch-up tells a key twice, a reserved key, a key
// outside the worker's prefix (the recording state rejects those), or the
// delete of a key the state never held (but where the worker errs on the
// safe side, see modelWorker). At the end every state equals the store.
func TestSourceCatchUpMatchesAModel(t *testing.T) {
	root, sub := newKeyspace(util.NormalizePrefix("/m")), newKeyspace(util.NormalizePrefix("/m/sub"))
	keys := []string{
		"/m/a", "/m/a", "/m/a", // often: a key that lives and dies many times
		"/m/b", "/m/c", "/m/sub/x", "/m/sub/y", "/m/subz", "/m/sub",
		root.tokenKey("1"), sub.tokenKey("2"), root.counterKey, sub.counterKey,
	}
	for seed := range uint64(40) {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 7))
			store := newModelStore()
			src, err := NewSource(&clientv3.Client{}, "/m")
			require.NoError(t, err)
			clock := clockwork.NewFakeClock()
			src.opts.clock = clock
			for range rng.IntN(5) {
				store.put(keys[rng.IntN(len(keys))], "v0")
			}
			_, _, err = src.loadCopy(clock.Now(), store.read)
			require.NoError(t, err)
			workers := []*modelWorker{
				newModelWorker(t, src, store, "/m"), newModelWorker(t, src, store, "/m"),
				newModelWorker(t, src, store, "/m/sub"),
			}
			for step := range 600 {
				clock.Advance(time.Millisecond)
				switch op := rng.IntN(20); {
				case op < 7:
					store.put(keys[rng.IntN(len(keys))], fmt.Sprint("v", step))
				case op < 10:
					store.del(keys[rng.IntN(len(keys))])
				case op < 13:
					evs := store.take(1 + rng.IntN(4))
					if len(evs) > 0 {
						src.applyWatch(watchResult{kind: watchEvents, rev: evs[len(evs)-1].Kv.ModRevision, events: evs})
					}
				case op < 14:
					if len(store.pending) == 0 {
						src.applyWatch(watchResult{kind: watchProgress, rev: store.rev})
					}
				case op < 15:
					_, _, err := src.loadCopy(clock.Now(), store.read) // a reload after a compaction
					require.NoError(t, err)
				default:
					// The second worker is often stuck: its position stays
					// behind while keys live and die many times.
					mw := workers[rng.IntN(len(workers))]
					if mw == workers[1] && rng.IntN(8) != 0 {
						continue
					}
					if rng.IntN(4) == 0 {
						mw.fail = 1 + rng.IntN(3)
					}
					mw.catchUp(t, store)
				}
			}
			// Deliver everything; every worker ends equal to the store.
			for len(store.pending) > 0 {
				evs := store.take(3)
				src.applyWatch(watchResult{kind: watchEvents, rev: evs[len(evs)-1].Kv.ModRevision, events: evs})
			}
			for _, mw := range workers {
				mw.fail = 0
				mw.catchUp(t, store)
				require.Equal(t, store.rev, mw.r.view.completeRev)
			}
		})
	}
}

// catchUp catches mw up once and checks its state: after a catch-up that
// completed it equals the store at the revision the worker reached,
// restricted to the worker's keys, each key told at most once; after one
// that failed the next Run goes on from there.
func (mw *modelWorker) catchUp(t *testing.T, store *modelStore) {
	t.Helper()
	before := len(mw.state.log)
	_, ok, err := mw.r.catchUp(nil)
	if errors.Is(err, errModelUpdate) {
		mw.failed = true
		mw.start()
		return
	}
	require.NoError(t, err)
	require.True(t, ok)
	mw.failed, mw.posRev = false, mw.r.view.completeRev
	told := map[string]bool{}
	for _, u := range mw.state.log[before:] {
		require.False(t, told[u.rel], "key %s told twice in one catch-up", u.rel)
		told[u.rel] = true
	}
	rev := mw.r.view.completeRev
	require.Equal(t, store.visibleAt(mw.r.ks, rev), mw.state.values, "state after catching up to revision %d", rev)
}

// TestAWorkerWhoseCatchUpMetTheWriteLockIsWokenAgain: a catch-up only tries
// the Source's read lock, which fails while the follower holds the write
// lock or waits for it (behind another worker's catch-up). A worker woken
// for a watch response whose catch-up so failed has used up its signal; the
// release of the write lock must signal it again, whatever the holder did.
// Here the holder is a head probe that found the copy behind the head (a
// busy server), which once released the lock without a signal: the state
// stayed behind the copy with no signal pending, and Ticks ran on the old
// snapshot until the follower next signalled. No etcd: the Source is fed
// through its own loadCopy, applyWatch and onProbe.
func TestAWorkerWhoseCatchUpMetTheWriteLockIsWokenAgain(t *testing.T) {
	ctx := testContext(t)
	const prefix = "/woken"
	store := newModelStore()
	store.put(prefix+"/a", "0")
	src := mustNewSource(t, &clientv3.Client{}, prefix)
	clock := clockwork.NewFakeClock()
	src.opts.clock = clock
	_, _, err := src.loadCopy(clock.Now(), store.read)
	require.NoError(t, err)

	state := newRecordingState(prefix)
	w := mustNewEtcdWorker(t, &clientv3.Client{}, prefix, idleReactor(), state, WithSource(src))
	r := w.newRun(ctx, nil, time.Second, "wake")
	src.lifeMu.Lock()
	src.moveCursor(r.cur, true) // attach without a follower: the test is the follower
	src.lifeMu.Unlock()
	_, ok, err := r.catchUp(nil)
	require.NoError(t, err)
	require.True(t, ok)
	r.synced = true
	require.Equal(t, "0", string(state.values["/a"]))

	// The watch delivers a put: the copy has it, the worker is signalled.
	store.put(prefix+"/a", "1")
	evs := store.take(len(store.pending))
	src.applyWatch(watchResult{kind: watchEvents, rev: evs[len(evs)-1].Kv.ModRevision, events: evs})
	require.Len(t, r.cur.notify, 1, "the worker has a signal")

	// Another worker is taking its catch-up (read lock), and a head probe
	// that read a newer head (writes elsewhere moved it) waits for the write
	// lock.
	src.mu.RLock()
	f := &follower{s: src, clock: clock, log: zap.NewNop()}
	probed := make(chan struct{})
	go func() {
		defer close(probed)
		_ = f.onProbe(headProbe{sent: clock.Now(), rev: store.rev + 10})
	}()
	waitUntil(ctx, t, "the probe waits for the write lock", func() bool {
		if src.mu.TryRLock() {
			src.mu.RUnlock()
			return false
		}
		return true
	})
	// The worker wakes for its signal meanwhile.
	require.NoError(t, r.wait(clock.Now().Add(time.Hour)))
	src.mu.RUnlock()
	awaitSignal(ctx, t, probed, "the probe is recorded")

	caughtUp := string(state.values["/a"]) == "1"
	signalled := len(r.cur.notify) == 1
	require.True(t, caughtUp || signalled,
		"the copy holds /a=1 (revision %d) but the worker's state has /a=%q (revision %d) and no signal is pending: "+
			"the wake-up was lost", src.copy.completeRev, state.values["/a"], r.view.completeRev)
}
