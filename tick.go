package orchestrator

import (
	"time"

	"golang.org/x/time/rate"
)

// tickGate decides when the reactor may tick, once the state is a snapshot
// that includes the worker's last commit. A Tick is due when the state
// changed since the last Tick or timerInterval has passed; due Ticks are rate
// limited by a token bucket of rate 1/interval and burst 2, and are delayed,
// never dropped. A timer Tick (no change) waits for a full bucket, so timer
// Ticks never use up the budget a change's Tick needs.
type tickGate struct {
	interval time.Duration
	limiter  *rate.Limiter
	changed  bool
	lastTick time.Time
}

func newTickGate(interval time.Duration) *tickGate {
	return &tickGate{interval: interval, limiter: rate.NewLimiter(rate.Every(interval), 2)}
}

// changedState records that the state changed.
func (g *tickGate) changedState() { g.changed = true }

// admit reports whether a Tick may run at now, and takes its token if so.
// When it may not, wake is when to ask again (zero: not before the state
// changes or becomes fresh).
func (g *tickGate) admit(now time.Time) (ok bool, wake time.Time) {
	if !g.changed {
		next := g.lastTick.Add(g.interval)
		if now.Before(next) {
			return false, next
		}
		burst := float64(g.limiter.Burst())
		if tokens := g.limiter.TokensAt(now); tokens < burst {
			return false, now.Add(time.Duration((burst - tokens) * float64(g.interval)))
		}
	}
	res := g.limiter.ReserveN(now, 1)
	if d := res.DelayFrom(now); d > 0 {
		res.CancelAt(now)
		return false, now.Add(d)
	}
	g.changed = false
	g.lastTick = now
	return true, time.Time{}
}
