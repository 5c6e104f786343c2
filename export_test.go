package orchestrator

import (
	"context"
	"testing"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// ReadPrefixForBench exposes readRange (latest revision, default
// configuration) to the external test package's benchmarks.
func ReadPrefixForBench(ctx context.Context, kv clientv3.KV, prefix string, fn func(kv *mvccpb.KeyValue) error) (int64, error) {
	return readRange(ctx, kv, prefix, clientv3.GetPrefixRangeEnd(prefix), readConfig{}, fn)
}

// RawStreamForBench exposes rawStreamGet, the raw streaming read of
// prefix + "/" into a map, to the external test package's benchmarks.
func RawStreamForBench(ctx context.Context, tb testing.TB, cli *clientv3.Client, prefix string) map[string][]byte {
	return rawStreamGet(ctx, tb, cli, prefix)
}

// RawUnpagedForBench exposes rawUnpagedGet, the raw unpaged read of
// prefix + "/" into a map, to the external test package's benchmarks.
func RawUnpagedForBench(ctx context.Context, tb testing.TB, cli *clientv3.Client, prefix string) map[string][]byte {
	return rawUnpagedGet(ctx, tb, cli, prefix)
}

// DrainStreamForBench exposes drainStream, which collects what a streaming
// range sends, to the external test package's benchmarks.
func DrainStreamForBench(tb testing.TB, stream clientv3.GetStreamChan, m map[string][]byte) map[string][]byte {
	return drainStream(tb, stream, m)
}
