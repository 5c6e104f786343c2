package etcdtest

import (
	"context"
	"errors"
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

// proxyPair is one client connection and its upstream connection.
type proxyPair struct {
	ctx    context.Context // done once the pair is closed
	cancel context.CancelFunc
	mu     sync.Mutex
	conns  []net.Conn
	closed bool
}

func newProxyPair(c net.Conn) *proxyPair {
	ctx, cancel := context.WithCancel(context.Background())
	return &proxyPair{ctx: ctx, cancel: cancel, conns: []net.Conn{c}}
}

// add attaches c to the pair, or closes c if the pair is already closed.
func (pr *proxyPair) add(c net.Conn) bool {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	if pr.closed {
		_ = c.Close()
		return false
	}
	pr.conns = append(pr.conns, c)
	return true
}

func (pr *proxyPair) close() {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	if pr.closed {
		return
	}
	pr.closed = true
	pr.cancel()
	for _, c := range pr.conns {
		_ = c.Close()
	}
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

func (p *Proxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Transient (e.g. EMFILE): back off briefly.
			select {
			case <-p.closedc:
				return
			case <-time.After(10 * time.Millisecond):
			}
			continue
		}
		p.accepted.Add(1)
		p.wg.Add(1) // safe: serve's own count keeps the group non-zero
		go p.handle(c)
	}
}

func (p *Proxy) handle(c net.Conn) {
	defer p.wg.Done()
	pr := newProxyPair(c)
	p.mu.Lock()
	if p.closed || p.paused {
		p.mu.Unlock()
		pr.close()
		return
	}
	p.pairs[pr] = struct{}{}
	target := p.target
	p.mu.Unlock()
	defer func() {
		pr.close()
		p.mu.Lock()
		delete(p.pairs, pr)
		p.mu.Unlock()
	}()

	d := net.Dialer{Timeout: 5 * time.Second}
	up, err := d.DialContext(pr.ctx, "tcp", target)
	if err != nil || !pr.add(up) {
		return
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.pipe(pr, up, c) }()
	go func() { defer wg.Done(); p.pipe(pr, c, up) }()
	wg.Wait()
}

type proxyChunk struct {
	data []byte
	due  time.Time
}

// pipe forwards src to dst through a delay line until either side fails or
// the pair is closed; then it closes the pair.
func (p *Proxy) pipe(pr *proxyPair, dst, src net.Conn) {
	ch := make(chan proxyChunk, 64)
	var rwg sync.WaitGroup
	rwg.Add(1)
	go func() {
		defer rwg.Done()
		defer close(ch)
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				p.mu.Lock()
				due := time.Now().Add(p.delay)
				p.mu.Unlock()
				ck := proxyChunk{data: append([]byte(nil), buf[:n]...), due: due}
				select {
				case ch <- ck:
				case <-pr.ctx.Done():
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
	for ck := range ch {
		if !p.waitFlow(pr, ck.due) {
			break
		}
		if _, err := dst.Write(ck.data); err != nil {
			break
		}
	}
	pr.close()
	rwg.Wait()
}

// waitFlow waits until due and until the proxy is not blackholed. It returns
// false if the pair was closed meanwhile.
func (p *Proxy) waitFlow(pr *proxyPair, due time.Time) bool {
	for {
		p.mu.Lock()
		stall := p.stallc
		p.mu.Unlock()
		if stall != nil {
			select {
			case <-stall:
				continue
			case <-pr.ctx.Done():
				return false
			}
		}
		wait := time.Until(due)
		if wait <= 0 {
			return pr.ctx.Err() == nil
		}
		timer := time.NewTimer(wait)
		select {
		case <-timer.C:
		case <-pr.ctx.Done():
			timer.Stop()
			return false
		}
	}
}
