// Package etcdreq gives every etcd request of this module its context: a
// timeout, and an end as soon as the request's client is closed. clientv3
// retries a request on a closed client until its context ends, so without
// the second rule every request sent after Close would last its whole
// timeout.
package etcdreq

import (
	"context"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Context returns the context of one etcd request of client: parent,
// bounded by timeout and ended when client is closed (Bound).
func Context(parent context.Context, timeout time.Duration, client *clientv3.Client) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(parent, timeout)
	return Bound(ctx, cancel, client)
}

// Bound makes ctx (with its cancel) end when client is closed, too; the
// returned cancel also releases what Bound set up. For a request bounded
// otherwise than by a timeout (a read with an idle timeout of its own).
func Bound(ctx context.Context, cancel context.CancelFunc, client *clientv3.Client) (context.Context, context.CancelFunc) {
	cctx := client.Ctx()
	if cctx == nil {
		return ctx, cancel
	}
	stop := context.AfterFunc(cctx, cancel)
	return ctx, func() {
		stop()
		cancel()
	}
}

// Outlive returns a context that ends d after ctx ends (on real time, as a
// request's deadline runs), for requests that must run to their outcome
// after a cancel but not for ever. release ends it at once and releases
// what it set up; call it when the context is no longer needed.
func Outlive(ctx context.Context, d time.Duration) (outliving context.Context, release func()) {
	octx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	var (
		mu       sync.Mutex
		timer    *time.Timer
		released bool
	)
	stop := context.AfterFunc(ctx, func() {
		mu.Lock()
		defer mu.Unlock()
		if !released {
			timer = time.AfterFunc(d, cancel)
		}
	})
	return octx, func() {
		stop()
		mu.Lock()
		released = true
		if timer != nil {
			timer.Stop()
		}
		mu.Unlock()
		cancel()
	}
}
