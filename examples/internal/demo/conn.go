package demo

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// DefaultDialTimeout is the default of --dial-timeout.
const DefaultDialTimeout = 5 * time.Second

// ConnConfig is how to reach etcd: the connection flags every example shares.
// The zero value means an embedded etcd.
type ConnConfig struct {
	// Endpoints are comma-separated client URLs (--endpoints); empty means
	// an embedded etcd in a temporary directory.
	Endpoints string
	// DialTimeout bounds connecting and the first request (--dial-timeout;
	// zero means DefaultDialTimeout).
	DialTimeout time.Duration
	// CACert, Cert and Key are PEM files (--cacert, --cert, --key): the CA
	// that signed the server certificate and the client certificate and key.
	CACert, Cert, Key string
	// User and Password authenticate the client (--user, --password). User
	// may also be "name:password", as with etcdctl.
	User, Password string
}

// Register defines the connection flags on fs, storing into c.
func (c *ConnConfig) Register(fs *flag.FlagSet) {
	fs.StringVar(&c.Endpoints, "endpoints", "", "comma-separated etcd client URLs, e.g. https://10.0.0.1:2379 (default: an embedded etcd in a temp dir)")
	fs.DurationVar(&c.DialTimeout, "dial-timeout", DefaultDialTimeout, "give up when etcd does not answer within this time")
	fs.StringVar(&c.CACert, "cacert", "", "verify the etcd server certificate with this PEM CA bundle (needs https:// endpoints)")
	fs.StringVar(&c.Cert, "cert", "", "client certificate PEM file for TLS client authentication (with --key)")
	fs.StringVar(&c.Key, "key", "", "client private key PEM file (with --cert)")
	fs.StringVar(&c.User, "user", "", "etcd user name, or name:password")
	fs.StringVar(&c.Password, "password", "", "password of --user")
}

// ValidateFlags is Validate for a parsed command line, where --dial-timeout
// must also be positive (its flag default is DefaultDialTimeout).
func (c ConnConfig) ValidateFlags() error {
	return FirstError(Positive("--dial-timeout", c.DialTimeout), c.Validate())
}

// Validate checks the flags, including that the TLS files can be loaded,
// without touching the network. Its errors name the flag at fault.
func (c ConnConfig) Validate() error {
	if err := NotNegative("--dial-timeout", c.DialTimeout); err != nil {
		return err
	}
	if (c.Cert == "") != (c.Key == "") {
		return errors.New("--cert and --key: give both or neither")
	}
	if _, _, err := c.credentials(); err != nil {
		return err
	}
	if _, err := c.TLSConfig(); err != nil {
		return err
	}
	tlsFlags := c.CACert != "" || c.Cert != ""
	if c.Endpoints == "" {
		if tlsFlags || c.User != "" || c.Password != "" {
			return errors.New("--cacert, --cert, --key, --user and --password need --endpoints (the embedded etcd has neither TLS nor users)")
		}
		return nil
	}
	eps, err := ParseEndpoints(c.Endpoints)
	if err != nil {
		return err
	}
	if tlsFlags {
		for _, ep := range eps {
			if !strings.HasPrefix(ep, "https://") {
				return fmt.Errorf("--endpoints: %q must be an https:// URL when --cacert or --cert is given", ep)
			}
		}
	}
	return nil
}

// credentials returns the user name and password from --user and --password.
func (c ConnConfig) credentials() (user, password string, err error) {
	user, password = c.User, c.Password
	if user == "" {
		if password != "" {
			return "", "", errors.New("--password: needs --user")
		}
		return "", "", nil
	}
	if password == "" {
		var ok bool
		if user, password, ok = strings.Cut(user, ":"); !ok {
			return "", "", errors.New("--user: needs --password (or --user name:password)")
		}
	}
	if user == "" {
		return "", "", errors.New("--user: the user name is empty")
	}
	return user, password, nil
}

// ParseEndpoints splits the comma-separated --endpoints value into client
// URLs. Each must be an http:// or https:// URL with a host and port; empty
// items are skipped, but at least one endpoint must remain.
func ParseEndpoints(s string) ([]string, error) {
	var eps []string
	for _, e := range strings.Split(s, ",") {
		e = strings.TrimSpace(e)
		if e == "" {
			continue
		}
		u, err := url.Parse(e)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" ||
			u.Port() == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil {
			return nil, fmt.Errorf("--endpoints: %q is not a client URL such as http://127.0.0.1:2379", e)
		}
		if _, _, err := net.SplitHostPort(u.Host); err != nil {
			return nil, fmt.Errorf("--endpoints: %q: %w", e, err)
		}
		eps = append(eps, u.Scheme+"://"+u.Host)
	}
	if len(eps) == 0 {
		return nil, fmt.Errorf("--endpoints: no endpoint in %q", s)
	}
	return eps, nil
}

// TLSConfig returns the TLS configuration from --cacert, --cert and --key,
// or nil when none is given (https:// endpoints then use the system roots).
// Its errors name the flag whose file could not be used.
func (c ConnConfig) TLSConfig() (*tls.Config, error) {
	if c.CACert == "" && c.Cert == "" && c.Key == "" {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.CACert != "" {
		pem, err := os.ReadFile(c.CACert)
		if err != nil {
			return nil, fmt.Errorf("--cacert: %w", err)
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--cacert: no PEM certificate in %s", c.CACert)
		}
	}
	if c.Cert != "" || c.Key != "" {
		if c.Cert == "" || c.Key == "" {
			return nil, errors.New("--cert and --key: give both or neither")
		}
		pair, err := tls.LoadX509KeyPair(c.Cert, c.Key)
		if err != nil {
			return nil, fmt.Errorf("--cert/--key: %s", oneLine(err.Error()))
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}

// ClientConfig returns the client configuration for the flags: endpoints,
// dial timeout, TLS and credentials. Its errors name the flag at fault.
func (c ConnConfig) ClientConfig() (clientv3.Config, error) {
	if err := c.Validate(); err != nil {
		return clientv3.Config{}, err
	}
	var cfg clientv3.Config
	if c.Endpoints != "" {
		eps, err := ParseEndpoints(c.Endpoints)
		if err != nil {
			return clientv3.Config{}, err
		}
		cfg.Endpoints = eps
	}
	tlsCfg, err := c.TLSConfig()
	if err != nil {
		return clientv3.Config{}, err
	}
	cfg.TLS = tlsCfg
	if cfg.Username, cfg.Password, err = c.credentials(); err != nil {
		return clientv3.Config{}, err
	}
	cfg.DialTimeout = c.dialTimeout()
	cfg.Logger = zap.NewNop()
	return cfg, nil
}

func (c ConnConfig) dialTimeout() time.Duration {
	if c.DialTimeout <= 0 {
		return DefaultDialTimeout
	}
	return c.DialTimeout
}

// oneLine joins the lines of s, so that every error is printed on one line.
func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", " ")), " ")
}
