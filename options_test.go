package orchestrator

import (
	"math"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator/internal/etcderr"
)

// TestOptionErrorsNameTheOption: NewEtcdWorker rejects an out-of-range
// option with ErrInvalidArgument and an error that names the option; values
// documented as meaning "none" or "no limit" are accepted.
func TestOptionErrorsNameTheOption(t *testing.T) {
	t.Parallel()
	cli := sharedClient(t)
	noop := idleReactor()
	for _, tc := range []struct {
		opt  Option
		name string // "" = valid
	}{
		{WithRequestTimeout(0), "WithRequestTimeout"},
		{WithRequestTimeout(-time.Second), "WithRequestTimeout"},
		{WithMaxStaleness(0), "WithMaxStaleness"},
		{WithShutdownTimeout(-1), "WithShutdownTimeout"},
		{WithMaxOutage(-1), "WithMaxOutage"},
		{WithPageSize(0), "WithPageSize"},
		{WithPageSize(-5), "WithPageSize"},
		{WithPipelineDepth(0), "WithPipelineDepth"},
		{WithPipelineDepth(-1), "WithPipelineDepth"},
		{WithPipelineDepth(-1 << 31), "WithPipelineDepth"},
		{WithPipelineDepth(MaxPipelineDepth + 1), "WithPipelineDepth"},
		{WithPipelineDepth(math.MaxInt), "WithPipelineDepth"}, // a caller's "no limit"
		{WithPipelineDepth(1), ""},
		{WithPipelineDepth(8), ""},
		{WithPipelineDepth(MaxPipelineDepth), ""},
		{WithCommitTokenTTL(0), "WithCommitTokenTTL"},
		// Over etcd's longest lease TTL: a grant fails every time.
		{WithCommitTokenTTL(etcderr.MaxLeaseTTL*time.Second + time.Second), "WithCommitTokenTTL"},
		{WithCommitTokenTTL(time.Duration(math.MaxInt64)), "WithCommitTokenTTL"},
		{WithCommitTokenTTL(etcderr.MaxLeaseTTL * time.Second), ""},
		{WithTxnLimits(1, 10), "WithTxnLimits"},
		{WithTxnLimits(DefaultTxnMaxOps, 10), "WithTxnLimits"},
		{WithTxnLimits(2, DefaultTxnMaxBytes), "WithTxnLimits"},
		{WithFencingKey("", 0), "WithFencingKey"},
		{WithFencingKey("/leader", 0), "WithFencingKey"},
		{WithFencingKey("", 5), "WithFencingKey"},
		{WithShutdownTimeout(0), ""},
		{WithMaxOutage(0), ""},
		{WithCommitTokenTTL(time.Millisecond), ""}, // etcd rounds it up
		{WithFencingKey("/leader", 5), ""},
	} {
		_, err := NewEtcdWorker(cli, "/test/options", noop, newMapState("/test/options"), tc.opt)
		if tc.name == "" {
			require.NoError(t, err)
			continue
		}
		require.ErrorIs(t, err, ErrInvalidArgument, tc.name)
		require.Contains(t, err.Error(), tc.name)
	}
}
