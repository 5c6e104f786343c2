package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// rangeTestDir is where the range reader tests populate their keys, each
// test under a directory of its own (rangeTestEnv.prefix).
const rangeTestDir = "/test/rangeread/"

// rpcCounter is a gRPC client interceptor pair that counts KV Range calls
// and RangeStream messages (with their encoded sizes) and, when
// noStream is set, answers RangeStream with codes.Unimplemented like a
// server before etcd 3.7.
type rpcCounter struct {
	noStream bool
	// afterRange, when set, runs after each unary Range with the number of
	// Ranges so far (the hook of a test that changes etcd between pages).
	afterRange func(n int)

	mu            sync.Mutex
	streams       int   // RangeStream calls
	chunks        []int // encoded size of each RangeStream message
	ranges        int   // unary Range calls
	rangeReads    int   // of them, reads of a range (not of one key, not a count)
	rangeResponse []int // encoded size of each Range response
	// firstRangeRev is the header revision of the first unary Range
	// response (0: none yet): the revision an unpinned paged read is at.
	firstRangeRev int64
	// served is the header revision of every response of a range read that
	// has one, in order: each unary Range of a range, each stream's final
	// chunk.
	served []int64
}

// servedCount returns how many responses served has.
func (c *rpcCounter) servedCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.served)
}

// servedAt returns the header revision of the i-th response with one, or 0.
func (c *rpcCounter) servedAt(i int) int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if i < len(c.served) {
		return c.served[i]
	}
	return 0
}

func (c *rpcCounter) dialOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithChainStreamInterceptor(c.stream),
		grpc.WithChainUnaryInterceptor(c.unary),
		// A fixed 64 KiB flow-control window (no BDP growth) bounds how far
		// the server can read ahead of the callback, which makes the
		// tests that write or compact during a read deterministic.
		grpc.WithInitialWindowSize(64 << 10),
		grpc.WithInitialConnWindowSize(64 << 10),
	}
}

func (c *rpcCounter) stream(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn,
	method string, streamer grpc.Streamer, opts ...grpc.CallOption,
) (grpc.ClientStream, error) {
	if method != pb.KV_RangeStream_FullMethodName {
		return streamer(ctx, desc, cc, method, opts...)
	}
	c.mu.Lock()
	c.streams++
	c.mu.Unlock()
	if c.noStream {
		return nil, errNoRangeStream
	}
	cs, err := streamer(ctx, desc, cc, method, opts...)
	if err != nil {
		return nil, err
	}
	return &countingStream{ClientStream: cs, c: c}, nil
}

func (c *rpcCounter) unary(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn,
	invoker grpc.UnaryInvoker, opts ...grpc.CallOption,
) error {
	err := invoker(ctx, method, req, reply, cc, opts...)
	if method == pb.KV_Range_FullMethodName {
		c.mu.Lock()
		c.ranges++
		if err == nil {
			c.rangeResponse = append(c.rangeResponse, proto.Size(reply.(*pb.RangeResponse)))
			h := reply.(*pb.RangeResponse).Header
			if h != nil && c.firstRangeRev == 0 {
				c.firstRangeRev = h.Revision
			}
			if rr := req.(*pb.RangeRequest); h != nil && len(rr.RangeEnd) > 0 && !rr.CountOnly {
				c.served = append(c.served, h.Revision)
			}
		}
		if rr := req.(*pb.RangeRequest); len(rr.RangeEnd) > 0 && !rr.CountOnly {
			c.rangeReads++
		}
		n := c.ranges
		c.mu.Unlock()
		if c.afterRange != nil {
			c.afterRange(n)
		}
	}
	return err
}

type countingStream struct {
	grpc.ClientStream
	c *rpcCounter
}

func (s *countingStream) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	if err == nil {
		resp := m.(*pb.RangeStreamResponse)
		s.c.mu.Lock()
		s.c.chunks = append(s.c.chunks, proto.Size(resp))
		if h := resp.GetRangeResponse().GetHeader(); h != nil { // the final chunk
			s.c.served = append(s.c.served, h.Revision)
		}
		s.c.mu.Unlock()
	}
	return err
}

// reads counts the RangeStream calls and the unary reads of a range.
func (c *rpcCounter) reads() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.streams + c.rangeReads
}

func (c *rpcCounter) counts() (streams, chunks, ranges int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.streams, len(c.chunks), c.ranges
}

// rangeTestEnv is a server (shared by the tests with the same request size
// limit, or the test's own) with a prefix of keys of the test's own, and a
// client that counts (and may refuse) range RPCs.
type rangeTestEnv struct {
	*testEnv
	prefix   string // the test's keys are under it; it ends with "/"
	counted  *clientv3.Client
	counter  *rpcCounter
	want     map[string]string
	setupRev int64 // the revision of the last write of the setup
	// servedRev is the header revision of the first response of the last
	// read (0: none): for a read at the latest revision, the one it is at.
	servedRev int64
}

// rangeSetup is what newRangeTestEnv starts and writes.
type rangeSetup struct {
	limit     uint // the server's request size limit, which sets the stream's chunk size
	keys      int  // keys written under the test's prefix
	valueSize int  // bytes per value
	noStream  bool // the counting client refuses RangeStream (a server before 3.7)
	recvLimit int  // the counting client's receive limit (0: the client default)
	own       bool // a server of the test's own (it compacts), not the shared one of the limit
}

// newRangeTestEnv writes s.keys keys of s.valueSize bytes under a prefix of
// the test's own, on the shared server with s.limit (or its own server).
func newRangeTestEnv(t *testing.T, s rangeSetup) *rangeTestEnv {
	t.Helper()
	server := withMaxRequestBytes(s.limit)
	if s.own {
		server = ownServer(etcdtest.WithMaxRequestBytes(s.limit))
	}
	env := &rangeTestEnv{
		testEnv: newTestEnv(t, server),
		prefix:  rangeTestDir + t.Name() + "/",
		counter: &rpcCounter{noStream: s.noStream}, want: map[string]string{},
	}
	cfg := env.clientConfig(env.counter.dialOptions()...)
	cfg.MaxCallRecvMsgSize = s.recvLimit
	env.counted = etcdtest.NewClientFromConfig(t, cfg)
	ctx := contextWithin(t, 30*time.Second)
	var ops []clientv3.Op
	batchBytes := 0
	flush := func() {
		resp, err := env.cli.Txn(ctx).Then(ops...).Commit()
		require.NoError(t, err)
		env.setupRev = resp.Header.Revision
		ops, batchBytes = ops[:0], 0
	}
	for i := range s.keys {
		k := env.key(i)
		v := fmt.Sprintf("%d:%s", i, strings.Repeat("v", max(0, s.valueSize-8)))
		env.want[k] = v
		ops = append(ops, clientv3.OpPut(k, v))
		batchBytes += len(k) + len(v)
		if len(ops) == 100 || batchBytes > int(s.limit)/2 {
			flush()
		}
	}
	if len(ops) > 0 {
		flush()
	}
	return env
}

// key returns the key of the i-th key of the setup.
func (env *rangeTestEnv) key(i int) string { return fmt.Sprintf("%sk%06d", env.prefix, i) }

// requireReadAt checks the revision rev that a read (of the latest
// revision) returned: the one etcd served its first response at, not before
// from (the newest write the read must hold), not after the store's
// revision now, and one at which the test's prefix holds exactly got.
func (env *rangeTestEnv) requireReadAt(ctx context.Context, t *testing.T, got map[string]string, rev, from int64) {
	t.Helper()
	if env.servedRev != 0 {
		require.Equal(t, env.servedRev, rev, "the read's revision is the one etcd served it at")
	}
	require.GreaterOrEqual(t, rev, from, "the read is older than a write done before it")
	require.LessOrEqual(t, rev, headRevision(ctx, t, env.cli), "the read's revision is in the future")
	kvs, _ := userKVs(ctx, t, env.cli, strings.TrimSuffix(env.prefix, "/"), rev)
	atRev := make(map[string]string, len(kvs))
	for k, kv := range kvs {
		atRev[k] = kv.value
	}
	require.Equal(t, got, atRev, "the prefix at the read's revision")
}

// read reads the test prefix with cfg, collecting values; every key must
// come in order and only once. hook, if set, runs before each key is stored.
func (env *rangeTestEnv) read(ctx context.Context, cfg readConfig, hook func(i int) error) (map[string]string, int64, error) {
	got := map[string]string{}
	last := ""
	first := env.counter.servedCount()
	defer func() { env.servedRev = env.counter.servedAt(first) }()
	rev, err := readRange(ctx, env.counted, env.prefix, clientv3.GetPrefixRangeEnd(env.prefix), cfg,
		func(kv *mvccpb.KeyValue) error {
			if hook != nil {
				if err := hook(len(got)); err != nil {
					return err
				}
			}
			if string(kv.Key) <= last {
				return fmt.Errorf("key %q after %q", kv.Key, last)
			}
			if kv.Value == nil {
				return fmt.Errorf("key %q with a nil value", kv.Key)
			}
			last = string(kv.Key)
			got[last] = string(kv.Value)
			return nil
		})
	return got, rev, err
}

func TestReadRangeStreamsKeysInChunksOfTheServerRequestLimit(t *testing.T) {
	t.Parallel()
	const limit = 64 << 10
	env := newRangeTestEnv(t, rangeSetup{limit: limit, keys: 2000, valueSize: 1000})
	ctx := contextWithin(t, 30*time.Second)

	got, rev, err := env.read(ctx, readConfig{}, nil)
	require.NoError(t, err)
	require.Equal(t, env.want, got)
	env.requireReadAt(ctx, t, got, rev, env.setupRev)

	streams, chunks, ranges := env.counter.counts()
	require.Equal(t, 1, streams)
	require.Zero(t, ranges, "the stream path sends no unary Range")
	require.Greater(t, chunks, 10, "2 MB in chunks of about 64 KiB")
	for i, size := range env.counter.chunks {
		// Chunks double from 10 keys until half the server's request
		// limit, then stay below twice the limit.
		require.LessOrEqual(t, size, 2*limit, "chunk %d", i)
	}
}

func TestReadRangeSeesOneRevisionWhileKeysChangeDuringTheRead(t *testing.T) {
	t.Parallel()
	for _, noStream := range []bool{false, true} {
		t.Run(fmt.Sprintf("noStream=%v", noStream), func(t *testing.T) {
			env := newRangeTestEnv(t, rangeSetup{limit: 64 << 10, keys: 2000, valueSize: 1000, noStream: noStream})
			ctx := contextWithin(t, 30*time.Second)
			cfg := readConfig{minPageKeys: 100}
			var changedAt int64
			got, rev, err := env.read(ctx, cfg, func(i int) error {
				if i != 0 {
					return nil
				}
				// After the first key: change, delete and add keys the
				// read has not reached yet.
				resp, err := env.cli.Txn(ctx).Then(
					clientv3.OpPut(env.key(1500), "changed"),
					clientv3.OpDelete(env.key(1999)),
					clientv3.OpPut(env.prefix+"zz-new", "new"),
				).Commit()
				if err == nil {
					changedAt = resp.Header.Revision
				}
				return err
			})
			require.NoError(t, err)
			require.Equal(t, env.want, got)
			require.Less(t, rev, changedAt, "the read is at a revision before the change")
			env.requireReadAt(ctx, t, got, rev, env.setupRev)
		})
	}
}

func TestReadRangeReturnsErrCompactedWhenTheRevisionIsCompactedDuringTheRead(t *testing.T) {
	t.Parallel()
	for _, noStream := range []bool{false, true} {
		t.Run(fmt.Sprintf("noStream=%v", noStream), func(t *testing.T) {
			env := newRangeTestEnv(t, rangeSetup{limit: 64 << 10, keys: 2000, valueSize: 1000, noStream: noStream, own: true})
			ctx := contextWithin(t, 30*time.Second)
			// A known receive limit makes the fallback page instead of
			// reading everything in one response.
			cfg := readConfig{minPageKeys: 100, maxRecvBytes: math.MaxInt32}
			_, _, err := env.read(ctx, cfg, func(i int) error {
				if i != 0 {
					return nil
				}
				if _, err := env.cli.Put(ctx, "/elsewhere", "x"); err != nil {
					return err
				}
				_, err := etcdtest.Compact(ctx, env.cli)
				return err
			})
			require.ErrorIs(t, err, rpctypes.ErrCompacted)
			var ce rangeCallbackError
			require.False(t, errors.As(err, &ce), "an etcd error is not a callback error")
		})
	}
}

func TestReadRangeOfAnEmptyPrefixReturnsTheCurrentRevision(t *testing.T) {
	t.Parallel()
	for _, noStream := range []bool{false, true} {
		t.Run(fmt.Sprintf("noStream=%v", noStream), func(t *testing.T) {
			env := newRangeTestEnv(t, rangeSetup{limit: 64 << 10, noStream: noStream})
			ctx := contextWithin(t, 30*time.Second)
			put, err := env.cli.Put(ctx, "/elsewhere", "x")
			require.NoError(t, err)
			got, rev, err := env.read(ctx, readConfig{}, nil)
			require.NoError(t, err)
			require.Empty(t, got)
			env.requireReadAt(ctx, t, got, rev, put.Header.Revision)
		})
	}
}

func TestReadRangePassesAnEmptyValueAsANonNilSlice(t *testing.T) {
	t.Parallel()
	for _, noStream := range []bool{false, true} {
		t.Run(fmt.Sprintf("noStream=%v", noStream), func(t *testing.T) {
			env := newRangeTestEnv(t, rangeSetup{limit: 64 << 10, keys: 3, valueSize: 10, noStream: noStream})
			ctx := contextWithin(t, 30*time.Second)
			_, err := env.cli.Put(ctx, env.prefix+"empty", "")
			require.NoError(t, err)
			env.want[env.prefix+"empty"] = ""
			got, _, err := env.read(ctx, readConfig{}, nil) // read fails on a nil value
			require.NoError(t, err)
			require.Equal(t, env.want, got)
		})
	}
}

func TestReadRangeReadsAtTheGivenRevision(t *testing.T) {
	t.Parallel()
	for _, noStream := range []bool{false, true} {
		t.Run(fmt.Sprintf("noStream=%v", noStream), func(t *testing.T) {
			env := newRangeTestEnv(t, rangeSetup{limit: 64 << 10, keys: 50, valueSize: 10, noStream: noStream})
			ctx := contextWithin(t, 30*time.Second)
			at := env.setupRev
			_, err := env.cli.Delete(ctx, env.prefix, clientv3.WithPrefix())
			require.NoError(t, err)
			got, rev, err := env.read(ctx, readConfig{rev: at, minPageKeys: 10}, nil)
			require.NoError(t, err)
			require.Equal(t, at, rev)
			require.Equal(t, env.want, got)
		})
	}
}

func TestReadRangeFallsBackWhenStreamUnimplementedAndRemembersIt(t *testing.T) {
	t.Parallel()
	env := newRangeTestEnv(t, rangeSetup{limit: 1 << 20, keys: 1000, valueSize: 100, noStream: true})
	ctx := contextWithin(t, 30*time.Second)
	support := &streamSupport{}
	cfg := readConfig{minPageKeys: 100, support: support}
	for range 2 {
		got, rev, err := env.read(ctx, cfg, nil)
		require.NoError(t, err)
		require.Equal(t, env.want, got)
		env.requireReadAt(ctx, t, got, rev, env.setupRev)
	}
	streams, _, ranges := env.counter.counts()
	require.Equal(t, 1, streams, "the second read skips the stream")
	require.Equal(t, 2, ranges, "each read: the whole range in one response (the client's receive limit is not known)")
	require.False(t, support.useStream(time.Now()))
	require.True(t, support.useStream(time.Now().Add(streamRetryInterval)))
}

func TestReadRangePagesWhenTheRangeExceedsTheReceiveLimit(t *testing.T) {
	t.Parallel()
	const recvLimit = 32 << 10
	env := newRangeTestEnv(t, rangeSetup{limit: 1 << 20, keys: 1000, valueSize: 100, noStream: true, recvLimit: recvLimit}) // ~120 KB in all
	ctx := contextWithin(t, 30*time.Second)
	got, _, err := env.read(ctx, readConfig{minPageKeys: 10, maxRecvBytes: recvLimit}, nil)
	require.NoError(t, err)
	require.Equal(t, env.want, got)
	_, _, ranges := env.counter.counts()
	require.Greater(t, ranges, 5)
	for i, size := range env.counter.rangeResponse {
		require.LessOrEqual(t, size, recvLimit, "response %d", i)
	}
}

func TestReadRangeShrinksPagesThatExceedTheReceiveLimit(t *testing.T) {
	t.Parallel()
	// Underestimated: the first page's keys are small, the rest large.
	const recvLimit = 64 << 10
	env := newRangeTestEnv(t, rangeSetup{limit: 1 << 20, keys: 20, valueSize: 10, noStream: true, recvLimit: recvLimit})
	ctx := contextWithin(t, 30*time.Second)
	for i := range 200 {
		k, v := fmt.Sprintf("%sz%04d", env.prefix, i), strings.Repeat("x", 1000)
		_, err := env.cli.Put(ctx, k, v)
		require.NoError(t, err)
		env.want[k] = v
	}
	got, _, err := env.read(ctx, readConfig{minPageKeys: 20, maxRecvBytes: recvLimit}, nil)
	require.NoError(t, err)
	require.Equal(t, env.want, got)
	_, _, ranges := env.counter.counts()
	require.Greater(t, ranges, 10, "the sizing page, the refused rest, then pages of 20 keys")
}

func TestReadRangeReturnsTheCallbackErrorAsACallbackError(t *testing.T) {
	t.Parallel()
	errUser := errors.New("user says no")
	for _, noStream := range []bool{false, true} {
		t.Run(fmt.Sprintf("noStream=%v", noStream), func(t *testing.T) {
			env := newRangeTestEnv(t, rangeSetup{limit: 64 << 10, keys: 2000, valueSize: 1000, noStream: noStream})
			ctx := contextWithin(t, 30*time.Second)
			got, _, err := env.read(ctx, readConfig{minPageKeys: 100}, func(i int) error {
				if i == 500 {
					return errUser
				}
				return nil
			})
			require.ErrorIs(t, err, errUser)
			var ce rangeCallbackError
			require.ErrorAs(t, err, &ce)
			require.Len(t, got, 500)
		})
	}
}

// TestReadRangeNeverTakesACallbackErrorForTheServers: a callback failing
// with a gRPC Unimplemented status ends the read with that error; it does
// not make the reader fall back, nor remember the server as one without a
// stream.
func TestReadRangeNeverTakesACallbackErrorForTheServers(t *testing.T) {
	t.Parallel()
	errUser := status.Error(codes.Unimplemented, "the user's own Unimplemented")
	env := newRangeTestEnv(t, rangeSetup{limit: 64 << 10, keys: 200, valueSize: 100})
	ctx := contextWithin(t, 30*time.Second)
	support := &streamSupport{}
	_, _, err := env.read(ctx, readConfig{support: support}, func(int) error { return errUser })
	require.ErrorIs(t, err, errUser)
	var ce rangeCallbackError
	require.ErrorAs(t, err, &ce)
	require.True(t, support.useStream(time.Now()), "the server streams")
	_, _, ranges := env.counter.counts()
	require.Zero(t, ranges, "no fallback read")
}

func TestReadRangeFailsWithDeadlineExceededWhenEtcdGoesSilent(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, withProxy()) // faults the proxy, not the server
	prefix := rangeTestDir + t.Name() + "/"
	cli := env.client(t)
	ctx := contextWithin(t, 30*time.Second)
	_, err := cli.Put(ctx, prefix+"a", "1")
	require.NoError(t, err)
	env.proxy.Blackhole()
	t.Cleanup(env.proxy.Resume)
	start := time.Now()
	_, err = readRange(ctx, cli, prefix, clientv3.GetPrefixRangeEnd(prefix),
		readConfig{idleTimeout: 300 * time.Millisecond}, func(*mvccpb.KeyValue) error { return nil })
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Less(t, time.Since(start), 5*time.Second)
	require.NoError(t, ctx.Err())
}

// TestReadRangePagedReadIsAtItsFirstPagesRevision: the unary fallback,
// paging (a known receive limit), reads every page at the revision of its
// first page and returns exactly that revision, while keys of later pages
// change between two pages. The other fallback tests either read the range
// in one response (no receive limit: TestReadRangeSeesOneRevision...'s
// noStream case) or check no revision (the paging tests), so readPaged
// returning p.rev+1 after more than one page passed all of them. The
// revision is compared with the first Range response's header, which holds
// on a shared server that others write to.
func TestReadRangePagedReadIsAtItsFirstPagesRevision(t *testing.T) {
	t.Parallel()
	env := newRangeTestEnv(t, rangeSetup{limit: 1 << 20, keys: 300, valueSize: 100, noStream: true})
	ctx := contextWithin(t, 30*time.Second)
	var changedAt atomic.Int64
	var changeErr atomic.Value
	env.counter.afterRange = func(n int) {
		if n != 1 {
			return
		}
		resp, err := env.cli.Txn(ctx).Then(
			clientv3.OpPut(env.key(200), "changed"),
			clientv3.OpDelete(env.key(299)),
			clientv3.OpPut(env.prefix+"zz-new", "new"),
		).Commit()
		if err != nil {
			changeErr.Store(err)
			return
		}
		changedAt.Store(resp.Header.Revision)
	}
	got, rev, err := env.read(ctx, readConfig{minPageKeys: 50, maxRecvBytes: 8 << 10}, nil)
	require.NoError(t, err)
	require.Nil(t, changeErr.Load(), "the change between pages")
	_, _, ranges := env.counter.counts()
	require.Greater(t, ranges, 2, "the read pages")
	require.Equal(t, env.want, got, "every page at the first page's revision")
	env.counter.mu.Lock()
	first := env.counter.firstRangeRev
	env.counter.mu.Unlock()
	require.Equal(t, first, rev, "the read returns the revision its pages were read at")
	require.Less(t, rev, changedAt.Load())
	env.requireReadAt(ctx, t, got, rev, env.setupRev)
}
