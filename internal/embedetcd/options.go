package embedetcd

import (
	"os"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Default timing used for embedded members. They are much shorter than
// etcd's production defaults (100ms/1000ms) so that leader elections in
// multi-member test clusters finish quickly.
const (
	DefaultTickMs       uint = 50
	DefaultElectionMs   uint = 500
	DefaultReadyTimeout      = 30 * time.Second
)

// Options holds the tunables applied to every embedded member. Callers
// normally build it through the With* Option functions.
type Options struct {
	// MaxTxnOps is etcd's --max-txn-ops (0 keeps etcd's default of 128).
	MaxTxnOps uint
	// MaxRequestBytes is etcd's --max-request-bytes (0 keeps etcd's default).
	MaxRequestBytes uint
	// QuotaBackendBytes is etcd's --quota-backend-bytes (0 keeps etcd's default).
	QuotaBackendBytes int64
	// Logger receives the server's logs; nil means FatalLogger().
	Logger *zap.Logger
	// TickMs is the raft heartbeat interval in milliseconds.
	TickMs uint
	// ElectionMs is the raft election timeout in milliseconds.
	ElectionMs uint
	// ReadyTimeout bounds how long Start waits for the member to become ready.
	ReadyTimeout time.Duration
	// Fsync enables fsync of the WAL and backend. It is off by default: a
	// test harness never survives a machine crash, and fsync dominates the
	// latency of every write on slow disks.
	Fsync bool
	// Configure, if set, is called last on the embed.Config and may change
	// anything (escape hatch for settings without a dedicated option).
	Configure func(*embed.Config)
}

// Option changes Options.
type Option func(*Options)

// ResolveOptions applies opts on top of the defaults and returns the result.
func ResolveOptions(opts ...Option) Options {
	o := Options{
		TickMs:       DefaultTickMs,
		ElectionMs:   DefaultElectionMs,
		ReadyTimeout: DefaultReadyTimeout,
	}
	for _, opt := range opts {
		if opt != nil {
			opt(&o)
		}
	}
	if o.Logger == nil {
		o.Logger = FatalLogger()
	}
	return o
}

// WithMaxTxnOps sets the maximum number of operations in one transaction.
func WithMaxTxnOps(n uint) Option { return func(o *Options) { o.MaxTxnOps = n } }

// WithMaxRequestBytes sets the maximum size of one client request.
func WithMaxRequestBytes(n uint) Option { return func(o *Options) { o.MaxRequestBytes = n } }

// WithQuotaBackendBytes sets the backend size quota; exceeding it raises the
// NOSPACE alarm.
func WithQuotaBackendBytes(n int64) Option { return func(o *Options) { o.QuotaBackendBytes = n } }

// FatalLogger discards every log of a server but those that end the
// process (zap's Fatal calls os.Exit(1) even on a no-op logger): they go to
// standard error, so that a test binary that etcd ends says why.
func FatalLogger() *zap.Logger {
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	return zap.New(zapcore.NewCore(enc, zapcore.Lock(os.Stderr), zapcore.DPanicLevel))
}

// WithLogger sends the server's logs to lg (default: FatalLogger()).
func WithLogger(lg *zap.Logger) Option { return func(o *Options) { o.Logger = lg } }

// WithTiming sets the raft heartbeat interval and election timeout in
// milliseconds (etcd requires electionMs >= 5*tickMs).
func WithTiming(tickMs, electionMs uint) Option {
	return func(o *Options) { o.TickMs, o.ElectionMs = tickMs, electionMs }
}

// WithReadyTimeout bounds how long starting a member waits for it to be ready.
func WithReadyTimeout(d time.Duration) Option { return func(o *Options) { o.ReadyTimeout = d } }

// WithFsync turns fsync of the WAL and backend on or off (default off).
func WithFsync(on bool) Option { return func(o *Options) { o.Fsync = on } }

// WithEmbedConfig registers fn to adjust the embed.Config right before the
// member starts. Several such options are applied in order.
func WithEmbedConfig(fn func(*embed.Config)) Option {
	return func(o *Options) {
		prev := o.Configure
		o.Configure = func(c *embed.Config) {
			if prev != nil {
				prev(c)
			}
			fn(c)
		}
	}
}
