package etcdtest

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"

	"github.com/etcdworker/orchestrator/internal/embedetcd"
)

var clusterSeq atomic.Int64

// Cluster is a multi-member etcd cluster embedded in the test process.
//
// Clients reach member i through a Proxy (Member(i).Proxy()) whose address
// stays the same across StopMember/RestartMember and is also what the member
// advertises as its client URL. Stopping a member first cuts its proxy, so
// client streams (watches, keep-alives) are dropped at once instead of
// delaying the shutdown by etcd's ~6s request timeout, and clients see the
// member as down immediately. Peer traffic does not go through the proxies.
//
// Methods may be called from several goroutines, but operations on the same
// member must not overlap.
type Cluster struct {
	t       testing.TB
	opts    []ServerOption
	o       embedetcd.Options
	members []*Member

	mu sync.Mutex // guards Member.srv
}

// Member is one member of a Cluster.
type Member struct {
	c       *Cluster
	index   int
	name    string
	dir     string
	peerURL string
	initial string
	token   string
	proxy   *Proxy
	id      uint64
	srv     *embedetcd.Server // nil while stopped; guarded by c.mu
}

// NewCluster starts a size-member cluster on 127.0.0.1 with data under
// t.TempDir(), waits until every member is ready and registers its Close with
// t.Cleanup. The test fails if the cluster does not come up.
func NewCluster(t testing.TB, size int, opts ...ServerOption) *Cluster {
	t.Helper()
	if size < 1 {
		t.Fatalf("etcdtest: cluster size %d", size)
	}
	c := &Cluster{t: t, opts: opts, o: embedetcd.ResolveOptions(opts...)}
	for i := range size {
		c.members = append(c.members, &Member{
			c:     c,
			index: i,
			name:  fmt.Sprintf("m%d", i),
			// The proxy is created before any member: its address is the
			// member's advertised client URL for the cluster's lifetime.
			proxy: NewProxy(t, "127.0.0.1:1"),
		})
		c.members[i].proxy.Pause() // until the member is launched
	}
	// Registered after the proxies' cleanups, so it runs before them.
	t.Cleanup(c.Close)

	var lastErr error
	for range 6 {
		err := c.launchAll()
		if err == nil {
			lastErr = nil
			break
		}
		lastErr = err
		if !embedetcd.IsAddrInUse(err) {
			break
		}
	}
	if lastErr != nil {
		t.Fatalf("etcdtest: start cluster: %v", lastErr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.o.ReadyTimeout)
	defer cancel()
	if err := c.waitReady(ctx, c.members); err != nil {
		t.Fatalf("etcdtest: cluster not ready: %v", err)
	}
	for _, m := range c.members {
		m.id = uint64(m.srv.Etcd().Server.MemberID())
	}
	return c
}

// launchAll starts every member with fresh ports and data directories. On
// error all launched members are closed.
func (c *Cluster) launchAll() error {
	token := fmt.Sprintf("etcdtest-%d-%d", time.Now().UnixNano(), clusterSeq.Add(1))
	base := c.t.TempDir()
	var initial []string
	for _, m := range c.members {
		purl, err := embedetcd.PickURL()
		if err != nil {
			return err
		}
		m.peerURL = purl
		m.dir = filepath.Join(base, m.name)
		m.token = token
		initial = append(initial, m.name+"="+purl)
	}
	for _, m := range c.members {
		m.initial = strings.Join(initial, ",")
	}
	for _, m := range c.members {
		if err := c.launch(m, false); err != nil {
			c.stopAll()
			return err
		}
	}
	return nil
}

// launch starts m's etcd (not waiting for readiness) on its peer URL and a
// fresh client port, and points its proxy there.
func (c *Cluster) launch(m *Member, existing bool) error {
	curl, err := embedetcd.PickURL()
	if err != nil {
		return err
	}
	srv, err := embedetcd.Launch(embedetcd.Member{
		Name:               m.name,
		Dir:                m.dir,
		ClientURL:          curl,
		AdvertiseClientURL: m.proxy.Endpoint(),
		PeerURL:            m.peerURL,
		InitialCluster:     m.initial,
		ClusterToken:       m.token,
		Existing:           existing,
	}, c.opts...)
	if err != nil {
		return err
	}
	if err := m.proxy.SetTarget(curl); err != nil {
		srv.Close()
		return err
	}
	c.mu.Lock()
	m.srv = srv
	c.mu.Unlock()
	m.proxy.Resume()
	return nil
}

func (c *Cluster) waitReady(ctx context.Context, ms []*Member) error {
	for _, m := range ms {
		srv := m.server()
		if srv == nil {
			return fmt.Errorf("member %d is stopped", m.index)
		}
		if err := srv.WaitReady(ctx); err != nil {
			return err
		}
	}
	return nil
}

// stopAll stops all running members: followers first, then the leader
// (which then has nobody left to hand leadership to).
func (c *Cluster) stopAll() {
	lead := c.leaderIndex()
	for i, m := range c.members {
		if i != lead {
			m.stop()
		}
	}
	if lead >= 0 {
		c.members[lead].stop()
	}
}

// Close stops all members. It is idempotent and also run by t.Cleanup.
func (c *Cluster) Close() { c.stopAll() }

// Size returns the number of members.
func (c *Cluster) Size() int { return len(c.members) }

// Endpoints returns the client endpoints (proxy URLs) of all members,
// running or not.
func (c *Cluster) Endpoints() []string {
	out := make([]string, len(c.members))
	for i, m := range c.members {
		out[i] = m.Endpoint()
	}
	return out
}

// Client returns a new client using all members' endpoints, closed by
// t.Cleanup.
func (c *Cluster) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	return NewClient(t, c.Endpoints()...)
}

// Member returns member i (0 <= i < Size()).
func (c *Cluster) Member(i int) *Member { return c.members[i] }

// StopMember stops member i (cutting its proxy first) and frees its ports.
// Stopping a leader makes etcd hand leadership to another member first.
func (c *Cluster) StopMember(t testing.TB, i int) {
	t.Helper()
	c.members[i].stop()
}

// RestartMember restarts stopped member i with its old data directory and
// peer URL and waits until it is ready (which needs a quorum of running
// members). The test fails if it cannot.
func (c *Cluster) RestartMember(t testing.TB, i int) {
	t.Helper()
	c.RestartMembers(t, i)
}

// RestartMembers restarts the given stopped members together and waits until
// all are ready; use it when none could become ready alone (lost quorum).
func (c *Cluster) RestartMembers(t testing.TB, indexes ...int) {
	t.Helper()
	var ms []*Member
	for _, i := range indexes {
		m := c.members[i]
		if m.Running() {
			t.Fatalf("etcdtest: member %d is running", i)
		}
		ms = append(ms, m)
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.o.ReadyTimeout)
	defer cancel()
	for _, m := range ms {
		if err := c.relaunch(ctx, m); err != nil {
			t.Fatalf("etcdtest: restart member %d: %v", m.index, err)
		}
	}
	if err := c.waitReady(ctx, ms); err != nil {
		t.Fatalf("etcdtest: restarted members not ready: %v", err)
	}
}

// relaunch starts a stopped member, retrying while its peer port is still
// (or again) in use.
func (c *Cluster) relaunch(ctx context.Context, m *Member) error {
	for {
		err := c.launch(m, true)
		if err == nil || !embedetcd.IsAddrInUse(err) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// leaderIndex returns the index of the leader all running members agree on,
// or -1.
func (c *Cluster) leaderIndex() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	var lead uint64
	for _, m := range c.members {
		if m.srv == nil {
			continue
		}
		l := m.srv.Etcd().Server.Lead()
		if l == 0 || (lead != 0 && l != lead) {
			return -1
		}
		lead = l
	}
	for i, m := range c.members {
		if m.srv != nil && uint64(m.srv.Etcd().Server.MemberID()) == lead {
			return i
		}
	}
	return -1
}

// Leader returns the index of the current leader, waiting (up to the ready
// timeout) until all running members agree on a running leader.
func (c *Cluster) Leader(t testing.TB) int {
	t.Helper()
	deadline := time.Now().Add(c.o.ReadyTimeout)
	for {
		if i := c.leaderIndex(); i >= 0 {
			return i
		}
		if time.Now().After(deadline) {
			t.Fatalf("etcdtest: no leader after %v", c.o.ReadyTimeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// WaitLeader waits until the running members agree on a leader and returns
// its index (same as Leader).
func (c *Cluster) WaitLeader(t testing.TB) int {
	t.Helper()
	return c.Leader(t)
}

// Name returns the member's name ("m0", "m1", ...).
func (m *Member) Name() string { return m.name }

// Index returns the member's index in its cluster.
func (m *Member) Index() int { return m.index }

// ID returns the member's raft ID.
func (m *Member) ID() uint64 { return m.id }

// Endpoint returns the member's stable client endpoint (its proxy's URL).
func (m *Member) Endpoint() string { return m.proxy.Endpoint() }

// Proxy returns the proxy in front of the member's client port, to inject
// faults between clients and this member only.
func (m *Member) Proxy() *Proxy { return m.proxy }

// PeerURL returns the member's peer URL.
func (m *Member) PeerURL() string { return m.peerURL }

// Dir returns the member's data directory.
func (m *Member) Dir() string { return m.dir }

// Running reports whether the member is started.
func (m *Member) Running() bool { return m.server() != nil }

// Server returns the running member's embedetcd.Server, or nil if stopped.
func (m *Member) Server() *embedetcd.Server { return m.server() }

// Etcd returns the running member's embed.Etcd, or nil if stopped.
func (m *Member) Etcd() *embed.Etcd {
	if s := m.server(); s != nil {
		return s.Etcd()
	}
	return nil
}

func (m *Member) server() *embedetcd.Server {
	m.c.mu.Lock()
	defer m.c.mu.Unlock()
	return m.srv
}

// stop cuts the member's proxy and closes its etcd; a no-op when stopped.
func (m *Member) stop() {
	m.c.mu.Lock()
	srv := m.srv
	m.srv = nil
	m.c.mu.Unlock()
	m.proxy.Pause()
	if srv != nil {
		srv.Close()
	}
}
