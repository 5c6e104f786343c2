package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/etcdworker/orchestrator/examples/internal/demotest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestRun runs the demo briefly on an embedded etcd with two forced leader
// changes: the log must match the counter and everything must be torn down
// (goleak).
func TestRun(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out demotest.Buffer
	ok, err := run(ctx, config{
		prefix:      "/leader-test",
		controllers: 3,
		duration:    2 * time.Second,
		killAfter:   700 * time.Millisecond,
		interval:    20 * time.Millisecond,
		ttl:         5,
		metricsAddr: "127.0.0.1:0",
	}, &out)
	require.NoError(t, err, out.String())
	require.True(t, ok, out.String())
	require.Contains(t, out.String(), "terms in order (OK)\n")
}

// TestBadInputIsOneLineNamingTheFlag: no bad flag or unreachable endpoint
// panics; each prints one line naming the flag and exits non-zero.
func TestBadInputIsOneLineNamingTheFlag(t *testing.T) {
	cases := []struct {
		args     []string
		wantCode int
		wantErr  string
	}{
		{args: []string{"--endpoints", "http://127.0.0.1:1", "--dial-timeout", "300ms"}, wantCode: 1,
			wantErr: "leader: --endpoints http://127.0.0.1:1: etcd did not answer within --dial-timeout 300ms"},
		{args: []string{"--endpoints", "notaurl"}, wantCode: 2, wantErr: `--endpoints: "notaurl" is not a client URL`},
		{args: []string{"--endpoints", ","}, wantCode: 2, wantErr: "--endpoints: no endpoint"},
		{args: []string{"--controllers", "0"}, wantCode: 2, wantErr: "--controllers: must be at least 1"},
		{args: []string{"--controllers", "many"}, wantCode: 2, wantErr: "flag -controllers"},
		{args: []string{"--duration", "-1s"}, wantCode: 2, wantErr: "--duration: must be positive"},
		{args: []string{"--kill-after", "-1s"}, wantCode: 2, wantErr: "--kill-after"},
		{args: []string{"--interval", "0s"}, wantCode: 2, wantErr: "--interval"},
		{args: []string{"--ttl", "0"}, wantCode: 2, wantErr: "--ttl"},
		{args: []string{"--dial-timeout", "-1s"}, wantCode: 2, wantErr: "--dial-timeout"},
		{args: []string{"--key", "k.pem"}, wantCode: 2, wantErr: "--cert and --key"},
		{args: []string{"--password", "p"}, wantCode: 2, wantErr: "--password"},
		{args: []string{"--nope"}, wantCode: 2, wantErr: "-nope"},
	}
	for _, tc := range cases {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var stdout, stderr demotest.Buffer
			code := runMain(tc.args, &stdout, &stderr)
			require.Equal(t, tc.wantCode, code)
			require.Contains(t, stderr.String(), tc.wantErr)
			require.Equal(t, 1, strings.Count(stderr.String(), "\n"), "one line: %q", stderr.String())
		})
	}
}

func TestHelpFirstLineSaysWhatItShows(t *testing.T) {
	var stdout, stderr demotest.Buffer
	require.Equal(t, 0, runMain([]string{"--help"}, &stdout, &stderr))
	first, rest, _ := strings.Cut(stdout.String(), "\n")
	require.Equal(t, about, first)
	require.True(t, strings.HasPrefix(first, "leader shows "))
	for _, flag := range []string{"-endpoints", "-dial-timeout", "-cacert", "-cert", "-key", "-user", "-password", "-kill-after"} {
		require.Contains(t, rest, flag)
	}
	require.Empty(t, stderr.String())
}

// TestRunWithAuth runs the program against an etcd with TLS and
// authentication, as a user that may only read and write under the demo's
// prefix: elections, sessions, fencing and writes all work with that.
func TestRunWithAuth(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	certs := demotest.NewCerts(t)
	srv := demotest.NewTLSServer(t, certs)
	const prefix = "/leader-auth"
	demotest.EnableAuth(ctx, t, demotest.Admin(t, srv, certs), "rootpw", "leader", "leaderpw", prefix+"/")

	var stdout, stderr demotest.Buffer
	code := runMain([]string{
		"--endpoints", srv.Endpoints()[0], "--cacert", certs.CA, "--cert", certs.ClientCert, "--key", certs.ClientKey,
		"--user", "leader:leaderpw", "--prefix", prefix,
		"--duration", "1500ms", "--kill-after", "600ms", "--interval", "20ms", "--controllers", "2",
	}, &stdout, &stderr)
	require.Equal(t, 0, code, "stderr: %s\nstdout: %s", stderr.String(), stdout.String())
	require.Contains(t, stdout.String(), "terms in order (OK)\n")
	require.Contains(t, stdout.String(), "c2 leads")
	require.Empty(t, stderr.String())
}
