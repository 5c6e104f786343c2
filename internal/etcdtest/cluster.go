package etcdtest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/internal/embedetcd"
)

// Cluster is a multi-member etcd cluster embedded in the test process.
//
// Every member sits behind two Proxies whose addresses are what it
// advertises and never change: one for clients (Member.Proxy, whose URL is
// Member.Endpoint) and one for peers (Member.PeerProxy). The member itself
// listens on fresh ports at each (re)start, so a restart never races for a
// port that was just released. Stopping a member cuts its client proxy first,
// so client streams (watches, keep-alives) are dropped at once instead of
// delaying the shutdown by etcd's ~6s request timeout, and cuts its peer
// proxy afterwards, so no connection to the stopped member lingers.
//
// Methods may be called from several goroutines, but operations on the same
// member must not overlap.
type Cluster struct {
	dir     string
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
	initial string
	token   string
	proxy   *Proxy // client side
	peer    *Proxy // peer side
	id      uint64
	srv     *embedetcd.Server // nil while stopped; guarded by c.mu
}

// NewCluster starts a size-member cluster on 127.0.0.1 with data under
// t.TempDir() (StartCluster) and registers its Close with t.Cleanup. The
// test fails if the cluster does not come up.
func NewCluster(t testing.TB, size int, opts ...ServerOption) *Cluster {
	t.Helper()
	o := embedetcd.ResolveOptions(opts...)
	ctx, cancel := context.WithTimeout(context.Background(), o.ReadyTimeout+10*time.Second)
	defer cancel()
	c, err := StartCluster(ctx, t.TempDir(), size, opts...)
	if err != nil {
		t.Fatalf("etcdtest: %v", err)
	}
	t.Cleanup(c.Close)
	return c
}

// StartCluster starts a size-member cluster on 127.0.0.1 with data under dir
// and returns it once every member is ready (bounded by ctx and the ready
// timeout). A start that loses a port race is retried with fresh ports. The
// caller must Close it; on error nothing is left running.
func StartCluster(ctx context.Context, dir string, size int, opts ...ServerOption) (c *Cluster, err error) {
	if size < 1 {
		return nil, fmt.Errorf("etcdtest: cluster size %d", size)
	}
	c = &Cluster{dir: dir, opts: opts, o: embedetcd.ResolveOptions(opts...)}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	for i := range size {
		// The proxies are created before any member: their addresses are
		// the member's advertised URLs for the cluster's lifetime.
		m := &Member{c: c, index: i, name: fmt.Sprintf("m%d", i)}
		c.members = append(c.members, m)
		if m.proxy, err = StartProxy("127.0.0.1:1"); err != nil {
			return nil, err
		}
		if m.peer, err = StartProxy("127.0.0.1:1"); err != nil {
			return nil, err
		}
		// Until the member is launched.
		m.proxy.Pause()
		m.peer.Pause()
	}
	for attempt := range 6 {
		if err = c.launchAll(attempt); err == nil || !embedetcd.IsAddrInUse(err) {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("etcdtest: start cluster: %w", err)
	}
	rctx, cancel := context.WithTimeout(ctx, c.o.ReadyTimeout)
	defer cancel()
	if err = c.waitReady(rctx, c.members); err != nil {
		return nil, fmt.Errorf("etcdtest: cluster not ready: %w", err)
	}
	for _, m := range c.members {
		m.id = uint64(m.srv.Etcd().Server.MemberID())
	}
	return c, nil
}

// launchAll starts every member with fresh ports and data directories. On
// error all launched members are closed.
func (c *Cluster) launchAll(attempt int) error {
	token := fmt.Sprintf("etcdtest-%d-%x", time.Now().UnixNano(), rand.Uint64()) // unique to this launch
	base := filepath.Join(c.dir, fmt.Sprintf("try%d", attempt))
	var initial []string
	for _, m := range c.members {
		initial = append(initial, m.name+"="+m.peer.Endpoint())
	}
	for _, m := range c.members {
		m.dir = filepath.Join(base, m.name)
		m.token = token
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

// launch starts m's etcd (not waiting for readiness) on fresh client and peer
// ports and points its proxies there.
func (c *Cluster) launch(m *Member, existing bool) error {
	curl, err := embedetcd.PickURL()
	if err != nil {
		return err
	}
	purl, err := embedetcd.PickURL()
	if err != nil {
		return err
	}
	if err := m.proxy.SetTarget(curl); err != nil {
		return err
	}
	if err := m.peer.SetTarget(purl); err != nil {
		return err
	}
	srv, err := embedetcd.Launch(embedetcd.Member{
		Name:               m.name,
		Dir:                m.dir,
		ClientURL:          curl,
		AdvertiseClientURL: m.proxy.Endpoint(),
		PeerURL:            purl,
		AdvertisePeerURL:   m.peer.Endpoint(),
		InitialCluster:     m.initial,
		ClusterToken:       m.token,
		Existing:           existing,
	}, c.opts...)
	if err != nil {
		return err
	}
	c.mu.Lock()
	m.srv = srv
	c.mu.Unlock()
	m.peer.Resume()
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

// stopAll stops all running members. Followers go first. The leader is
// stopped last, once it has stepped down for lack of a quorum (etcd runs raft
// with CheckQuorum, so this takes about one election timeout): a leader that
// is stopped while it still believes a just-stopped peer to be alive would
// try to hand leadership to it and wait etcd's full request timeout (~6s).
func (c *Cluster) stopAll() {
	lead := c.leaderIndex()
	for i, m := range c.members {
		if i != lead {
			m.stop()
		}
	}
	if lead < 0 {
		return
	}
	m := c.members[lead]
	if srv := m.server(); srv != nil && c.runningCount() == 1 && len(c.members) > 1 {
		es := srv.Etcd().Server
		deadline := time.Now().Add(4 * time.Duration(c.o.ElectionMs) * time.Millisecond)
		for es.Lead() == uint64(es.MemberID()) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
	}
	m.stop()
}

func (c *Cluster) runningCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, m := range c.members {
		if m.srv != nil {
			n++
		}
	}
	return n
}

// Close stops all members, then their proxies. It is idempotent (and run by
// t.Cleanup for NewCluster); the cluster cannot be restarted afterwards.
func (c *Cluster) Close() {
	c.stopAll()
	for _, m := range c.members {
		for _, p := range []*Proxy{m.proxy, m.peer} {
			if p != nil {
				p.Close()
			}
		}
	}
}

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

// StopMember stops member i: clients connected to it are cut off at once and
// new connections to its endpoint are refused until it is restarted. It is a
// graceful stop: a leader first hands leadership to another member.
func (c *Cluster) StopMember(t testing.TB, i int) {
	t.Helper()
	c.members[i].stop()
}

// RestartMember restarts stopped member i with its old data directory and
// advertised URLs and waits until it is ready (which needs a quorum of running
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

// relaunch starts a stopped member, retrying with other ports if it loses a
// port race.
func (c *Cluster) relaunch(ctx context.Context, m *Member) error {
	for {
		err := c.launch(m, true)
		if err == nil || !embedetcd.IsAddrInUse(err) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last error: %w)", ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
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
