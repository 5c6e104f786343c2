package orchestrator

import (
	"time"

	"github.com/etcdworker/orchestrator/internal/backoff"
)

// The back-off of the worker's and the Source's retries: 50ms doubling up to
// 2s, each wait drawn uniformly from [d/2, d].
const (
	backoffBase = 50 * time.Millisecond
	backoffCap  = 2 * time.Second
)

func newBackoff() backoff.Backoff { return backoff.New(backoffBase, backoffCap) }
