// Package embedetcd starts embedded etcd members (go.etcd.io/etcd/server/v3/embed)
// bound to 127.0.0.1. It is deliberately free of the testing package so that
// example programs and benchmarks can use it; test helpers built on top of it
// live in internal/etcdtest.
package embedetcd

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"sync"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/storage/mvcc"
)

// Member describes the identity and addresses of one member to launch.
type Member struct {
	// Name is the member name (default "etcd0").
	Name string
	// Dir is the data directory; it is created if missing.
	Dir string
	// ClientURL is the URL the member listens on for clients,
	// e.g. "http://127.0.0.1:23790".
	ClientURL string
	// AdvertiseClientURL is published in the member list (default ClientURL).
	AdvertiseClientURL string
	// PeerURL is the URL the member listens on for peers.
	PeerURL string
	// AdvertisePeerURL is published to peers (default PeerURL).
	AdvertisePeerURL string
	// InitialCluster is the "name=advertisedPeerURL,..." list (default
	// Name=AdvertisePeerURL).
	InitialCluster string
	// ClusterToken is the initial cluster token (default "embedetcd").
	ClusterToken string
	// Existing marks a restart or join of an existing cluster
	// (initial-cluster-state=existing).
	Existing bool
}

// Server is one running (or stopped) embedded etcd member.
type Server struct {
	member    Member
	opts      Options
	etcd      *embed.Etcd
	closeOnce sync.Once
}

func mustURL(s string) (url.URL, error) {
	u, err := url.Parse(s)
	if err != nil {
		return url.URL{}, err
	}
	if u.Host == "" {
		return url.URL{}, fmt.Errorf("embedetcd: URL %q has no host", s)
	}
	return *u, nil
}

// Config builds the embed.Config for m with the given options applied.
func Config(m Member, opts Options) (*embed.Config, error) {
	m = m.withDefaults()
	urls, err := parseURLs(m.ClientURL, m.AdvertiseClientURL, m.PeerURL, m.AdvertisePeerURL)
	if err != nil {
		return nil, err
	}

	cfg := embed.NewConfig()
	cfg.Name = m.Name
	cfg.Dir = m.Dir
	cfg.ListenClientUrls = []url.URL{urls[0]}
	cfg.AdvertiseClientUrls = []url.URL{urls[1]}
	cfg.ListenPeerUrls = []url.URL{urls[2]}
	cfg.AdvertisePeerUrls = []url.URL{urls[3]}
	cfg.InitialCluster = m.InitialCluster
	cfg.InitialClusterToken = m.ClusterToken
	cfg.ClusterState = embed.ClusterStateFlagNew
	if m.Existing {
		cfg.ClusterState = embed.ClusterStateFlagExisting
	}
	applyOptions(cfg, opts)
	return cfg, nil
}

// withDefaults fills in the fields of m left empty.
func (m Member) withDefaults() Member {
	if m.Name == "" {
		m.Name = "etcd0"
	}
	if m.AdvertiseClientURL == "" {
		m.AdvertiseClientURL = m.ClientURL
	}
	if m.AdvertisePeerURL == "" {
		m.AdvertisePeerURL = m.PeerURL
	}
	if m.InitialCluster == "" {
		m.InitialCluster = m.Name + "=" + m.AdvertisePeerURL
	}
	if m.ClusterToken == "" {
		m.ClusterToken = "embedetcd"
	}
	return m
}

// parseURLs parses each of raw with mustURL, in order.
func parseURLs(raw ...string) ([]url.URL, error) {
	urls := make([]url.URL, len(raw))
	for i, r := range raw {
		u, err := mustURL(r)
		if err != nil {
			return nil, err
		}
		urls[i] = u
	}
	return urls, nil
}

// applyOptions sets the server settings of opts, and the fixed ones every
// member shares, on cfg.
func applyOptions(cfg *embed.Config, opts Options) {
	cfg.TickMs = opts.TickMs
	cfg.ElectionMs = opts.ElectionMs
	if opts.MaxTxnOps > 0 {
		cfg.MaxTxnOps = opts.MaxTxnOps
	}
	if opts.MaxRequestBytes > 0 {
		cfg.MaxRequestBytes = opts.MaxRequestBytes
	}
	if opts.QuotaBackendBytes > 0 {
		cfg.QuotaBackendBytes = opts.QuotaBackendBytes
	}
	// No auto-compaction: tests compact explicitly.
	cfg.AutoCompactionMode = embed.CompactorModeRevision
	cfg.AutoCompactionRetention = "0"
	cfg.UnsafeNoFsync = !opts.Fsync
	// Fewer goroutines and listeners: no HTTP/JSON gateway.
	cfg.EnableGRPCGateway = false
	// Go's listeners set SO_REUSEADDR anyway; be explicit so a restarted
	// member can rebind ports that still have connections in TIME_WAIT.
	cfg.SocketOpts.ReuseAddress = true
	cfg.Logger = "zap"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(opts.Logger)
	// etcd 3.6's NewConfig left this at 0, which logs every request as slow.
	if cfg.WarningUnaryRequestDuration == 0 {
		cfg.WarningUnaryRequestDuration = embed.DefaultWarningUnaryRequestDuration
	}
	if opts.Configure != nil {
		opts.Configure(cfg)
	}
}

// Launch starts member m without waiting for it to become ready (a member of
// a multi-member cluster only becomes ready once a quorum is up). Use
// WaitReady afterwards. On error nothing is left running.
func Launch(m Member, opts ...Option) (*Server, error) {
	o := ResolveOptions(opts...)
	if m.Name == "" {
		m.Name = "etcd0"
	}
	if err := os.MkdirAll(m.Dir, 0o700); err != nil {
		return nil, err
	}
	cfg, err := Config(m, o)
	if err != nil {
		return nil, err
	}
	countStart(m)
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("embedetcd: start %s: %w", m.Name, err)
	}
	return &Server{member: m, opts: o, etcd: e}, nil
}

// WaitReady blocks until the member is ready to serve clients, it fails, or
// ctx is done. It does not stop the member on error.
func (s *Server) WaitReady(ctx context.Context) error {
	select {
	case <-s.etcd.Server.ReadyNotify():
		return nil
	case err, ok := <-s.etcd.Err():
		if !ok {
			return fmt.Errorf("embedetcd: %s stopped before becoming ready", s.member.Name)
		}
		return fmt.Errorf("embedetcd: %s failed before becoming ready: %w", s.member.Name, err)
	case <-s.etcd.Server.StopNotify():
		return fmt.Errorf("embedetcd: %s stopped before becoming ready", s.member.Name)
	case <-ctx.Done():
		return fmt.Errorf("embedetcd: %s not ready: %w", s.member.Name, ctx.Err())
	}
}

// Start launches a single-member cluster with its data in dir, on freshly
// picked 127.0.0.1 ports, and waits until it is ready (bounded by ctx and by
// the ReadyTimeout option). A dir that holds a member's data already is
// restarted with it. A start that loses a port race is retried with new
// ports. The caller must Close the returned Server.
func Start(ctx context.Context, dir string, opts ...Option) (*Server, error) {
	o := ResolveOptions(opts...)
	fresh, err := isEmptyDir(dir)
	if err != nil {
		return nil, err
	}
	var lastErr error
	for attempt := range 8 {
		if attempt > 0 && fresh {
			// A failed start may have written into dir; begin afresh. A dir
			// that held data before is never emptied: it is the caller's.
			if err := os.RemoveAll(dir); err != nil {
				return nil, err
			}
		}
		curl, err := PickURL()
		if err != nil {
			return nil, err
		}
		purl, err := PickURL()
		if err != nil {
			return nil, err
		}
		s, err := Launch(Member{Dir: dir, ClientURL: curl, PeerURL: purl}, opts...)
		if err != nil {
			lastErr = err
			if IsAddrInUse(err) {
				continue
			}
			return nil, err
		}
		rctx, cancel := context.WithTimeout(ctx, o.ReadyTimeout)
		err = s.WaitReady(rctx)
		cancel()
		if err != nil {
			s.Close()
			return nil, err
		}
		return s, nil
	}
	return nil, fmt.Errorf("embedetcd: giving up after repeated port conflicts: %w", lastErr)
}

// isEmptyDir reports whether dir is missing or empty.
func isEmptyDir(dir string) (bool, error) {
	entries, err := os.ReadDir(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return true, nil
	case err != nil:
		return false, fmt.Errorf("embedetcd: data dir: %w", err)
	}
	return len(entries) == 0, nil
}

// Endpoints returns the client URLs the member listens on.
func (s *Server) Endpoints() []string {
	out := make([]string, 0, len(s.etcd.Clients))
	for _, u := range s.etcd.Config().ListenClientUrls {
		out = append(out, u.String())
	}
	return out
}

// Member returns the description the member was launched with (defaults
// filled in for Name).
func (s *Server) Member() Member { return s.member }

// Etcd returns the underlying embed.Etcd.
func (s *Server) Etcd() *embed.Etcd { return s.etcd }

// Dir returns the member's data directory.
func (s *Server) Dir() string { return s.member.Dir }

// Close stops the member and waits until its goroutines and listeners are
// gone. It is idempotent. Note that etcd waits up to its request timeout
// (about 5s + 2 election timeouts) for open client streams such as watches,
// so close clients first.
func (s *Server) Close() {
	s.closeOnce.Do(func() { s.etcd.Close() })
}

// Stopped returns a channel closed once the member's etcd server has stopped.
func (s *Server) Stopped() <-chan struct{} { return s.etcd.Server.StopNotify() }

// Revision returns the member's current store revision.
func (s *Server) Revision() int64 { return s.etcd.Server.KV().Rev() }

// Compact physically compacts the key-value history up to rev, through raft
// (so it also applies to the other members of a cluster). Compacting at or
// below the already-compacted revision is not an error.
func (s *Server) Compact(ctx context.Context, rev int64) error {
	_, err := s.etcd.Server.Compact(ctx, &pb.CompactionRequest{Revision: rev, Physical: true})
	if errors.Is(err, mvcc.ErrCompacted) {
		return nil
	}
	return err
}

// CompactAll physically compacts at the current revision and returns it.
func (s *Server) CompactAll(ctx context.Context) (int64, error) {
	rev := s.Revision()
	return rev, s.Compact(ctx, rev)
}
