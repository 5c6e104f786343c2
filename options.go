package orchestrator

import (
	"fmt"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/etcdworker/orchestrator/internal/etcderr"
)

const (
	// DefaultTxnMaxOps is the default op limit of one commit Txn: etcd's
	// default --max-txn-ops. The worker's own compares and ops count too.
	DefaultTxnMaxOps = 128
	// DefaultTxnMaxBytes is the default byte limit of one commit Txn
	// (1.25 MiB): etcd's default --max-request-bytes (1.5 MiB) less room for
	// protobuf framing.
	DefaultTxnMaxBytes = 1024 * (1024 + 256)
	// DefaultPageSize is the default smallest page of the paged read that
	// loads or reloads the state on servers without a streaming range (etcd
	// before 3.7). Servers with one stream the whole prefix in one request.
	DefaultPageSize = 10_000
	// DefaultMaxStaleness is the default bound on how old the newest proof of
	// freshness of the state may be before the worker stops ticking.
	DefaultMaxStaleness = 10 * time.Second
	// DefaultRequestTimeout is the default timeout of one etcd request (a
	// page of the load, a commit Txn, a commit resolution).
	DefaultRequestTimeout = 5 * time.Second
	// DefaultShutdownTimeout is the default time Run keeps trying to resolve
	// the outcome of an in-flight commit after ctx is done.
	DefaultShutdownTimeout = 5 * time.Second
	// DefaultCommitTokenTTL is the default TTL of the lease a Run without a
	// session puts its commit token on.
	DefaultCommitTokenTTL = 60 * time.Second
	// DefaultPipelineDepth is the default number of commit Txns of one flush
	// the worker sends before the first of them answers (see
	// WithPipelineDepth).
	DefaultPipelineDepth = 4
	// MaxPipelineDepth is the largest depth WithPipelineDepth accepts.
	MaxPipelineDepth = 64
)

// Option configures an EtcdWorker. The zero configuration is usable.
type Option interface {
	apply(*options)
}

type optionFunc func(*options)

func (f optionFunc) apply(o *options) { f(o) }

type options struct {
	logger      *zap.Logger
	txnMaxOps   int
	txnMaxBytes int
	fencingKey  string
	fencingRev  int64
	hasFencing  bool
	// clock is the real clock; a field so that unit tests may set it (the
	// Source model test sets a Source's; a worker on a shared Source takes
	// the Source's). It drives the loop's timers, back-offs, outage
	// arithmetic and the range reader's stream retry window; request
	// deadlines and the range reader's idle watchdog run on real time, as
	// gRPC's deadlines do.
	clock             clockwork.Clock
	maxOutage         time.Duration
	maxStaleness      time.Duration
	requestTimeout    time.Duration
	shutdownTimeout   time.Duration
	pageSize          int
	tokenTTL          time.Duration
	pipelineDepth     int
	metricsRegisterer prometheus.Registerer
	source            *Source // nil: a Source of the worker's own
}

func defaultOptions() options {
	return options{
		logger:          zap.NewNop(),
		txnMaxOps:       DefaultTxnMaxOps,
		txnMaxBytes:     DefaultTxnMaxBytes,
		clock:           clockwork.NewRealClock(),
		maxStaleness:    DefaultMaxStaleness,
		requestTimeout:  DefaultRequestTimeout,
		shutdownTimeout: DefaultShutdownTimeout,
		pageSize:        DefaultPageSize,
		tokenTTL:        DefaultCommitTokenTTL,
		pipelineDepth:   DefaultPipelineDepth,
	}
}

// validate returns an error naming the first option whose value is out of
// range.
func (o *options) validate() error {
	positive := []struct {
		name string
		d    time.Duration
	}{
		{"WithRequestTimeout", o.requestTimeout},
		{"WithMaxStaleness", o.maxStaleness},
		{"WithCommitTokenTTL", o.tokenTTL},
	}
	for _, p := range positive {
		if err := checkPositiveDuration(p.name, p.d); err != nil {
			return err
		}
	}
	if o.tokenTTL > etcderr.MaxLeaseTTL*time.Second {
		return fmt.Errorf("%w: WithCommitTokenTTL(%v): over etcd's longest lease TTL, %ds",
			ErrInvalidArgument, o.tokenTTL, etcderr.MaxLeaseTTL)
	}
	if err := checkPageSize("WithPageSize", o.pageSize); err != nil {
		return err
	}
	switch {
	case o.shutdownTimeout < 0:
		return fmt.Errorf("%w: WithShutdownTimeout: duration %v must not be negative", ErrInvalidArgument, o.shutdownTimeout)
	case o.maxOutage < 0:
		return fmt.Errorf("%w: WithMaxOutage: duration %v must not be negative", ErrInvalidArgument, o.maxOutage)
	case o.pipelineDepth <= 0 || o.pipelineDepth > MaxPipelineDepth:
		return fmt.Errorf("%w: WithPipelineDepth: depth %d must be from 1 to %d", ErrInvalidArgument, o.pipelineDepth, MaxPipelineDepth)
	case o.hasFencing && (o.fencingKey == "" || o.fencingRev <= 0):
		return fmt.Errorf("%w: WithFencingKey: key %q with create revision %d", ErrInvalidArgument, o.fencingKey, o.fencingRev)
	}
	return nil
}

// WithLogger sets the logger. Default: zap.NewNop(). A nil logger keeps the
// default.
func WithLogger(l *zap.Logger) Option {
	return optionFunc(func(o *options) {
		if l != nil {
			o.logger = l
		}
	})
}

// WithTxnLimits sets the limits of one commit Txn: at most maxOps operations,
// counted as etcd counts them (max of compares, then-ops, else-ops, including
// the worker's own), and at most maxBytes of keys and values in compares and
// ops. Default: DefaultTxnMaxOps (128) and DefaultTxnMaxBytes (1.25 MiB),
// which fit an etcd server with default flags. Set them no higher than the
// server's --max-txn-ops and --max-request-bytes less framing: the byte
// estimate counts keys and values only (every copy of them: a written key is
// in its compare, its put or delete and its get), and protobuf adds about 30
// bytes per written key for those three messages, so leave maxOps*32 bytes
// plus a KiB of margin (the defaults leave 256 KiB). Values that leave no
// room for one key make NewEtcdWorker fail with ErrInvalidArgument.
func WithTxnLimits(maxOps, maxBytes int) Option {
	return optionFunc(func(o *options) {
		o.txnMaxOps = maxOps
		o.txnMaxBytes = maxBytes
	})
}

// WithFencingKey makes every commit also require that key exists with the
// given create revision, for example concurrency.Election's Key() and Rev().
// When it does not, nothing is written and Run returns ErrNotOwner. Run also
// reads the key when it starts and then every progress interval (a quarter of
// WithMaxStaleness, or of WithMaxOutage if smaller, kept between 50ms and
// 2s), so a worker that commits nothing returns ErrNotOwner within about that
// interval of the loss too, and never ticks after it saw the loss. An etcd
// error on that read is no loss; one that retrying cannot heal, such as
// permission denied, ends Run as any other rejection (ErrEtcdRejected).
// Default: no fencing.
func WithFencingKey(key string, createRevision int64) Option {
	return optionFunc(func(o *options) {
		o.fencingKey = key
		o.fencingRev = createRevision
		o.hasFencing = true
	})
}

// WithMaxOutage caps how long Run keeps retrying while etcd is unreachable
// (no successful request and no watch progress). Past it Run returns
// ErrEtcdUnavailable. Default: 0, wait until ctx is done.
func WithMaxOutage(d time.Duration) Option {
	return optionFunc(func(o *options) { o.maxOutage = d })
}

// WithMaxStaleness bounds how stale the state may be and still be ticked: the
// worker ticks only while its newest proof that the state is current (a watch
// response, a progress notification, the load, or a read showing that etcd
// has no newer revision) is younger than d.
// Default: DefaultMaxStaleness (10s).
func WithMaxStaleness(d time.Duration) Option {
	return optionFunc(func(o *options) { o.maxStaleness = d })
}

// WithRequestTimeout sets the timeout of one etcd request made by the
// worker. Default: DefaultRequestTimeout (5s).
func WithRequestTimeout(d time.Duration) Option {
	return optionFunc(func(o *options) { o.requestTimeout = d })
}

// WithShutdownTimeout sets how long Run keeps trying, after ctx is done, to
// find out whether its in-flight commit landed. It counts from the moment
// ctx ends and bounds the requests already in flight then, so Run returns
// within about this long of the cancel (matching ErrCommitUnresolved if
// the outcome is still unknown); 0 gives up at once. Default:
// DefaultShutdownTimeout (5s).
func WithShutdownTimeout(d time.Duration) Option {
	return optionFunc(func(o *options) { o.shutdownTimeout = d })
}

// WithPageSize sets the smallest page, in keys, of the paged read that loads
// or reloads the state when the server has no streaming range (etcd before
// 3.7); pages grow with the prefix so that the count etcd computes for every
// page stays a small multiple of the prefix, and shrink when a response
// would exceed the client's receive limit. Servers with a streaming range
// ignore it. Default: DefaultPageSize (10,000).
func WithPageSize(n int) Option {
	return optionFunc(func(o *options) { o.pageSize = n })
}

// WithCommitTokenTTL sets the TTL of the lease a Run without a session puts
// its commit token on (with a session, the token uses the session's lease).
// The worker keeps the lease alive while it runs and revokes it when Run
// returns, so a Run that dies without cleanup leaves its token for at most
// the TTL. An outage longer than the TTL while a commit's outcome is unknown
// makes Run return ErrCommitUnresolved: the token that would tell is gone.
// Default: DefaultCommitTokenTTL (60s); etcd rounds it up to whole seconds
// and to its minimum TTL. It must be positive and at most etcd's longest
// lease TTL (9,000,000,000 s).
func WithCommitTokenTTL(d time.Duration) Option {
	return optionFunc(func(o *options) { o.tokenTTL = d })
}

// WithPipelineDepth sets how many commit Txns of one flush (the patch
// groups of one Tick, when they need more than one Txn) the worker sends
// before the first of them answers. The Txns still land in the order the
// groups were emitted, and a Txn never lands when an earlier one of the
// same flush did not: each compares the commit token with the value the one
// before it writes. A Txn that writes or depends on a key an earlier Txn in
// flight writes waits for that one's answer. 1 sends them one at a time; a
// depth below 1 or above MaxPipelineDepth makes NewEtcdWorker fail with
// ErrInvalidArgument. Default:
// DefaultPipelineDepth (4): etcd batches concurrent Txns into fewer raft
// rounds and fsyncs, which is where the gain comes from; depths from 2 to 8
// measured alike (see "Pipelined commits" in docs/DESIGN.md).
func WithPipelineDepth(n int) Option {
	return optionFunc(func(o *options) { o.pipelineDepth = n })
}

// checkPositiveDuration and checkPageSize are the rules a worker's options
// and a Source's share; name is the option's.
func checkPositiveDuration(name string, d time.Duration) error {
	if d <= 0 {
		return fmt.Errorf("%w: %s: duration %v must be positive", ErrInvalidArgument, name, d)
	}
	return nil
}

func checkPageSize(name string, n int) error {
	if n <= 0 {
		return fmt.Errorf("%w: %s: page size %d must be positive", ErrInvalidArgument, name, n)
	}
	return nil
}
