package orchestrator

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/jonboulle/clockwork"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/etcdworker/orchestrator/internal/etcdreq"
)

// fenceCheck reads the worker's fencing key (WithFencingKey) at once and then
// every interval, in a goroutine of its own, and reports when the run must
// end: the key is absent or has another create revision (ErrNotOwner), or
// etcd rejected the read in a way retrying cannot heal (see rejected). Any
// other error is no loss and waits for the next interval; the head probe
// tracks outages. A worker that commits also learns of a loss from its
// commit's compare; without the check an idle one never would. It belongs to
// one worker: every worker has its own fencing key. See "Fencing check" in
// docs/DESIGN.md.
type fenceCheck struct {
	client   *clientv3.Client
	key      string
	rev      int64
	clock    clockwork.Clock
	interval time.Duration
	timeout  time.Duration // of one read
	log      *zap.Logger

	lost chan struct{} // closed when the run must end; err says why
	err  error
	stop context.CancelFunc
	wg   sync.WaitGroup
}

// startFenceCheck starts the check of the run's fencing key, or returns nil
// when the worker has none.
func (r *run) startFenceCheck() *fenceCheck {
	o := &r.w.opts
	if !o.hasFencing {
		return nil
	}
	timeout := (&health{maxOutage: o.maxOutage}).requestTimeout(r.now(), o.requestTimeout)
	ctx, stop := context.WithCancel(r.ctx)
	f := &fenceCheck{
		client: r.w.client, key: o.fencingKey, rev: o.fencingRev, clock: o.clock,
		interval: progressInterval(o), timeout: timeout, log: r.log,
		lost: make(chan struct{}), stop: stop,
	}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		f.loop(ctx)
	}()
	return f
}

func (f *fenceCheck) loop(ctx context.Context) {
	ticker := f.clock.NewTicker(f.interval)
	defer ticker.Stop()
	for {
		if err := f.check(ctx); err != nil {
			f.err = err
			close(f.lost)
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-ticker.Chan():
		}
	}
}

// check reads the key once and returns the error that ends the run, if any.
func (f *fenceCheck) check(ctx context.Context) error {
	rctx, cancel := etcdreq.Context(ctx, f.timeout, f.client)
	resp, err := f.client.Get(rctx, f.key, clientv3.WithKeysOnly())
	cancel()
	switch {
	case ctx.Err() != nil:
		return nil // stopping: the error is ours
	case err != nil:
		if rej := rejected(f.client, "fencing check", err); rej != nil {
			return rej
		}
		f.log.Debug("fencing check failed, retrying", zap.String("key", f.key), zap.Error(err))
		return nil
	case len(resp.Kvs) == 0 || resp.Kvs[0].CreateRevision != f.rev:
		return fmt.Errorf("%w: fencing key %q no longer has create revision %d", ErrNotOwner, f.key, f.rev)
	}
	return nil
}

// done returns a channel closed when the run must end (see result); nil,
// which never delivers, without a check.
func (f *fenceCheck) done() <-chan struct{} {
	if f == nil {
		return nil
	}
	return f.lost
}

// result returns why the run must end, or nil while it need not.
func (f *fenceCheck) result() error {
	select {
	case <-f.done():
		return f.err
	default:
		return nil
	}
}

// close stops the check and waits for its goroutine.
func (f *fenceCheck) close() {
	if f == nil {
		return
	}
	f.stop()
	f.wg.Wait()
}
