package orchestrator

import (
	"errors"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// userError marks an error from a user callback, which ends Run instead of
// being retried like an etcd error.
type userError struct{ err error }

func (e userError) Error() string { return e.err.Error() }
func (e userError) Unwrap() error { return e.err }

// loadWithRetry loads the whole prefix (see load), retrying transient etcd
// errors with back-off until it succeeds or Run must stop.
func (r *run) loadWithRetry() error {
	bo := newBackoff()
	for {
		sent := r.now()
		err := r.load()
		if err == nil {
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
			continue // the pinned revision was compacted during the read: start over
		}
		if err := r.failed("load", sent, err); err != nil {
			return err
		}
		if err := r.sleep(bo.next(), false); err != nil {
			return err
		}
	}
}

// load reads every key under the prefix at one revision and tells the state
// what differs from what it has been told so far: new and changed keys with
// their value, vanished keys with nil. Every Update gets isInit = true.
// Unchanged keys (same mod revision) are not passed again. Afterwards the
// state is a snapshot at the loaded revision. See "Reload diff" in
// docs/DESIGN.md.
func (r *run) load() error {
	m := r.mirror
	start := r.now()
	var counterRev int64
	keys := 0
	m.beginSweep()
	rev, err := r.readPrefix(func(kv *mvccpb.KeyValue) error {
		c, visible := m.apply(kv, false)
		if !visible {
			if string(kv.Key) == m.counterKey {
				counterRev = kv.ModRevision
			}
			return nil
		}
		keys++
		if m.visit(c.key, c.modRev) {
			return nil
		}
		return r.update(c, true)
	})
	vanished := m.endSweep(err == nil)
	if err != nil {
		return err
	}
	for _, k := range vanished {
		if err := r.update(keyChange{key: k}, true); err != nil {
			return userError{err}
		}
	}
	m.loaded(rev, counterRev)
	r.health.fresh(r.now())
	r.gate.changedState()
	r.m.stateKeys.Set(float64(m.len()))
	r.log.Info("state loaded", zap.Int64("revision", rev), zap.Int("keys", keys),
		zap.Duration("duration", r.now().Sub(start)))
	return nil
}

// readPrefix reads every key under the prefix in pages pinned at the
// revision of the first page, calling fn for each; an error of fn is
// returned as a userError. Every page that arrives counts as an answer of
// etcd.
func (r *run) readPrefix(fn func(kv *mvccpb.KeyValue) error) (int64, error) {
	key, end := r.mirror.watchKey, clientv3.GetPrefixRangeEnd(r.mirror.watchKey)
	var rev int64
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(int64(r.w.opts.pageSize))}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		ctx, cancel := r.requestCtx(false)
		resp, err := r.w.client.Get(ctx, key, opts...)
		cancel()
		if err != nil {
			return 0, err
		}
		r.answered(resp.Header.Revision)
		if rev == 0 {
			rev = resp.Header.Revision
			r.mirror.reserve(int(resp.Count))
		}
		for _, kv := range resp.Kvs {
			if err := fn(kv); err != nil {
				return 0, userError{err}
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return rev, nil
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}
