package orchestrator

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestTickGateTicksChangesAtOnceAndNeverDropsATick walks the tick gate
// through a script of (time, changed) steps and checks each decision: a
// change ticks at once within the rate, a timer Tick waits for the interval
// and a full bucket, and a Tick over the rate is delayed (with the time to
// ask again), never dropped.
func TestTickGateTicksChangesAtOnceAndNeverDropsATick(t *testing.T) {
	const interval = 100 * time.Millisecond
	t0 := time.Unix(1_000_000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	tests := []struct {
		name    string
		ms      int
		change  bool
		want    bool
		wakeMs  int // when refused: the time to ask again (-1: none given)
		comment string
	}{
		{"first tick after the load", 0, true, true, 0, "a change ticks at once"},
		{"second change at once", 1, true, true, 0, "burst 2 allows a second Tick"},
		{"third change at once", 2, true, false, 100, "over the rate: delayed until a token is back"},
		{"third change later", 100, false, true, 0, "the change is still pending, so it ticks"},
		{"timer before the interval", 150, false, false, 200, "no change: wait for the interval"},
		{"timer after the interval, bucket not full", 200, false, false, 300, "a timer Tick waits for a full bucket"},
		{"timer with a full bucket", 300, false, true, 0, "an idle worker ticks every interval or so"},
		{"change right after a timer tick", 301, true, true, 0, "a timer Tick never delays a change"},
	}
	g := newTickGate(interval)
	for _, tt := range tests {
		if tt.change {
			g.changedState()
		}
		ok, wake := g.admit(at(tt.ms))
		require.Equal(t, tt.want, ok, "%s: %s", tt.name, tt.comment)
		if !ok {
			require.Equal(t, at(tt.wakeMs), wake, "%s: wake time", tt.name)
		} else {
			require.Equal(t, at(tt.ms), g.lastTick, tt.name)
			require.False(t, g.changed, tt.name)
		}
	}
}
