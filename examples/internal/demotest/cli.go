package demotest

import (
	"io"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

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
