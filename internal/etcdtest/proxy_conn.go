package etcdtest

import (
	"context"
	"errors"
	"net"
	"sync"
	"time"
)

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
