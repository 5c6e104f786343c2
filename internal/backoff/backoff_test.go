package backoff

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestBackoffDoublesUpToTheLimitWithJitterAndResets(t *testing.T) {
	t.Parallel()
	b := New(50*time.Millisecond, 200*time.Millisecond)
	for _, ceil := range []time.Duration{50, 100, 200, 200, 200} {
		ceil *= time.Millisecond
		d := b.Next()
		require.GreaterOrEqual(t, d, ceil/2)
		require.LessOrEqual(t, d, ceil)
	}
	b.Reset()
	require.LessOrEqual(t, b.Next(), 50*time.Millisecond)
}
