package leader

import (
	"go.uber.org/zap"
)

// DefaultSessionTTL is the TTL, in seconds, of the session lease of each
// campaign: how long a crashed leader keeps its leadership at most.
const DefaultSessionTTL = 10

// Option configures Run.
type Option interface {
	apply(*options)
}

type optionFunc func(*options)

func (f optionFunc) apply(o *options) { f(o) }

type options struct {
	sessionTTL int
	logger     *zap.Logger
	onElected  func(Term)
	onTermEnd  func(Term, error)
}

func newOptions(opts []Option) options {
	o := options{sessionTTL: DefaultSessionTTL, logger: zap.NewNop()}
	for _, opt := range opts {
		if opt != nil {
			opt.apply(&o)
		}
	}
	if o.logger == nil {
		o.logger = zap.NewNop()
	}
	return o
}

// WithSessionTTL sets the TTL in seconds of the session lease each campaign
// creates (default DefaultSessionTTL). When the leader's process dies or
// loses etcd, another candidate takes over after at most this long. It must
// lie between 1 and etcd's longest lease TTL (9,000,000,000 s); Run reports
// another value as an error matching orchestrator.ErrInvalidArgument.
func WithSessionTTL(seconds int) Option {
	return optionFunc(func(o *options) { o.sessionTTL = seconds })
}

// WithLogger sends Run's logs (elections, term ends, retries) to l
// (default: zap.NewNop()). The worker logs through the orchestrator.WithLogger
// option of Worker.Options.
func WithLogger(l *zap.Logger) Option {
	return optionFunc(func(o *options) { o.logger = l })
}

// WithOnElected registers fn to be called when the candidate has won an
// election and its worker is about to run (default: none). It is called from
// Run's goroutine and should return quickly. If fn panics, the worker does
// not run: Run resigns and returns an error matching orchestrator.ErrPanic.
func WithOnElected(fn func(term Term)) Option {
	return optionFunc(func(o *options) { o.onElected = fn })
}

// WithOnTermEnd registers fn to be called when a term's worker has stopped,
// with the error its Run returned (nil when the reactor finished), before Run
// resigns or campaigns again (default: none). It is called from Run's
// goroutine and should return quickly. If fn panics, Run resigns and returns
// an error matching orchestrator.ErrPanic (and the worker's error, if any).
func WithOnTermEnd(fn func(term Term, err error)) Option {
	return optionFunc(func(o *options) { o.onTermEnd = fn })
}
