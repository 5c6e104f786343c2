package orchestrator

import (
	"context"
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
		r.lastData = r.now()
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
		// The outage began when etcd last sent data, not when the read began.
		if err := r.failed("load", r.lastData, err); err != nil {
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
	first := m.empty()
	walk := m.walk()
	rev, err := r.readPrefix(first, func(kv *mvccpb.KeyValue) error {
		c, visible := m.apply(kv, false)
		if !visible {
			if string(kv.Key) == m.counterKey {
				counterRev = kv.ModRevision
			}
			return nil
		}
		keys++
		prev, had := walk.find(c.key)
		if had && prev.modRev == c.modRev {
			return nil // unchanged
		}
		c.created = !had
		return r.update(c, true)
	})
	vanished := walk.finish(err == nil)
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

// readPrefix reads every key under the prefix at one revision (see
// readRange: a streaming range, or pinned pages on servers without one),
// calling fn for each; an error of fn is returned as a userError. Every key
// that arrives counts as an answer of etcd, so a long read that succeeds
// chunk by chunk is never an outage; a read that stalls fails after the
// request timeout (bounded by the outage limit) without data.
//
// With sizeMirror (the mirror is empty: so is the state), the read tells the
// mirror and a SizedState how many keys to expect before the first one: a
// map filled without a size grows by doubling, which costs time during the
// load. On the streaming path that takes a count, made only for a
// SizedState.
func (r *run) readPrefix(sizeMirror bool, fn func(kv *mvccpb.KeyValue) error) (int64, error) {
	key, end := r.mirror.watchKey, clientv3.GetPrefixRangeEnd(r.mirror.watchKey)
	cfg := readConfig{
		minPageKeys: r.w.opts.pageSize,
		idleTimeout: r.health.requestTimeout(r.now(), r.w.opts.requestTimeout),
		support:     &r.w.streamSupport,
	}
	if sizeMirror {
		// The fallback's count comes with its first response. A count
		// before a stream costs a tenth of the read at a million keys: it
		// pays for a SizedState's map, not for the mirror, which appends.
		cfg.sizeHint = r.expectKeys
		_, cfg.streamCount = r.state.(SizedState)
	}
	ctx, cancel := context.WithCancel(r.ctx)
	ctx, cancel = boundToClient(ctx, cancel, r.w.client)
	defer cancel()
	n := 0
	path := r.w.streamSupport.readPath()
	rev, err := readRange(ctx, r.w.client, key, end, cfg, func(kv *mvccpb.KeyValue) error {
		if n&1023 == 0 { // data arrived: etcd answers (checked now and then, it is per key)
			r.answered(0)
			r.lastData = r.now()
		}
		n++
		return fn(kv)
	})
	if now := r.w.streamSupport.readPath(); now != path {
		r.logReadPath(path, now)
	}
	var ce rangeCallbackError
	if errors.As(err, &ce) {
		return 0, userError(ce)
	}
	if err != nil {
		return 0, err
	}
	r.answered(rev)
	return rev, nil
}

// expectKeys sizes the empty mirror for keys keys and passes the number on
// to a SizedState.
func (r *run) expectKeys(keys int64) error {
	r.mirror.reserve(int(keys))
	ss, ok := r.state.(SizedState)
	if !ok || r.mirror.hinted {
		return nil
	}
	r.mirror.hinted = true
	_, err := guard("SizedState.ExpectKeys", func() (struct{}, error) {
		ss.ExpectKeys(int(keys))
		return struct{}{}, nil
	})
	return err
}

// logReadPath reports, at Info, that the reads of the prefix changed path
// from was to now: a fall back from the streaming range (with the server's
// version), or the stream again after a fallback.
func (r *run) logReadPath(was, now ReadPath) {
	switch {
	case now == ReadPathFallback:
		r.log.Info("etcd has no streaming range (RangeStream): reading the prefix with unary ranges pinned at one revision",
			zap.String("serverVersion", r.serverVersion()))
	case was == ReadPathFallback:
		r.log.Info("etcd streams ranges (RangeStream) again: reading the prefix with it")
	}
}

// serverVersion asks etcd for its version (Maintenance.Status), endpoint by
// endpoint, bounded by one request timeout in all; "unknown" when none
// answers.
func (r *run) serverVersion() string {
	ctx, cancel := r.requestCtx(false)
	defer cancel()
	for _, ep := range r.w.client.Endpoints() {
		if resp, err := r.w.client.Status(ctx, ep); err == nil {
			return resp.Version
		}
	}
	return "unknown"
}
