package orchestrator

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/util"
)

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

// variedKey is a key of length that varies with i (1 to ~300 bytes past the
// prefix), so that the key slices fall in many allocation size classes.
func variedKey(prefix string, i int) string {
	return fmt.Sprintf("%s/k%04d-%s", prefix, i, strings.Repeat(string(rune('a'+i%26)), (i*37)%300))
}

// TestReviewFinalRetainedKeysNeverChange. Invariant (commit "Keys from
// etcd's responses are not copied"): a key string given to
// ReactorState.Update is immutable, it reads the same forever, whatever
// loads, reloads (streaming and paged fallback) and watch responses arrive
// afterwards; so are the value slices shared with the state.
func TestReviewFinalRetainedKeysNeverChange(t *testing.T) {
	t.Parallel()
	for _, noStream := range []bool{false, true} {
		t.Run(fmt.Sprintf("noStream=%v", noStream), func(t *testing.T) {
			t.Parallel() // each has its own etcd; mostly waits for reconnections
			prefix := "/test/retained-keys"
			srv := etcdtest.NewServer(t)
			admin := srv.Client(t)
			ctx := testContext(t)
			for i := range 200 {
				mustPutKV(ctx, t, admin, variedKey(prefix, i), strings.Repeat("v", i%50))
			}
			proxy := etcdtest.NewProxy(t, srv.Endpoints()[0])
			cfg := etcdtest.ClientConfig(proxy.Endpoint())
			cfg.DialOptions = (&rpcCounter{noStream: noStream}).dialOptions()
			state := &retainingState{recordingState: newRecordingState(prefix)}
			reactor := &retainingSnapshotter{}
			w, err := NewEtcdWorker(etcdtest.NewClientFromConfig(t, cfg), prefix, reactor, state,
				WithPageSize(7), WithMaxStaleness(500*time.Millisecond))
			require.NoError(t, err)
			runCtx, cancel := context.WithCancel(ctx)
			defer cancel()
			done := runAsync(runCtx, w, nil, 5*time.Millisecond, "rfkeys")
			synced := func(what string) {
				waitUntil(ctx, t, what, func() bool { return reactor.equals(etcdSnapshot(ctx, t, admin, prefix)) })
			}
			synced("the loaded state")
			for round := range 4 {
				// watch: rewrite, delete and create keys of every length
				for i := round; i < 200; i += 3 {
					mustPutKV(ctx, t, admin, variedKey(prefix, i), fmt.Sprintf("r%d-%d", round, i))
				}
				for i := round + 1; i < 200; i += 5 {
					_, err := admin.Delete(ctx, variedKey(prefix, i))
					require.NoError(t, err)
				}
				synced(fmt.Sprintf("round %d watched", round))
				// reload with differences
				reloadByCompaction(ctx, t, proxy, admin, func() {
					for i := round + 1; i < 200; i += 5 {
						mustPutKV(ctx, t, admin, variedKey(prefix, i), fmt.Sprintf("back%d", round))
					}
					for i := 200 + round*50; i < 250+round*50; i++ {
						mustPutKV(ctx, t, admin, variedKey(prefix, i), "new")
					}
				})
				synced(fmt.Sprintf("round %d reloaded", round))
				runtime.GC()
				require.Empty(t, state.corrupted(), "round %d", round)
			}
			cancel()
			require.True(t, IsCleanStop(recvErr(ctx, t, done)))
			runtime.GC()
			require.Empty(t, state.corrupted())
		})
	}
}
