package main

import (
	"context"
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator/examples/internal/demotest"
)

func TestMain(m *testing.M) {
	demotest.Main(m)
}

// TestRun runs the demo briefly on an embedded etcd: the invariant must
// hold and everything must be torn down (goleak).
func TestRun(t *testing.T) {
	demotest.RequireRun(t, "final sum: 0 (OK)\n", func(ctx context.Context, out io.Writer) (bool, error) {
		return run(ctx, config{
			prefix:      "/bank-test",
			workers:     3,
			accounts:    5,
			perTick:     3,
			duration:    time.Second,
			interval:    2 * time.Millisecond,
			metricsAddr: "127.0.0.1:0",
		}, out)
	})
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
	const prefix = "/bank-auth"
	conn := demotest.NewAuthServer(t, "bank", "bankpw", prefix)
	stdout := demotest.RequireMain(t, runMain, append(conn,
		"--user", "bank", "--password", "bankpw", "--prefix", prefix,
		"--duration", "1s", "--workers", "2", "--accounts", "5",
	), "final sum: 0 (OK)\n")
	require.NotContains(t, stdout, " 0 transfers")
}
