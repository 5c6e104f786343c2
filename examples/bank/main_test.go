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

// TestRun runs the demo briefly on an embedded etcd: the invariant must
// hold and everything must be torn down (goleak).
func TestRun(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out demotest.Buffer
	ok, err := run(ctx, config{
		prefix:      "/bank-test",
		workers:     3,
		accounts:    5,
		perTick:     3,
		duration:    time.Second,
		interval:    2 * time.Millisecond,
		metricsAddr: "127.0.0.1:0",
	}, &out)
	require.NoError(t, err)
	require.True(t, ok)
	require.Contains(t, out.String(), "final sum: 0 (OK)\n")
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
			wantErr: "bank: --endpoints http://127.0.0.1:1: etcd did not answer within --dial-timeout 300ms"},
		{args: []string{"--endpoints", "notaurl"}, wantCode: 2, wantErr: `--endpoints: "notaurl" is not a client URL`},
		{args: []string{"--endpoints", ","}, wantCode: 2, wantErr: "--endpoints: no endpoint"},
		{args: []string{"--workers", "-1"}, wantCode: 2, wantErr: "--workers: must be at least 1"},
		{args: []string{"--workers", "x"}, wantCode: 2, wantErr: "flag -workers"},
		{args: []string{"--accounts", "1"}, wantCode: 2, wantErr: "--accounts"},
		{args: []string{"--transfers-per-tick", "0"}, wantCode: 2, wantErr: "--transfers-per-tick"},
		{args: []string{"--duration", "-1s"}, wantCode: 2, wantErr: "--duration: must be positive"},
		{args: []string{"--interval", "0s"}, wantCode: 2, wantErr: "--interval"},
		{args: []string{"--dial-timeout", "0s"}, wantCode: 2, wantErr: "--dial-timeout"},
		{args: []string{"--cert", "c.pem"}, wantCode: 2, wantErr: "--cert and --key"},
		{args: []string{"--user", "u"}, wantCode: 2, wantErr: "--user"},
		{args: []string{"--metrics-addr", "256.0.0.1:x"}, wantCode: 1, wantErr: "bank: --metrics-addr 256.0.0.1:x: "},
		{args: []string{"--nope"}, wantCode: 2, wantErr: "-nope"},
		{args: []string{"stray"}, wantCode: 2, wantErr: `unexpected argument "stray"`},
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
	for _, arg := range []string{"--help", "-h"} {
		var stdout, stderr demotest.Buffer
		require.Equal(t, 0, runMain([]string{arg}, &stdout, &stderr))
		first, rest, _ := strings.Cut(stdout.String(), "\n")
		require.Equal(t, about, first)
		require.True(t, strings.HasPrefix(first, "bank shows "))
		for _, flag := range []string{"-endpoints", "-dial-timeout", "-cacert", "-cert", "-key", "-user", "-password", "-duration"} {
			require.Contains(t, rest, flag)
		}
		require.Empty(t, stderr.String())
	}
}

// TestRunWithTLSAndAuth runs the program against an etcd that requires TLS
// client certificates and a password, as a user that may only read and write
// under the demo's prefix.
func TestRunWithTLSAndAuth(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	certs := demotest.NewCerts(t)
	srv := demotest.NewTLSServer(t, certs)
	const prefix = "/bank-auth"
	demotest.EnableAuth(ctx, t, demotest.Admin(t, srv, certs), "rootpw", "bank", "bankpw", prefix+"/")

	var stdout, stderr demotest.Buffer
	code := runMain([]string{
		"--endpoints", srv.Endpoints()[0], "--cacert", certs.CA, "--cert", certs.ClientCert, "--key", certs.ClientKey,
		"--user", "bank", "--password", "bankpw", "--prefix", prefix,
		"--duration", "1s", "--workers", "2", "--accounts", "5",
	}, &stdout, &stderr)
	require.Equal(t, 0, code, "stderr: %s\nstdout: %s", stderr.String(), stdout.String())
	require.Contains(t, stdout.String(), "final sum: 0 (OK)\n")
	require.NotContains(t, stdout.String(), " 0 transfers")
	require.Empty(t, stderr.String())
}
