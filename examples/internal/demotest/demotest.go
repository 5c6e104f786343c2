// Package demotest starts etcd servers for the examples' tests: with TLS
// (certificates made on the fly) and with authentication enabled.
package demotest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"

	"github.com/etcdworker/orchestrator/examples/internal/demo"
	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// Certs are PEM files in a test's temporary directory: a self-signed CA, a
// server certificate for 127.0.0.1 and localhost, and a client certificate,
// all signed by the CA.
type Certs struct {
	CA, ServerCert, ServerKey, ClientCert, ClientKey string
}

// NewCerts makes a CA and a server and a client certificate signed by it.
func NewCerts(t testing.TB) Certs {
	t.Helper()
	dir := t.TempDir()
	caKey := newKey(t)
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "demotest CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	require.NoError(t, err)
	ca, err := x509.ParseCertificate(caDER)
	require.NoError(t, err)

	c := Certs{CA: filepath.Join(dir, "ca.pem")}
	writePEM(t, c.CA, "CERTIFICATE", caDER)
	c.ServerCert, c.ServerKey = issue(t, dir, "server", ca, caKey, 2, x509.ExtKeyUsageServerAuth)
	c.ClientCert, c.ClientKey = issue(t, dir, "client", ca, caKey, 3, x509.ExtKeyUsageClientAuth)
	return c
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	return key
}

// issue writes name.pem and name-key.pem: a certificate for 127.0.0.1 and
// localhost signed by ca.
func issue(t testing.TB, dir, name string, ca *x509.Certificate, caKey *ecdsa.PrivateKey,
	serial int64, usage x509.ExtKeyUsage,
) (certFile, keyFile string) {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: "demotest " + name},
		NotBefore:    ca.NotBefore,
		NotAfter:     ca.NotAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	require.NoError(t, err)
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	require.NoError(t, err)
	certFile, keyFile = filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
	writePEM(t, certFile, "CERTIFICATE", der)
	writePEM(t, keyFile, "PRIVATE KEY", keyDER)
	return certFile, keyFile
}

func writePEM(t testing.TB, path, kind string, der []byte) {
	t.Helper()
	data := pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der})
	require.NoError(t, os.WriteFile(path, data, 0o600))
}

// NewTLSServer starts an embedded etcd that serves clients only over TLS
// with certs and requires a client certificate signed by the CA. Its
// Endpoints are https:// URLs.
func NewTLSServer(t testing.TB, certs Certs) *etcdtest.Server {
	t.Helper()
	return etcdtest.NewServer(t, etcdtest.WithEmbedConfig(func(cfg *embed.Config) {
		cfg.ClientTLSInfo = transport.TLSInfo{
			CertFile:       certs.ServerCert,
			KeyFile:        certs.ServerKey,
			TrustedCAFile:  certs.CA,
			ClientCertAuth: true,
		}
		cfg.ListenClientUrls = httpsURLs(cfg.ListenClientUrls)
		cfg.AdvertiseClientUrls = httpsURLs(cfg.AdvertiseClientUrls)
		cfg.BcryptCost = 4 // the minimum: the tests authenticate often
	}))
}

func httpsURLs(urls []url.URL) []url.URL {
	out := make([]url.URL, len(urls))
	for i, u := range urls {
		u.Scheme = "https"
		out[i] = u
	}
	return out
}

// Conn returns the connection flags for srv with the client certificate.
func Conn(srv *etcdtest.Server, certs Certs) demo.ConnConfig {
	return demo.ConnConfig{
		Endpoints:   srv.Endpoints()[0],
		DialTimeout: 5 * time.Second,
		CACert:      certs.CA,
		Cert:        certs.ClientCert,
		Key:         certs.ClientKey,
	}
}

// Admin returns a client of the server authenticated with certs only (no
// user), closed by t.Cleanup. Once auth is enabled it can do nothing.
func Admin(t testing.TB, srv *etcdtest.Server, certs Certs) *clientv3.Client {
	t.Helper()
	cfg, err := Conn(srv, certs).ClientConfig()
	require.NoError(t, err)
	return etcdtest.NewClientFromConfig(t, cfg)
}

// EnableAuth creates the user root (password rootPassword, role root) and
// user (password password) with read and write access to every key that
// starts with prefix, then turns authentication on.
func EnableAuth(ctx context.Context, t testing.TB, cli *clientv3.Client, rootPassword, user, password, prefix string) {
	t.Helper()
	role := user + "-readwrite"
	require.NoError(t, etcdtest.EnableAuth(ctx, cli, rootPassword,
		[]etcdtest.AuthRole{{Name: role, Perm: clientv3.PermissionType(clientv3.PermReadWrite), Prefixes: []string{prefix}}},
		[]etcdtest.AuthUser{{Name: user, Password: password, Roles: []string{role}}}))
}

// NewAuthServer starts a TLS server (NewTLSServer) with authentication
// enabled (EnableAuth, root password "rootpw"): user, with password, may
// read and write under prefix + "/". It returns the flags that reach it:
// --endpoints and the certificates.
func NewAuthServer(t testing.TB, user, password, prefix string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	certs := NewCerts(t)
	srv := NewTLSServer(t, certs)
	EnableAuth(ctx, t, Admin(t, srv, certs), "rootpw", user, password, prefix+"/")
	return []string{"--endpoints", srv.Endpoints()[0], "--cacert", certs.CA, "--cert", certs.ClientCert, "--key", certs.ClientKey}
}

// Buffer is a bytes.Buffer that goroutines may write to concurrently, to
// capture a program's output.
type Buffer = etcdtest.Buffer
