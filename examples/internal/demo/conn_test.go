package demo_test

import (
	"context"
	"crypto/tls"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator/examples/internal/demo"
	"github.com/etcdworker/orchestrator/examples/internal/demotest"
)

func TestParseEndpoints(t *testing.T) {
	cases := []struct {
		in      string
		want    []string
		wantErr string
	}{
		{in: "http://127.0.0.1:2379", want: []string{"http://127.0.0.1:2379"}},
		{in: " https://a:1 , http://[::1]:2/ ,", want: []string{"https://a:1", "http://[::1]:2"}},
		{in: "notaurl", wantErr: `--endpoints: "notaurl" is not a client URL`},
		{in: "127.0.0.1:2379", wantErr: `"127.0.0.1:2379" is not a client URL`},
		{in: "http://127.0.0.1", wantErr: "is not a client URL"},
		{in: "ftp://127.0.0.1:1", wantErr: "is not a client URL"},
		{in: "http://127.0.0.1:1/path", wantErr: "is not a client URL"},
		{in: "http://u:p@127.0.0.1:1", wantErr: "is not a client URL"},
		{in: "http://%zz", wantErr: "is not a client URL"},
		{in: ",", wantErr: `--endpoints: no endpoint in ","`},
		{in: " ", wantErr: "--endpoints: no endpoint"},
	}
	for _, tc := range cases {
		t.Run(tc.in, func(t *testing.T) {
			got, err := demo.ParseEndpoints(tc.in)
			if tc.wantErr != "" {
				require.ErrorContains(t, err, tc.wantErr)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
		})
	}
}

func TestConnConfigValidateNamesTheFlag(t *testing.T) {
	certs := demotest.NewCerts(t)
	const tlsEP = "https://127.0.0.1:2379"
	cases := []struct {
		name    string
		conn    demo.ConnConfig
		wantErr string // "" means valid
	}{
		{name: "embedded", conn: demo.ConnConfig{}},
		{name: "endpoint", conn: demo.ConnConfig{Endpoints: "http://127.0.0.1:2379"}},
		{name: "bad endpoint", conn: demo.ConnConfig{Endpoints: "notaurl"}, wantErr: "--endpoints"},
		{name: "negative dial timeout", conn: demo.ConnConfig{DialTimeout: -time.Second}, wantErr: "--dial-timeout"},
		{name: "user and password", conn: demo.ConnConfig{Endpoints: tlsEP, User: "u", Password: "p"}},
		{name: "user:password", conn: demo.ConnConfig{Endpoints: tlsEP, User: "u:p"}},
		{name: "user alone", conn: demo.ConnConfig{Endpoints: tlsEP, User: "u"}, wantErr: "--user: needs --password"},
		{name: "empty user name", conn: demo.ConnConfig{Endpoints: tlsEP, User: ":p"}, wantErr: "--user"},
		{name: "password alone", conn: demo.ConnConfig{Endpoints: tlsEP, Password: "p"}, wantErr: "--password: needs --user"},
		{name: "auth without endpoints", conn: demo.ConnConfig{User: "u", Password: "p"}, wantErr: "need --endpoints"},
		{name: "tls", conn: demo.ConnConfig{Endpoints: tlsEP, CACert: certs.CA, Cert: certs.ClientCert, Key: certs.ClientKey}},
		{name: "tls without endpoints", conn: demo.ConnConfig{CACert: certs.CA}, wantErr: "need --endpoints"},
		{name: "tls over http", conn: demo.ConnConfig{Endpoints: "http://127.0.0.1:1", CACert: certs.CA}, wantErr: "must be an https:// URL"},
		{name: "cert without key", conn: demo.ConnConfig{Endpoints: tlsEP, Cert: certs.ClientCert}, wantErr: "--cert and --key"},
		{name: "key without cert", conn: demo.ConnConfig{Endpoints: tlsEP, Key: certs.ClientKey}, wantErr: "--cert and --key"},
		{name: "missing CA file", conn: demo.ConnConfig{Endpoints: tlsEP, CACert: filepath.Join(t.TempDir(), "none")}, wantErr: "--cacert: open"},
		{name: "CA file not PEM", conn: demo.ConnConfig{Endpoints: tlsEP, CACert: certs.ClientKey}, wantErr: "--cacert: no PEM certificate"},
		{name: "key does not match", conn: demo.ConnConfig{Endpoints: tlsEP, Cert: certs.ClientCert, Key: certs.ServerKey}, wantErr: "--cert/--key"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.conn.Validate()
			_, cfgErr := tc.conn.ClientConfig()
			if tc.wantErr == "" {
				require.NoError(t, err)
				require.NoError(t, cfgErr)
				return
			}
			require.ErrorContains(t, err, tc.wantErr)
			require.ErrorContains(t, cfgErr, tc.wantErr)
			require.NotContains(t, err.Error(), "\n")
		})
	}
}

func TestClientConfigBuildsTLSAndCredentials(t *testing.T) {
	certs := demotest.NewCerts(t)
	conn := demo.ConnConfig{
		Endpoints: "https://127.0.0.1:2379", CACert: certs.CA, Cert: certs.ClientCert, Key: certs.ClientKey,
		User: "bank:secret",
	}
	cfg, err := conn.ClientConfig()
	require.NoError(t, err)
	require.Equal(t, []string{"https://127.0.0.1:2379"}, cfg.Endpoints)
	require.Equal(t, demo.DefaultDialTimeout, cfg.DialTimeout)
	require.Equal(t, "bank", cfg.Username)
	require.Equal(t, "secret", cfg.Password)
	require.NotNil(t, cfg.TLS)
	require.NotNil(t, cfg.TLS.RootCAs)
	require.Len(t, cfg.TLS.Certificates, 1)
	require.Equal(t, uint16(tls.VersionTLS12), cfg.TLS.MinVersion)

	// No TLS flag: no TLS configuration (https:// would use system roots).
	tlsCfg, err := demo.ConnConfig{Endpoints: "https://127.0.0.1:2379"}.TLSConfig()
	require.NoError(t, err)
	require.Nil(t, tlsCfg)
}

// TestConnectUnreachableFailsWithinDialTimeout: the error names the flag and
// nothing panics or leaks (goleak).
func TestConnectUnreachableFailsWithinDialTimeout(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	c, err := demo.Connect(ctx, demo.ConnConfig{Endpoints: "http://127.0.0.1:1", DialTimeout: 300 * time.Millisecond})
	require.Nil(t, c)
	require.ErrorContains(t, err, "--endpoints http://127.0.0.1:1: etcd did not answer within --dial-timeout 300ms")
	require.Less(t, time.Since(start), 10*time.Second)

	_, err = demo.Connect(ctx, demo.ConnConfig{Endpoints: ","})
	require.ErrorContains(t, err, "--endpoints: no endpoint")
}

// TestConnectTLSWithAuth connects to an etcd that requires TLS client
// certificates and has authentication on: the user can write under its
// prefix only, and a wrong password or a missing CA is reported by flag.
func TestConnectTLSWithAuth(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	certs := demotest.NewCerts(t)
	srv := demotest.NewTLSServer(t, certs)
	require.True(t, strings.HasPrefix(srv.Endpoints()[0], "https://"))
	demotest.EnableAuth(ctx, t, demotest.Admin(t, srv, certs), "rootpw", "app", "apppw", "/app/")

	conn := demotest.Conn(srv, certs)
	conn.User, conn.Password = "app", "apppw"
	c, err := demo.Connect(ctx, conn)
	require.NoError(t, err)
	defer c.Close()
	_, err = c.Client.Put(ctx, "/app/k", "v")
	require.NoError(t, err)
	_, err = c.Client.Put(ctx, "/other", "v")
	require.ErrorContains(t, err, "permission denied")

	wrong := conn
	wrong.Password = "nope"
	_, err = demo.Connect(ctx, wrong)
	require.ErrorContains(t, err, "--user/--password")

	noCA := conn
	noCA.CACert, noCA.DialTimeout = "", 500*time.Millisecond
	_, err = demo.Connect(ctx, noCA)
	require.ErrorContains(t, err, "--endpoints")
}
