package embedetcd

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// Port allocation.
//
// etcd's embed package only accepts URLs, not pre-bound listeners, so a port
// has to be chosen, released and then bound again by etcd. Two things can
// steal it in between:
//
//   - the kernel handing it out as the local port of an outgoing connection
//     (any process): avoided by picking ports *below* the kernel's ephemeral
//     range (net.ipv4.ip_local_port_range), which connect() never uses;
//   - another test process choosing the same port: made unlikely by random
//     choice, detected by etcd failing with EADDRINUSE, and handled by the
//     callers retrying with fresh ports.
//
// Within this process a port is never handed out twice (until the pool runs
// dry), so members of one cluster cannot collide with each other.

const minPickPort = 10000

var ports struct {
	mu     sync.Mutex
	issued map[int]bool
	lo, hi int // pick range [lo, hi); hi == 0 means "use :0"
	once   sync.Once
}

func initPortRange() {
	ports.issued = make(map[int]bool)
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return
	}
	f := strings.Fields(string(b))
	if len(f) < 1 {
		return
	}
	low, err := strconv.Atoi(f[0])
	if err != nil || low-minPickPort < 1000 {
		return
	}
	ports.lo, ports.hi = minPickPort, low
}

// PickPort returns a TCP port on 127.0.0.1 that was free when checked and has
// not been returned before by this process.
func PickPort() (int, error) {
	ports.once.Do(initPortRange)
	ports.mu.Lock()
	defer ports.mu.Unlock()
	if ports.hi > 0 {
		if len(ports.issued) > (ports.hi-ports.lo)/2 {
			clear(ports.issued)
		}
		for range 200 {
			p := ports.lo + rand.IntN(ports.hi-ports.lo)
			if ports.issued[p] {
				continue
			}
			ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
			if err != nil {
				continue
			}
			_ = ln.Close()
			ports.issued[p] = true
			return p, nil
		}
	}
	// Fallback: let the kernel choose (ephemeral range).
	for range 100 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		p := ln.Addr().(*net.TCPAddr).Port
		_ = ln.Close()
		if !ports.issued[p] {
			ports.issued[p] = true
			return p, nil
		}
	}
	return 0, errors.New("embedetcd: no free port found")
}

// PickURL returns "http://127.0.0.1:PORT" for a port chosen by PickPort.
func PickURL() (string, error) {
	p, err := PickPort()
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("http://127.0.0.1:%d", p), nil
}

// IsAddrInUse reports whether err is (or wraps) an "address already in use"
// error, the signal to retry a start with other ports.
func IsAddrInUse(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, syscall.EADDRINUSE) {
		return true
	}
	// Some etcd paths flatten the error into a string.
	return strings.Contains(err.Error(), "address already in use")
}
