package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
	"github.com/etcdworker/orchestrator/util"
)

// A role that is not valid UTF-8 must not panic inside Run (prometheus label
// validation in metrics.forRole, called from newRun outside any recover).
func TestRunRoleInvalidUTF8(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Shared(t)
	ctx, cancel := context.WithTimeout(testContext(t), 5*time.Second)
	defer cancel()
	st := newMapState("/test/role")
	w, err := NewEtcdWorker(srv.Client(t), "/test/role", ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		return s, ErrReactorFinished
	}), st)
	require.NoError(t, err)
	var panicked any
	func() {
		defer func() { panicked = recover() }()
		err = w.Run(ctx, nil, 10*time.Millisecond, "bad\xffrole")
	}()
	require.Nil(t, panicked, "Run panicked on a user-supplied role: %v", panicked)
	require.NoError(t, err)
}

// A patch that panics after writing valueMap (before recording the key in
// changedSet) must not leave its value behind for a second Run of the same
// worker: the live value map is rebuilt from what etcd has.
func TestRunAfterPanickingPatchUsesCommittedValues(t *testing.T) {
	t.Parallel()
	const prefix = "/test/phantom"
	srv := etcdtest.Shared(t)
	ctx := testContext(t)
	cli := srv.Client(t)
	_, err := cli.Put(ctx, prefix+"/k", "5")
	require.NoError(t, err)

	st := newMapState(prefix)
	run := 0
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		ms := s.(*mapState)
		switch run {
		case 1:
			bad := patchFunc(func(vm map[util.EtcdKey][]byte, _ map[util.EtcdKey]struct{}) error {
				vm[ms.key("/k")] = []byte("100")
				panic("boom")
			})
			ms.patches = append(ms.patches, []DataPatch{bad})
			return ms, nil
		default:
			ms.patches = append(ms.patches, []DataPatch{incrPatch(ms.key("/k"), 1)})
			return ms, ErrReactorFinished
		}
	})
	w, err := NewEtcdWorker(cli, prefix, reactor, st)
	require.NoError(t, err)
	run = 1
	err = w.Run(ctx, nil, 10*time.Millisecond, "phantom")
	require.ErrorIs(t, err, ErrPanic)
	run = 2
	require.NoError(t, w.Run(ctx, nil, 10*time.Millisecond, "phantom"))
	resp, err := cli.Get(ctx, prefix+"/k")
	require.NoError(t, err)
	require.Equal(t, "6", string(resp.Kvs[0].Value), "5 + 1 expected")
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

// An Update error ends Run; a second Run of the same worker must pass that
// key to the state again (the load does not skip it as already known).
func TestRunAfterUpdateErrorResendsKey(t *testing.T) {
	t.Parallel()
	const prefix = "/test/upderr"
	srv := etcdtest.Shared(t)
	ctx := testContext(t)
	cli := srv.Client(t)
	st := &failingState{mapState: newMapState(prefix), failKey: prefix + "/x"}
	ticks := 0
	var sawX bool
	run := 1
	reactor := ReactorFunc(func(_ context.Context, s ReactorState) (ReactorState, error) {
		ticks++
		if run == 1 && ticks == 1 {
			if _, err := cli.Put(ctx, prefix+"/x", "1"); err != nil {
				return nil, err
			}
		}
		if run == 2 {
			_, sawX = st.values["/x"]
			return s, ErrReactorFinished
		}
		return s, nil
	})
	w, err := NewEtcdWorker(cli, prefix, reactor, st)
	require.NoError(t, err)
	err = w.Run(ctx, nil, 10*time.Millisecond, "upderr")
	require.ErrorContains(t, err, "transient update failure")
	run = 2
	require.NoError(t, w.Run(ctx, nil, 10*time.Millisecond, "upderr"))
	require.True(t, sawX, "state never learned /x after the re-run")
}

// Tick returning (nil, ErrReactorFinished): Run returns nil after committing
// the returned patches (there are none).
func TestRunFinishedWithNilState(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Shared(t)
	ctx := testContext(t)
	w, err := NewEtcdWorker(srv.Client(t), "/test/nilstate", ReactorFunc(func(context.Context, ReactorState) (ReactorState, error) {
		return nil, ErrReactorFinished
	}), newMapState("/test/nilstate"))
	require.NoError(t, err)
	require.NoError(t, w.Run(ctx, nil, 10*time.Millisecond, "nil"))
}

// TestClassifyTxnError: clientv3 turns etcd server errors into
// rpctypes.EtcdError, which has no gRPC status, so rejections must be
// recognised by value; otherwise a permission error is taken for an unknown
// outcome and resolve loops on it. Transient errors (an expired auth token
// that the client refreshes, no leader, too many requests) stay retryable.
func TestClassifyTxnError(t *testing.T) {
	t.Parallel()
	fatal := []error{rpctypes.ErrPermissionDenied, rpctypes.ErrUserEmpty, rpctypes.ErrAuthFailed,
		rpctypes.ErrTooManyOps, rpctypes.ErrRequestTooLarge, rpctypes.ErrLeaseNotFound}
	for _, e := range fatal {
		t.Run("fatal "+fmt.Sprint(e), func(t *testing.T) {
			require.Error(t, commitRejected(nil, e), "%v classified as unknown outcome", e)
		})
	}
	retryable := []error{rpctypes.ErrInvalidAuthToken, rpctypes.ErrNoLeader, rpctypes.ErrTooManyRequests,
		rpctypes.ErrTimeout, context.DeadlineExceeded, errors.New("connection reset")}
	for _, e := range retryable {
		t.Run("retryable "+fmt.Sprint(e), func(t *testing.T) {
			require.NoError(t, commitRejected(nil, e))
		})
	}
	require.ErrorIs(t, commitRejected(nil, rpctypes.ErrTooManyOps), ErrEtcdTxnOpsExceed)
	require.ErrorIs(t, commitRejected(nil, rpctypes.ErrRequestTooLarge), ErrEtcdTxnSizeExceed)
	require.ErrorIs(t, commitRejected(nil, rpctypes.ErrLeaseNotFound), ErrEtcdSessionDone)
}
