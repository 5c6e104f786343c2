package demo

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestProgramChecksTheBoundsOfItsFlags: a flag defined with a bound fails
// the command line with one line naming it; within the bounds the program
// runs with the parsed values, its connection flags checked too.
func TestProgramChecksTheBoundsOfItsFlags(t *testing.T) {
	type config struct {
		conn  ConnConfig
		n     int
		every time.Duration
		delay time.Duration
	}
	define := func(fs *Flags, cfg *config) {
		cfg.conn.Register(fs)
		fs.IntAtLeast(&cfg.n, "n", 3, 2, "n")
		fs.PositiveDuration(&cfg.every, "every", time.Second, "every")
		fs.NonNegativeDuration(&cfg.delay, "delay", 0, "delay")
	}
	var got config
	run := func(_ context.Context, cfg config, _ io.Writer) (bool, error) {
		got = cfg
		return true, nil
	}
	for _, tc := range []struct {
		args    []string
		code    int
		wantErr string
	}{
		{[]string{"--n", "1"}, 2, "--n: must be at least 2, got 1"},
		{[]string{"--every", "0s"}, 2, "--every: must be positive, got 0s"},
		{[]string{"--delay", "-1s"}, 2, "--delay: must not be negative, got -1s"},
		{[]string{"--dial-timeout", "0s"}, 2, "--dial-timeout: must be positive"},
		{[]string{"--user", "u"}, 2, "--user"},
		{[]string{"--n", "2", "--every", "1ms", "--delay", "0s"}, 0, ""},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			require.Equal(t, tc.code, Program("prog", "prog shows", tc.args, &stdout, &stderr, define, run))
			if tc.wantErr == "" {
				require.Empty(t, stderr.String())
				require.Equal(t, 2, got.n)
				require.Equal(t, time.Millisecond, got.every)
				return
			}
			require.True(t, strings.HasPrefix(stderr.String(), "prog: "+tc.wantErr), stderr.String())
			require.Equal(t, 1, strings.Count(stderr.String(), "\n"), "one line")
		})
	}
}
