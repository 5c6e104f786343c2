package orchestrator

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/util"
)

// committer is a worker that, cycle by cycle, puts <prefix>/k-<i> and
// deletes <prefix>/k-<i-1> (so it keeps a delete counter and a token), and
// on demand writes a foreign key.
type committer struct {
	prefix  string
	state   *keyLog
	w       *EtcdWorker
	want    atomic.Int64 // cycles asked for
	seen    atomic.Int64 // cycles seen committed
	foreign atomic.Value // string: a key to write next, "" none
	// cancel and done belong to the Run started last; done is nil once its
	// result was taken (stopped), or before the first start.
	cancel context.CancelFunc
	done   <-chan error
}

// newCommitter returns a committer on prefix, not yet started. Its cleanup
// stops and joins a Run whose result the test did not take (a test that
// failed half-way), so that no worker outlives the test.
func newCommitter(t *testing.T, cli *clientv3.Client, prefix string) *committer {
	t.Helper()
	c := &committer{prefix: prefix}
	t.Cleanup(func() {
		if c.done == nil {
			return
		}
		c.cancel()
		ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
		defer cancel()
		_ = recvErr(ctx, t, c.done)
	})
	c.state = &keyLog{mapState: newMapState(prefix), keys: map[string]struct{}{}}
	c.foreign.Store("")
	emitted := int64(0)
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		st := s.(*keyLog)
		if _, ok := st.values["/k-"+strconv.FormatInt(emitted-1, 10)]; ok && emitted > c.seen.Load() {
			c.seen.Store(emitted)
		}
		if key := c.foreign.Load().(string); key != "" {
			st.patches = append(st.patches, []DataPatch{SingleDataPatch{Key: util.NewEtcdKey(key),
				Func: func([]byte) ([]byte, bool, error) { return []byte("forged"), true, nil }}})
			return st, nil
		}
		if emitted < c.want.Load() && emitted == c.seen.Load() {
			group := []DataPatch{setPatch(st.key("/k-"+strconv.FormatInt(emitted, 10)), []byte("v"))}
			if emitted > 0 {
				group = append(group, setPatch(st.key("/k-"+strconv.FormatInt(emitted-1, 10)), nil))
			}
			st.patches = append(st.patches, group)
			emitted++
		}
		return st, nil
	})
	w := mustNewEtcdWorker(t, cli, prefix, reactor, c.state)
	c.w = w
	return c
}

// start runs the worker in a goroutine until ctx is done or Run fails; its
// result is stopped's.
func (c *committer) start(ctx context.Context) {
	runCtx, cancel := context.WithCancel(ctx)
	c.cancel, c.done = cancel, runAsync(runCtx, c.w, nil, 20*time.Millisecond, c.prefix)
}

// stopped waits (at most within) for the result of the Run started last.
func (c *committer) stopped(t *testing.T, within time.Duration) error {
	t.Helper()
	err := recvErr(contextWithin(t, within), t, c.done)
	c.cancel()
	c.done = nil
	return err
}

// cycles asks for n more cycles and waits until they are committed.
func (c *committer) cycles(t *testing.T, n int64) {
	t.Helper()
	target := c.want.Add(n)
	waitWithin(t, 10*time.Second, fmt.Sprintf("worker on %s committing %d cycles", c.prefix, target), nil,
		func() bool { return c.seen.Load() >= target })
}

// TestNestedPrefixesHideEachOthersBookkeeping: workers on nested (/r/app and
// /r/app/b) and sibling (/r/app and /r/apple) prefixes, started in either
// order and both committing puts and deletes, never show each other's
// delete counter or commit tokens to their states, and a patch writing the
// other worker's bookkeeping ends Run with ErrKeyOutsidePrefix, writing
// nothing.
func TestNestedPrefixesHideEachOthersBookkeeping(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	n := 0
	for _, pair := range [][2]string{{"/r/app", "/r/app/b"}, {"/r/app", "/r/apple"}} {
		for _, innerFirst := range []bool{false, true} {
			n++
			root := fmt.Sprintf("/test/nest-%d", n)
			name := fmt.Sprintf("%s+%s/inner-first=%v", pair[0], pair[1], innerFirst)
			t.Run(name, func(t *testing.T) {
				nestedCase(t, cli, root+pair[0], root+pair[1], innerFirst)
			})
		}
	}
}

func nestedCase(t *testing.T, cli *clientv3.Client, outerPrefix, innerPrefix string, innerFirst bool) {
	ctx := contextWithin(t, 30*time.Second)
	outer, inner := newCommitter(t, cli, outerPrefix), newCommitter(t, cli, innerPrefix)
	first, second := outer, inner
	if innerFirst {
		first, second = inner, outer
	}
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	first.start(runCtx)
	first.cycles(t, 3)
	second.start(runCtx) // loads the first one's bookkeeping (when nested)
	second.cycles(t, 3)
	first.cycles(t, 2) // the second one watches the first one's bookkeeping change
	second.cycles(t, 2)

	// Both workers' bookkeeping exists in etcd...
	for _, c := range []*committer{outer, inner} {
		resp, err := cli.Get(ctx, c.prefix+reservedDir, clientv3.WithPrefix(), clientv3.WithKeysOnly())
		require.NoError(t, err)
		var keys []string
		for _, kv := range resp.Kvs {
			keys = append(keys, strings.TrimPrefix(string(kv.Key), c.prefix))
		}
		require.Len(t, keys, 2, "delete counter and one token under %s: %v", c.prefix, keys)
	}
	// ... and neither state was ever told about any of it.
	require.Empty(t, outer.state.reserved(), "the outer worker's state saw bookkeeping keys")
	require.Empty(t, inner.state.reserved(), "the inner worker's state saw bookkeeping keys")

	// Each worker trying to write the other's delete counter fails and
	// writes nothing.
	for _, pair := range [][2]*committer{{outer, inner}, {inner, outer}} {
		c, other := pair[0], pair[1]
		counter := keysOf(other.prefix).counterKey
		before, err := cli.Get(ctx, counter)
		require.NoError(t, err)
		require.Len(t, before.Kvs, 1)
		c.foreign.Store(counter)
		require.ErrorIs(t, c.stopped(t, 10*time.Second), ErrKeyOutsidePrefix,
			"the worker on %s writing %s", c.prefix, counter)
		after, err := cli.Get(ctx, counter)
		require.NoError(t, err)
		require.Equal(t, before.Kvs[0].ModRevision, after.Kvs[0].ModRevision, "%s was written", counter)
		if c == outer {
			// Restart the outer worker so that the inner one can be tested
			// while the outer one runs.
			outer.foreign.Store("")
			outer.start(runCtx)
		}
	}
	stop()
	require.ErrorIs(t, outer.stopped(t, stopTimeout), context.Canceled)
}
