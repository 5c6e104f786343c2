package orchestrator

import (
	"bytes"
	"context"
	"errors"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/etcdworker/orchestrator/util"
)

// userError marks an error from a user callback, which ends Run instead of
// being retried like an etcd error.
type userError struct{ err error }

func (e userError) Error() string { return e.err.Error() }
func (e userError) Unwrap() error { return e.err }

// loadWithRetry loads the whole prefix (see load), retrying etcd errors with
// back-off until it succeeds or Run must stop.
func (r *run) loadWithRetry() error {
	bo := newBackoff()
	for {
		err := r.load()
		if err == nil {
			r.contact()
			return nil
		}
		var ue userError
		if errors.As(err, &ue) {
			return ue.err
		}
		if stop := r.checkStop(); stop != nil {
			return stop
		}
		if errors.Is(err, rpctypes.ErrCompacted) {
			continue // the pinned revision was compacted between pages: start over
		}
		r.failure("load", err)
		if err := r.sleep(bo.next()); err != nil {
			return err
		}
	}
}

// sleep waits for d, or returns the error Run must return.
func (r *run) sleep(d time.Duration) error {
	timer := r.w.opts.clock.NewTimer(d)
	defer timer.Stop()
	select {
	case <-r.ctx.Done():
		return r.ctxErr()
	case <-r.sessionDone():
		return ErrEtcdSessionDone
	case <-timer.Chan():
		return nil
	}
}

// load reads every key under the prefix in pages, all pinned at the revision
// of the first page, and tells the state what differs from what it has been
// told so far: new and changed keys with their value, vanished keys with nil.
// Every Update gets isInit = true. Unchanged keys (same mod revision) are not
// passed again. Afterwards the state is a snapshot at the loaded revision.
func (r *run) load() error {
	w := r.w
	start := r.now()
	end := clientv3.GetPrefixRangeEnd(w.watchKey)
	key := w.watchKey
	reserved := []byte(w.reserved)
	var rev, counterRev int64
	var seen map[util.EtcdKey]struct{}
	if len(w.committed) > 0 {
		seen = make(map[util.EtcdKey]struct{}, len(w.committed))
	}
	keys := 0
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(int64(w.opts.pageSize))}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		ctx, cancel := context.WithTimeout(r.ctx, w.opts.requestTimeout)
		resp, err := w.client.Get(ctx, key, opts...)
		cancel()
		if err != nil {
			return err
		}
		if rev == 0 {
			rev = resp.Header.Revision
			if len(w.committed) == 0 && resp.Count > 0 {
				// First load: size the mirror map for the whole prefix
				// (Count is the number of keys in the range, not in the
				// page) instead of growing it page by page.
				w.committed = make(map[util.EtcdKey]kvEntry, resp.Count)
			}
		}
		for _, kv := range resp.Kvs {
			if bytes.HasPrefix(kv.Key, reserved) {
				if string(kv.Key) == w.counterKey {
					counterRev = kv.ModRevision
				}
				continue
			}
			keys++
			k := util.NewEtcdKeyFromBytes(kv.Key)
			if seen != nil {
				seen[k] = struct{}{}
			}
			if e, ok := w.committed[k]; ok && e.modRev == kv.ModRevision {
				continue
			}
			value := kv.Value
			if value == nil {
				value = []byte{}
			}
			if err := r.update(k, value, kv.ModRevision, true); err != nil {
				return userError{err}
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			break
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
	if seen != nil {
		for k := range w.committed {
			if _, ok := seen[k]; !ok {
				if err := r.update(k, nil, 0, true); err != nil {
					return userError{err}
				}
			}
		}
	}
	r.counterRev = counterRev
	r.eventRev = rev
	r.appliedRev = max(r.appliedRev, rev)
	r.headRev = max(r.headRev, rev)
	r.lastFresh = r.now()
	r.changed = true
	r.m.stateKeys.Set(float64(len(w.committed)))
	r.log.Info("state loaded", zap.Int64("revision", rev), zap.Int("keys", keys),
		zap.Duration("duration", r.now().Sub(start)))
	return nil
}
