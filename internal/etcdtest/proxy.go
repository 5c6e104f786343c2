package etcdtest

import (
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Proxy is a TCP proxy on 127.0.0.1 that forwards every accepted connection
// to a target address and can inject faults: cutting all connections
// (Pause), stalling all traffic (Blackhole) and adding latency (SetDelay).
//
// go.etcd.io/etcd/pkg/v3/proxy (v3.7.3, proxy/server.go) has latency
// (DelayTx/DelayRx) and held traffic (PauseTx/PauseRx, which could serve
// Blackhole; its own Blackhole drops bytes, which breaks the HTTP/2 stream),
// but not what the fault tests here need most, and it breaks a rule of the
// repository:
//   - it listens on every interface: NewServer binds ":port" whatever
//     host From names (only From's port 0 binds its host, and then nothing
//     tells which port it got), where the tests listen on 127.0.0.1 only;
//   - it keeps no registry of its connections, so nothing can cut them
//     (Pause, CutFor: a crashed server's reset, which makes a watch fail and
//     reconnect at once). Close closes the listener, and each connection only
//     once its next bytes arrive: an idle watch stream is never reset, and
//     Close waits for it;
//   - its target is fixed, while Cluster re-targets a member's proxy at every
//     restart (SetTarget).
//
// Each accepted connection is served by a handler goroutine plus a reader and
// a writer goroutine per direction; Close joins all of them. Half-closes are
// not propagated: when either side ends, both connections are closed (enough
// for gRPC).
type Proxy struct {
	ln       net.Listener
	endpoint string
	closedc  chan struct{}

	mu     sync.Mutex
	target string
	paused bool          // cut: drop existing and new connections
	stallc chan struct{} // non-nil while blackholed; closed on Resume
	delay  time.Duration
	gen    uint64 // bumped by every Pause/Blackhole/Resume
	pairs  map[*proxyPair]struct{}
	closed bool

	wg        sync.WaitGroup
	accepted  atomic.Int64
	closeOnce sync.Once
}

// parseTarget accepts "host:port" or a URL such as "http://127.0.0.1:2379".
func parseTarget(target string) (string, error) {
	if strings.Contains(target, "://") {
		u, err := url.Parse(target)
		if err != nil {
			return "", fmt.Errorf("etcdtest: proxy target %q: %w", target, err)
		}
		target = u.Host
	}
	if _, _, err := net.SplitHostPort(target); err != nil {
		return "", fmt.Errorf("etcdtest: proxy target %q: %w", target, err)
	}
	return target, nil
}

// NewProxy starts a Proxy forwarding to target ("host:port" or a client URL
// like "http://127.0.0.1:2379"). It is closed by t.Cleanup; the test fails
// if the proxy cannot be started.
func NewProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	p, err := StartProxy(target)
	if err != nil {
		t.Fatalf("etcdtest: %v", err)
	}
	t.Cleanup(p.Close)
	return p
}

// StartProxy is NewProxy without a testing.TB: the caller must Close it.
func StartProxy(target string) (*Proxy, error) {
	addr, err := parseTarget(target)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("etcdtest: proxy listen: %w", err)
	}
	p := &Proxy{
		ln:       ln,
		endpoint: "http://" + ln.Addr().String(),
		closedc:  make(chan struct{}),
		target:   addr,
		pairs:    make(map[*proxyPair]struct{}),
	}
	p.wg.Add(1)
	go p.serve()
	return p, nil
}

// Endpoint returns the proxy's address as a clientv3 endpoint URL,
// "http://127.0.0.1:PORT".
func (p *Proxy) Endpoint() string { return p.endpoint }

// Addr returns the proxy's listening address, "127.0.0.1:PORT".
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Target returns the current upstream address (host:port).
func (p *Proxy) Target() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.target
}

// SetTarget changes the upstream address for connections accepted from now
// on; existing connections keep their upstream. target has the same forms as
// for NewProxy.
func (p *Proxy) SetTarget(target string) error {
	addr, err := parseTarget(target)
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.target = addr
	p.mu.Unlock()
	return nil
}

// Pause cuts the link: it closes all current connections and, until Resume,
// closes every new connection right after accepting it (clients see a reset
// or EOF at once, as with a crashed server).
func (p *Proxy) Pause() {
	p.mu.Lock()
	p.gen++
	p.paused = true
	pairs := p.snapshotLocked()
	p.mu.Unlock()
	for _, pr := range pairs {
		pr.close()
	}
}

// Blackhole stalls the link until Resume: connections stay open and new ones
// are accepted, but no byte is forwarded in either direction (as in a network
// partition, clients only notice through timeouts). Data sent meanwhile is
// buffered and delivered after Resume, like TCP retransmission would.
func (p *Proxy) Blackhole() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.gen++
	if p.stallc == nil {
		p.stallc = make(chan struct{})
	}
}

// Resume ends Pause and Blackhole: new connections are forwarded again and
// stalled data flows.
func (p *Proxy) Resume() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.resumeLocked()
}

func (p *Proxy) resumeLocked() {
	p.gen++
	p.paused = false
	if p.stallc != nil {
		close(p.stallc)
		p.stallc = nil
	}
}

// CutFor calls Pause and arranges for Resume to be called after d, unless
// Pause, Blackhole, Resume or Close is called in the meantime. It does not
// block.
func (p *Proxy) CutFor(d time.Duration) {
	p.Pause()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	gen := p.gen
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		timer := time.NewTimer(d)
		defer timer.Stop()
		select {
		case <-timer.C:
			p.mu.Lock()
			if p.gen == gen {
				p.resumeLocked()
			}
			p.mu.Unlock()
		case <-p.closedc:
		}
	}()
}

// SetDelay adds latency d to data forwarded in each direction (so a round
// trip gains 2*d). It applies to data read after the call; 0 removes it.
func (p *Proxy) SetDelay(d time.Duration) {
	p.mu.Lock()
	p.delay = d
	p.mu.Unlock()
}

// Connections returns how many connections the proxy has accepted so far,
// including those dropped while paused.
func (p *Proxy) Connections() int64 { return p.accepted.Load() }

// ActiveConnections returns how many connections are currently forwarded.
func (p *Proxy) ActiveConnections() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.pairs)
}

// Close stops accepting, closes all connections and waits for every goroutine
// of the proxy to exit. It is idempotent.
func (p *Proxy) Close() {
	p.closeOnce.Do(func() {
		p.mu.Lock()
		p.closed = true
		pairs := p.snapshotLocked()
		p.mu.Unlock()
		close(p.closedc)
		_ = p.ln.Close()
		for _, pr := range pairs {
			pr.close()
		}
		p.wg.Wait()
	})
}

func (p *Proxy) snapshotLocked() []*proxyPair {
	out := make([]*proxyPair, 0, len(p.pairs))
	for pr := range p.pairs {
		out = append(out, pr)
	}
	return out
}
