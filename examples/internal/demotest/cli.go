package demotest

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

// Main runs a demo's tests (m.Run), then fails the run if a goroutine was
// left behind (goleak). Use it as TestMain's only call.
func Main(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// RunTimeout bounds a demo's run in its tests.
const RunTimeout = 60 * time.Second

// RequireRun runs a demo's run function (bounded by RunTimeout), requires
// it to return no error and report that its invariants held, with wantLine
// among what it printed, and returns the output.
func RequireRun(t *testing.T, wantLine string, run func(ctx context.Context, out io.Writer) (bool, error)) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), RunTimeout)
	defer cancel()
	var out Buffer
	ok, err := run(ctx, &out)
	require.NoError(t, err, out.String())
	require.True(t, ok, out.String())
	require.Contains(t, out.String(), wantLine)
	return out.String()
}

// RequireMain runs runMain with args, requires exit code 0, nothing on
// stderr and wantLine on stdout, and returns stdout.
func RequireMain(t *testing.T, runMain RunMain, args []string, wantLine string) string {
	t.Helper()
	var stdout, stderr Buffer
	code := runMain(args, &stdout, &stderr)
	require.Equal(t, 0, code, "stderr: %s\nstdout: %s", stderr.String(), stdout.String())
	require.Contains(t, stdout.String(), wantLine)
	require.Empty(t, stderr.String())
	return stdout.String()
}

// RunMain is a demo program's whole command line: it runs args and returns
// the exit code.
type RunMain func(args []string, stdout, stderr io.Writer) int

// BadInput is a command line a demo must refuse: the exit code it must
// return and a part of the one line it must print to stderr.
type BadInput struct {
	Args     []string
	WantCode int
	WantErr  string
}

// RequireBadInputs runs each case through runMain in a subtest named after
// its arguments and checks the exit code and that stderr is one line holding
// WantErr.
func RequireBadInputs(t *testing.T, runMain RunMain, cases []BadInput) {
	t.Helper()
	for _, tc := range cases {
		t.Run(strings.Join(tc.Args, " "), func(t *testing.T) {
			var stdout, stderr Buffer
			code := runMain(tc.Args, &stdout, &stderr)
			require.Equal(t, tc.WantCode, code)
			require.Contains(t, stderr.String(), tc.WantErr)
			require.Equal(t, 1, strings.Count(stderr.String(), "\n"), "one line: %q", stderr.String())
		})
	}
}

// RequireHelp runs runMain with the help flag arg and checks that it exits 0
// printing nothing to stderr, and to stdout first about, which starts with
// wantPrefix, then text naming each of flags.
func RequireHelp(t *testing.T, runMain RunMain, arg, about, wantPrefix string, flags []string) {
	t.Helper()
	var stdout, stderr Buffer
	require.Equal(t, 0, runMain([]string{arg}, &stdout, &stderr))
	first, rest, _ := strings.Cut(stdout.String(), "\n")
	require.Equal(t, about, first)
	require.True(t, strings.HasPrefix(first, wantPrefix))
	for _, flag := range flags {
		require.Contains(t, rest, flag)
	}
	require.Empty(t, stderr.String())
}
