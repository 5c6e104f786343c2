package main

import (
	"context"
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
	demotest.RequireBadInputs(t, runMain, []demotest.BadInput{
		{Args: []string{"--endpoints", "http://127.0.0.1:1", "--dial-timeout", "300ms"}, WantCode: 1,
			WantErr: "bank: --endpoints http://127.0.0.1:1: etcd did not answer within --dial-timeout 300ms"},
		{Args: []string{"--endpoints", "notaurl"}, WantCode: 2, WantErr: `--endpoints: "notaurl" is not a client URL`},
		{Args: []string{"--endpoints", ","}, WantCode: 2, WantErr: "--endpoints: no endpoint"},
		{Args: []string{"--workers", "-1"}, WantCode: 2, WantErr: "--workers: must be at least 1"},
		{Args: []string{"--workers", "x"}, WantCode: 2, WantErr: "flag -workers"},
		{Args: []string{"--accounts", "1"}, WantCode: 2, WantErr: "--accounts"},
		{Args: []string{"--transfers-per-tick", "0"}, WantCode: 2, WantErr: "--transfers-per-tick"},
		{Args: []string{"--duration", "-1s"}, WantCode: 2, WantErr: "--duration: must be positive"},
		{Args: []string{"--interval", "0s"}, WantCode: 2, WantErr: "--interval"},
		{Args: []string{"--dial-timeout", "0s"}, WantCode: 2, WantErr: "--dial-timeout"},
		{Args: []string{"--cert", "c.pem"}, WantCode: 2, WantErr: "--cert and --key"},
		{Args: []string{"--user", "u"}, WantCode: 2, WantErr: "--user"},
		{Args: []string{"--metrics-addr", "256.0.0.1:x"}, WantCode: 1, WantErr: "bank: --metrics-addr 256.0.0.1:x: "},
		{Args: []string{"--nope"}, WantCode: 2, WantErr: "-nope"},
		{Args: []string{"stray"}, WantCode: 2, WantErr: `unexpected argument "stray"`},
	})
}

func TestHelpFirstLineSaysWhatItShows(t *testing.T) {
	for _, arg := range []string{"--help", "-h"} {
		demotest.RequireHelp(t, runMain, arg, about, "bank shows ",
			[]string{"-endpoints", "-dial-timeout", "-cacert", "-cert", "-key", "-user", "-password", "-duration"})
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
