package orchestratortest

import (
	"go.uber.org/zap"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// DefaultDialTimeout is the DialTimeout of the clients the kit creates (5s).
const DefaultDialTimeout = etcdtest.ClientDialTimeout

// Option configures an embedded etcd started by this package.
type Option interface {
	apply(*config)
}

type optionFunc func(*config)

func (f optionFunc) apply(c *config) { f(c) }

type config struct {
	maxTxnOps       int
	maxRequestBytes int
	quotaBytes      int64
	logger          *zap.Logger
	dir             string
}

func newConfig(opts []Option) config {
	var c config
	for _, o := range opts {
		if o != nil {
			o.apply(&c)
		}
	}
	if c.logger == nil {
		c.logger = zap.NewNop()
	}
	return c
}

// WithMaxTxnOps sets the server's --max-txn-ops, the maximum number of
// operations in one transaction. Default (0): etcd's default, 128.
func WithMaxTxnOps(n int) Option {
	return optionFunc(func(c *config) { c.maxTxnOps = n })
}

// WithMaxRequestBytes sets the server's --max-request-bytes, the maximum size
// of one client request. Default (0): etcd's default, 1.5 MiB.
func WithMaxRequestBytes(n int) Option {
	return optionFunc(func(c *config) { c.maxRequestBytes = n })
}

// WithQuotaBackendBytes sets the server's --quota-backend-bytes; writes fail
// with "etcdserver: mvcc: database space exceeded" once the backend is that
// large. Default (0): etcd's default, 2 GiB.
func WithQuotaBackendBytes(n int64) Option {
	return optionFunc(func(c *config) { c.quotaBytes = n })
}

// WithLogger sends the server's logs to l. Default: discarded (etcd is very
// chatty); zaptest.NewLogger(t) shows them only for failing tests.
func WithLogger(l *zap.Logger) Option {
	return optionFunc(func(c *config) { c.logger = l })
}

// WithDir keeps the server's data in dir, which is created if missing and
// left in place by Close. Default: a new temporary directory, removed by
// Close (t.TempDir() for StartEtcd and StartEtcdServer).
func WithDir(dir string) Option {
	return optionFunc(func(c *config) { c.dir = dir })
}
