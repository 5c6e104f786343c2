package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync/atomic"
	"time"

	"github.com/jonboulle/clockwork"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/etcdworker/orchestrator/internal/etcderr"
)

// Reading a whole range at one revision without holding the whole response.
//
// The primary path is etcd 3.7's RangeStream RPC (clientv3.KV.GetStream):
// one request, answered by the server in chunks of about the server's
// request size limit, each chunk read at the revision the first one was
// read at, and no per-chunk count of the remaining keys. Only the final
// chunk carries the response header. When the revision gets compacted
// between two chunks, the stream ends with rpctypes.ErrCompacted.
//
// Servers before 3.7 (and the gRPC proxy) answer codes.Unimplemented; the
// reader then falls back to unary Ranges pinned at one revision: a first
// page that also sizes the range (its Count and the bytes of its keys), then
// either the whole rest in one response, when it fits the client's receive
// limit, or pages large enough that the count every Range computes stays a
// small multiple of the range.

const (
	// rangePagesPerRead bounds the number of pages of the unary fallback
	// (when the receive limit allows): each page's Range counts the keys
	// left, so N keys cost about N * rangePagesPerRead / 2 index steps.
	rangePagesPerRead = 16
	// streamRetryInterval is how long a streamSupport remembers that the
	// server has no RangeStream before trying it again (one round trip).
	streamRetryInterval = 10 * time.Minute
	// rangeSizeMargin inflates the byte estimate of the unary fallback:
	// values vary in size, protobuf framing is not counted.
	rangeSizeMargin = 1.25
)

// readConfig configures readRange. The zero value reads the latest revision
// by streaming, probes the stream on every read and assumes the client's
// default receive limit.
type readConfig struct {
	// rev is the revision to read at; 0 reads the latest one.
	rev int64
	// maxRecvBytes is the client's receive limit
	// (clientv3.Config.MaxCallRecvMsgSize); 0 means the client default,
	// math.MaxInt32. Only the unary fallback needs it.
	maxRecvBytes int
	// minPageKeys is the smallest page of the unary fallback
	// (0: DefaultPageSize).
	minPageKeys int
	// idleTimeout ends the read with an error wrapping
	// context.DeadlineExceeded when etcd sends nothing for that long
	// (waiting for a stream chunk or a unary response; time spent in the
	// callback does not count). 0: only ctx bounds the read.
	idleTimeout time.Duration
	// support remembers a codes.Unimplemented answer across reads; nil:
	// every read tries the stream first.
	support *streamSupport
	// clock times support's retry window (nil: the real clock). The idle
	// timeout runs on real time, as the request's gRPC deadline would.
	clock clockwork.Clock
	// sizeHint, when set, gets the number of keys in the range before fn
	// sees the first key: from the unary fallback's first response, or,
	// with streamCount, once the server has answered a stream, from one
	// count-only read made before it (the stream carries no count). An
	// error from it stops the read like one of fn.
	sizeHint func(keys int64) error
	// streamCount spends a count-only read on the streaming path for
	// sizeHint (about a tenth of the read's time at a million keys).
	streamCount bool
	// answered, when set, is called for every stream chunk and every page
	// that arrives without an error, before fn sees its keys: etcd
	// answers, however long the whole read takes.
	answered func()
}

// streamSupport remembers that the server answered RangeStream with
// codes.Unimplemented, so that reads in the next streamRetryInterval go
// straight to the unary fallback, and which path the last read took. It is
// safe for concurrent use; the zero value assumes the stream is supported.
type streamSupport struct {
	unimplementedAt atomic.Int64 // unix nanoseconds; 0: never
	path            atomic.Value // ReadPath: the last read's path
}

// readPath returns the path of the last read (ReadPathNone: none yet, or
// a nil streamSupport).
func (s *streamSupport) readPath() ReadPath {
	if s == nil {
		return ReadPathNone
	}
	p, _ := s.path.Load().(ReadPath)
	return p
}

// useStream reports whether the next read should try the stream.
func (s *streamSupport) useStream(now time.Time) bool {
	if s == nil {
		return true
	}
	at := s.unimplementedAt.Load()
	return at == 0 || now.Sub(time.Unix(0, at)) >= streamRetryInterval
}

func (s *streamSupport) markUnimplemented(now time.Time) {
	if s != nil {
		s.unimplementedAt.Store(now.UnixNano())
		s.path.Store(ReadPathFallback)
	}
}

// rangeCallbackError is how readRange returns an error of one of its
// callbacks (fn, or readConfig.sizeHint), so that readRange never takes it
// for the server's answer (a callback's Unimplemented status must not make
// the read fall back) and its caller can tell it with errors.As. It unwraps
// to the callback's error. It marks where an error came from, not that it
// came from user code: the callbacks are the follower's own (see guard for
// user code), and runFailure, which marks how Run ended, is another idea.
type rangeCallbackError struct{ err error }

func (e rangeCallbackError) Error() string { return e.err.Error() }
func (e rangeCallbackError) Unwrap() error { return e.err }

// errRangeStreamTruncated: a stream ended without its final chunk (the one
// with the response header).
var errRangeStreamTruncated = errors.New("orchestrator: range stream ended without its final chunk")

// errStreamChunkTooLarge: a stream chunk was over the client's receive
// limit (MaxCallRecvMsgSize) after fn had seen keys; the caller starts over,
// and the read then takes unary pages, which shrink to fit the limit. It
// does not wrap gRPC's error: that one ends retries, this one must not.
var errStreamChunkTooLarge = errors.New("orchestrator: a range stream chunk is over the client's receive limit, reading in pages")

// readRange calls fn for every key in [key, end) at one revision, in key
// order, as the data arrives, and returns that revision: cfg.rev when set,
// otherwise the latest revision when the read began. end is a range end as
// for clientv3.WithRange (clientv3.GetPrefixRangeEnd for a prefix).
//
// fn owns the KeyValue it gets (nothing else references it); kv.Value is
// never nil, a key with an empty value gets a zero-length slice. An error
// from fn stops the read and is returned as a rangeCallbackError. Any other
// error is etcd's or ctx's, unchanged or wrapped with %w: rpctypes.ErrCompacted
// when the revision was compacted during the read, a context error when ctx
// ends, one wrapping context.DeadlineExceeded after cfg.idleTimeout without
// data. After an error fn may have seen a part of the range (a key-ordered
// prefix of it); the caller starts over.
func readRange(ctx context.Context, kv clientv3.KV, key, end string, cfg readConfig,
	fn func(kv *mvccpb.KeyValue) error,
) (int64, error) {
	now := time.Now
	if cfg.clock != nil {
		now = cfg.clock.Now
	}
	if cfg.support.useStream(now()) {
		rev, delivered, err := readStream(ctx, kv, key, end, cfg, fn)
		var ce rangeCallbackError
		callback := errors.As(err, &ce) // the callback's error is never the server's answer
		// The server streams in chunks the client may not take: then
		// page, as on a server without the stream.
		tooLarge := !callback && etcderr.MessageTooLarge(err)
		if (status.Code(err) != codes.Unimplemented && !tooLarge) || callback {
			if err == nil && cfg.support != nil {
				cfg.support.path.Store(ReadPathStream)
			}
			return rev, err
		}
		cfg.support.markUnimplemented(now())
		if delivered { // fn has seen keys: the caller must start over
			if tooLarge {
				return 0, fmt.Errorf("%w: %v", errStreamChunkTooLarge, err) //nolint:errorlint // gRPC's error would end the retries
			}
			return 0, err
		}
	}
	return readPaged(ctx, kv, key, end, cfg, fn)
}

// readStream reads the range with one RangeStream. delivered reports whether
// fn was called.
func readStream(ctx context.Context, kv clientv3.KV, key, end string, cfg readConfig,
	fn func(kv *mvccpb.KeyValue) error,
) (rev int64, delivered bool, err error) {
	ctx, wd := newIdleWatchdog(ctx, cfg.idleTimeout)
	defer wd.stop()
	hint := countForHint(ctx, kv, key, end, cfg)
	opts := []clientv3.OpOption{clientv3.WithRange(end)}
	if hint.rev > 0 {
		opts = append(opts, clientv3.WithRev(hint.rev))
	}
	stream, err := kv.GetStream(ctx, key, opts...)
	if err != nil {
		return 0, false, wd.err(err)
	}
	// The client's receiving goroutine blocks sending to the stream until
	// it is read: on every return, cancel the stream and drain it.
	defer func() {
		wd.cancel()
		for range stream {
		}
	}()
	for resp := range stream {
		wd.pause()
		if err := resp.Err(); err != nil {
			return 0, delivered, wd.err(err)
		}
		if cfg.answered != nil {
			cfg.answered()
		}
		if err := hint.give(cfg.sizeHint); err != nil { // the server streams
			return 0, false, err
		}
		for _, item := range resp.Kvs {
			delivered = true
			if err := callRangeFn(fn, item); err != nil {
				return 0, true, err
			}
		}
		if resp.Header != nil { // the final chunk
			if hint.rev > 0 {
				return hint.rev, delivered, nil
			}
			return resp.Header.Revision, delivered, nil
		}
		wd.resume()
	}
	return 0, delivered, wd.err(errRangeStreamTruncated)
}

// streamHint is the size of a streamed range, counted before the stream (a
// stream carries no count), and the revision both are read at.
type streamHint struct {
	rev     int64 // cfg.rev, or the count's revision; 0: the latest
	keys    int64
	counted bool // keys is known and not given yet
}

// countForHint counts the range when cfg wants a size hint, at cfg.rev or
// else at the latest revision, which the stream is then pinned at, so that
// the hint is the number of keys the read delivers. It is only a hint: a
// failed count gives none and leaves the stream unpinned.
func countForHint(ctx context.Context, kv clientv3.KV, key, end string, cfg readConfig) streamHint {
	h := streamHint{rev: cfg.rev}
	if cfg.sizeHint == nil || !cfg.streamCount {
		return h
	}
	opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithCountOnly()}
	if cfg.rev > 0 {
		opts = append(opts, clientv3.WithRev(cfg.rev))
	}
	resp, err := kv.Get(ctx, key, opts...)
	if err != nil {
		return h
	}
	if h.rev == 0 {
		h.rev = resp.Header.Revision
	}
	h.keys, h.counted = resp.Count, true
	return h
}

// give passes the count to hint once, when the server has answered the
// stream (a server without one answers Unimplemented, and the fallback
// gives its own count). An error of hint is returned as a
// rangeCallbackError.
func (h *streamHint) give(hint func(keys int64) error) error {
	if !h.counted {
		return nil
	}
	h.counted = false
	if err := hint(h.keys); err != nil {
		return rangeCallbackError{err}
	}
	return nil
}

func callRangeFn(fn func(kv *mvccpb.KeyValue) error, item *mvccpb.KeyValue) error {
	if item.Value == nil {
		item.Value = []byte{}
	}
	if err := fn(item); err != nil {
		return rangeCallbackError{err}
	}
	return nil
}

// readPaged is the unary fallback: Ranges pinned at one revision. When the
// receive limit is not known (cfg.maxRecvBytes 0: the client's, which
// clientv3 does not expose, by default 2 GiB), it first reads the whole range
// in one response, as the original worker did: one request, one count. Only
// when that response is over the limit, or when the limit is known, it
// pages: the first page (minPageKeys keys) pins the revision and sizes the
// range; the rest is read in one response when its estimated size fits the
// receive limit, otherwise in pages of max(minPageKeys,
// Count/rangePagesPerRead) keys, fewer when that many would not fit. A
// response over the limit halves the page and retries it.
func readPaged(ctx context.Context, kv clientv3.KV, key, end string, cfg readConfig,
	fn func(kv *mvccpb.KeyValue) error,
) (int64, error) {
	minPage := int64(cfg.minPageKeys)
	if minPage <= 0 {
		minPage = DefaultPageSize
	}
	recvLimit := int64(cfg.maxRecvBytes)
	first := minPage
	if recvLimit <= 0 {
		recvLimit = math.MaxInt32
		first = 0 // everything at once, unless it is over the limit
	}
	p := rangePager{kv: kv, end: end, rev: cfg.rev, idle: cfg.idleTimeout, next: key,
		limit: first, pageLimit: minPage, sizeHint: cfg.sizeHint, answered: cfg.answered}
	sizing, err := p.page(ctx, fn)
	if err != nil {
		return 0, err
	}
	if !p.more {
		return p.rev, nil
	}
	perKey := float64(sizing.bytes) / float64(max(sizing.keys, 1)) * rangeSizeMargin
	byBytes := int64(float64(recvLimit) / 2 / max(perKey, 1))
	p.pageLimit = max(1, min(max(minPage, p.count/rangePagesPerRead), byBytes))
	p.limit = p.pageLimit
	if float64(p.count-sizing.keys)*perKey <= float64(recvLimit) {
		p.limit = 0 // all the rest in one response
	}
	for p.more {
		if _, err := p.page(ctx, fn); err != nil {
			return 0, err
		}
	}
	return p.rev, nil
}

// rangePager reads a range page by page at one revision (the first page's,
// unless rev is set). limit 0 reads everything left.
type rangePager struct {
	kv    clientv3.KV
	end   string
	rev   int64
	idle  time.Duration
	next  string // first key of the next page
	limit int64
	// pageLimit replaces limit 0 when everything left does not fit after
	// all.
	pageLimit int64
	more      bool
	sized     bool  // the first page was read
	count     int64 // keys in the range at the revision, from the first page
	sizeHint  func(keys int64) error
	answered  func() // readConfig.answered
}

// pageStats describes one page.
type pageStats struct{ keys, bytes int64 }

// page reads the next page and passes its keys to fn. A response over the
// receive limit (codes.ResourceExhausted) halves limit and retries.
func (p *rangePager) page(ctx context.Context, fn func(kv *mvccpb.KeyValue) error) (pageStats, error) {
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(p.end), clientv3.WithLimit(p.limit)}
		if p.rev > 0 {
			opts = append(opts, clientv3.WithRev(p.rev))
		}
		getCtx, wd := newIdleWatchdog(ctx, p.idle)
		resp, err := p.kv.Get(getCtx, p.next, opts...)
		err = wd.err(err)
		wd.stop()
		if status.Code(err) == codes.ResourceExhausted && p.limit != 1 {
			if p.limit == 0 {
				p.limit = p.pageLimit
			} else {
				p.limit = max(1, p.limit/2)
			}
			continue
		}
		if err != nil {
			return pageStats{}, err
		}
		if p.answered != nil {
			p.answered()
		}
		if !p.sized {
			p.sized, p.count = true, resp.Count
			if p.rev == 0 {
				p.rev = resp.Header.Revision
			}
			if p.sizeHint != nil {
				if err := p.sizeHint(resp.Count); err != nil {
					return pageStats{}, rangeCallbackError{err}
				}
			}
		}
		var st pageStats
		var last []byte
		if n := len(resp.Kvs); n > 0 {
			last = resp.Kvs[n-1].Key
		}
		for i, item := range resp.Kvs {
			st.keys++
			st.bytes += int64(len(item.Key) + len(item.Value))
			if err := callRangeFn(fn, item); err != nil {
				return st, err
			}
			// A whole-range response holds every key: let each go once
			// fn has it, so the collector does not keep marking them.
			resp.Kvs[i] = nil
		}
		p.more = resp.More && st.keys > 0
		if p.more {
			p.next = string(last) + "\x00"
		}
		return st, nil
	}
}

// idleWatchdog cancels a read when etcd sends nothing for a while: armed
// while waiting for data, paused while the caller's callback runs.
type idleWatchdog struct {
	cancel context.CancelFunc
	idle   time.Duration
	timer  *time.Timer
	fired  atomic.Bool
}

// newIdleWatchdog returns a context derived from ctx that the watchdog
// cancels, and the armed watchdog.
func newIdleWatchdog(ctx context.Context, idle time.Duration) (context.Context, *idleWatchdog) {
	wd := &idleWatchdog{idle: idle}
	ctx, wd.cancel = context.WithCancel(ctx)
	if idle > 0 {
		wd.timer = time.AfterFunc(idle, func() {
			wd.fired.Store(true)
			wd.cancel()
		})
	}
	return ctx, wd
}

func (wd *idleWatchdog) pause() {
	if wd.timer != nil {
		wd.timer.Stop()
	}
}

func (wd *idleWatchdog) resume() {
	if wd.timer != nil {
		wd.timer.Reset(wd.idle)
	}
}

func (wd *idleWatchdog) stop() {
	wd.pause()
	wd.cancel()
}

// err turns the error of a read cancelled by the watchdog into one wrapping
// context.DeadlineExceeded; other errors pass unchanged.
func (wd *idleWatchdog) err(err error) error {
	if err != nil && wd.fired.Load() {
		return fmt.Errorf("orchestrator: no data from etcd for %v: %w", wd.idle, context.DeadlineExceeded)
	}
	return err
}
