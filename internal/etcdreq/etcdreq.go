// Package etcdreq gives every etcd request of this module its context: a
// timeout, and an end as soon as the request's client is closed. clientv3
// retries a request on a closed client until its context ends, so without
// the second rule every request sent after Close would last its whole
// timeout.
package etcdreq

import (
	"context"
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
// after a cancel but not for ever. release ends it at once and waits for
// what it set up (a goroutine runs from ctx's end until d later or the
// release); call it once, when the context is no longer needed.
func Outlive(ctx context.Context, d time.Duration) (outliving context.Context, release func()) {
	octx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	released, ended := make(chan struct{}), make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(ended)
		timer := time.NewTimer(d)
		defer timer.Stop()
		select {
		case <-timer.C:
			cancel()
		case <-released:
		}
	})
	return octx, func() {
		close(released)
		if !stop() { // it started: wait for it to end
			<-ended
		}
		cancel()
	}
}
