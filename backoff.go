package orchestrator

import (
	"math/rand/v2"
	"time"
)

const (
	backoffBase = 50 * time.Millisecond
	backoffCap  = 2 * time.Second
)

// backoff is a capped exponential back-off with jitter: 50ms doubling up to
// 2s, each wait drawn uniformly from [d/2, d].
type backoff struct{ cur time.Duration }

func newBackoff() backoff { return backoff{cur: backoffBase} }

func (b *backoff) next() time.Duration {
	d := b.cur
	b.cur = min(b.cur*2, backoffCap)
	return d/2 + rand.N(d/2+1)
}

func (b *backoff) reset() { b.cur = backoffBase }
