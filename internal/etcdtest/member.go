package etcdtest

import (
	"go.etcd.io/etcd/server/v3/embed"

	"github.com/etcdworker/orchestrator/internal/embedetcd"
)

// Name returns the member's name ("m0", "m1", ...).
func (m *Member) Name() string { return m.name }

// Index returns the member's index in its cluster.
func (m *Member) Index() int { return m.index }

// ID returns the member's raft ID.
func (m *Member) ID() uint64 { return m.id }

// Endpoint returns the member's stable client endpoint (its proxy's URL).
func (m *Member) Endpoint() string { return m.proxy.Endpoint() }

// Proxy returns the proxy in front of the member's client port, to inject
// faults between clients and this member only. Stop/RestartMember pause and
// resume it.
func (m *Member) Proxy() *Proxy { return m.proxy }

// PeerProxy returns the proxy in front of the member's peer port, which
// carries every peer connection opened *to* this member. etcd sends raft
// messages both over long-lived streams opened by the receiver and over
// pipeline requests opened by the sender, so faults on one member's peer
// proxy affect traffic in both directions only partially (pausing a single
// leader's peer proxy does not depose it). Pausing or delaying the peer
// proxies of all members does act on all raft traffic (e.g. Pause on all of
// them loses quorum until Resume). Stop/RestartMember pause and resume it.
func (m *Member) PeerProxy() *Proxy { return m.peer }

// PeerURL returns the member's advertised peer URL (its peer proxy's URL).
func (m *Member) PeerURL() string { return m.peer.Endpoint() }

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

// stop cuts the member's client proxy and closes its etcd. A leader still
// hands over leadership through the peer proxies; as soon as the raft server
// has stopped, the peer proxy is cut too, so etcd's peer listener shutdown
// (which otherwise waits up to 1s for active raft streams) ends at once and
// no connection to the stopped member lingers. A no-op when stopped.
func (m *Member) stop() {
	m.c.mu.Lock()
	srv := m.srv
	m.srv = nil
	m.c.mu.Unlock()
	if srv == nil {
		for _, p := range []*Proxy{m.proxy, m.peer} {
			if p != nil { // nil: StartCluster failed before creating it
				p.Pause()
			}
		}
		return
	}
	m.proxy.Pause()
	closed := make(chan struct{})
	cut := make(chan struct{})
	go func() {
		defer close(cut)
		select {
		case <-srv.Stopped():
		case <-closed:
		}
		m.peer.Pause()
	}()
	srv.Close()
	close(closed)
	<-cut
}
