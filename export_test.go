package orchestrator

import (
	"context"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// ReadPrefixForBench exposes readRange (latest revision, default
// configuration) to the external test package's benchmarks.
func ReadPrefixForBench(ctx context.Context, kv clientv3.KV, prefix string, fn func(kv *mvccpb.KeyValue) error) (int64, error) {
	return readRange(ctx, kv, prefix, clientv3.GetPrefixRangeEnd(prefix), readConfig{}, fn)
}
