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

// TestRun runs the demo briefly on an embedded etcd with two forced leader
// changes: the log must match the counter and everything must be torn down
// (goleak).
func TestRun(t *testing.T) {
	demotest.RequireRun(t, "terms in order (OK)\n", func(ctx context.Context, out io.Writer) (bool, error) {
		return run(ctx, config{
			prefix:      "/leader-test",
			controllers: 3,
			duration:    2 * time.Second,
			killAfter:   700 * time.Millisecond,
			interval:    20 * time.Millisecond,
			ttl:         5,
			metricsAddr: "127.0.0.1:0",
		}, out)
	})
}

// TestBadInputIsOneLineNamingTheFlag: no bad flag or unreachable endpoint
// panics; each prints one line naming the flag and exits non-zero.
func TestBadInputIsOneLineNamingTheFlag(t *testing.T) {
	demotest.RequireBadInputs(t, runMain, []demotest.BadInput{
		{Args: []string{"--endpoints", "http://127.0.0.1:1", "--dial-timeout", "300ms"}, WantCode: 1,
			WantErr: "leader: --endpoints http://127.0.0.1:1: etcd did not answer within --dial-timeout 300ms"},
		{Args: []string{"--endpoints", "notaurl"}, WantCode: 2, WantErr: `--endpoints: "notaurl" is not a client URL`},
		{Args: []string{"--endpoints", ","}, WantCode: 2, WantErr: "--endpoints: no endpoint"},
		{Args: []string{"--controllers", "0"}, WantCode: 2, WantErr: "--controllers: must be at least 1"},
		{Args: []string{"--controllers", "many"}, WantCode: 2, WantErr: "flag -controllers"},
		{Args: []string{"--duration", "-1s"}, WantCode: 2, WantErr: "--duration: must be positive"},
		{Args: []string{"--kill-after", "-1s"}, WantCode: 2, WantErr: "--kill-after"},
		{Args: []string{"--interval", "0s"}, WantCode: 2, WantErr: "--interval"},
		{Args: []string{"--ttl", "0"}, WantCode: 2, WantErr: "--ttl"},
		{Args: []string{"--dial-timeout", "-1s"}, WantCode: 2, WantErr: "--dial-timeout"},
		{Args: []string{"--key", "k.pem"}, WantCode: 2, WantErr: "--cert and --key"},
		{Args: []string{"--password", "p"}, WantCode: 2, WantErr: "--password"},
		{Args: []string{"--nope"}, WantCode: 2, WantErr: "-nope"},
	})
}

func TestHelpFirstLineSaysWhatItShows(t *testing.T) {
	demotest.RequireHelp(t, runMain, "--help", about, "leader shows ",
		[]string{"-endpoints", "-dial-timeout", "-cacert", "-cert", "-key", "-user", "-password", "-kill-after"})
}

// TestRunWithAuth runs the program against an etcd with TLS and
// authentication, as a user that may only read and write under the demo's
// prefix: elections, sessions, fencing and writes all work with that.
func TestRunWithAuth(t *testing.T) {
	const prefix = "/leader-auth"
	conn := demotest.NewAuthServer(t, "leader", "leaderpw", prefix)
	stdout := demotest.RequireMain(t, runMain, append(conn,
		"--user", "leader:leaderpw", "--prefix", prefix,
		"--duration", "1500ms", "--kill-after", "600ms", "--interval", "20ms", "--controllers", "2",
	), "terms in order (OK)\n")
	require.Contains(t, stdout, "c2 leads")
}
