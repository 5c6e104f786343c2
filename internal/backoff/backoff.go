// Package backoff is the capped exponential back-off with jitter that every
// retry loop of this module uses: the worker's and the Source's requests,
// and the leader package's campaigns.
package backoff

import (
	"math/rand/v2"
	"time"
)

// Backoff doubles a wait from a base up to a cap; each wait is drawn
// uniformly from [d/2, d], so that retries of several clients spread out.
// The zero value is not usable: make one with New.
type Backoff struct{ base, limit, cur time.Duration }

// New returns a Backoff whose first wait is at most base and whose waits
// never exceed limit.
func New(base, limit time.Duration) Backoff { return Backoff{base: base, limit: limit, cur: base} }

// Next returns the next wait and doubles the one after it.
func (b *Backoff) Next() time.Duration {
	d := b.cur
	b.cur = min(b.cur*2, b.limit)
	return d/2 + rand.N(d/2+1)
}

// Reset makes the next wait the first again (after a success).
func (b *Backoff) Reset() { b.cur = b.base }
