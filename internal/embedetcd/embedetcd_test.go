package embedetcd

import (
	"context"
	"net"
	"net/url"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestStartCompactClose(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := Start(ctx, t.TempDir(), WithMaxTxnOps(16))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if eps := s.Endpoints(); len(eps) != 1 {
		t.Fatalf("endpoints %v", eps)
	}
	if got := s.Etcd().Config().MaxTxnOps; got != 16 {
		t.Fatalf("MaxTxnOps %d", got)
	}
	if got := s.Etcd().Config().AutoCompactionRetention; got != "0" {
		t.Fatalf("auto-compaction retention %q", got)
	}
	rev, err := s.CompactAll(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Compacting at an already compacted revision is not an error.
	if err := s.Compact(ctx, rev); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s.Close()
	select {
	case <-s.Stopped():
	default:
		t.Fatal("not stopped after Close")
	}
}

// TestAPortConflictKeepsTheDataOfADirThatHadSome: a start on a dir that
// holds a member's data (a restart) whose first try loses its port is
// retried on new ports with the same data. Before, the retry emptied the
// dir first, as it does for a dir the failed try itself wrote into.
func TestAPortConflictKeepsTheDataOfADirThatHadSome(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dir := t.TempDir()
	get := func(s *Server) string {
		cli, err := clientv3.New(clientv3.Config{Endpoints: s.Endpoints(), DialTimeout: 5 * time.Second, Logger: FatalLogger()})
		require.NoError(t, err)
		defer cli.Close()
		resp, err := cli.Get(ctx, "/k")
		require.NoError(t, err)
		if len(resp.Kvs) == 0 {
			return ""
		}
		return string(resp.Kvs[0].Value)
	}
	s, err := Start(ctx, dir)
	require.NoError(t, err)
	cli, err := clientv3.New(clientv3.Config{Endpoints: s.Endpoints(), DialTimeout: 5 * time.Second, Logger: FatalLogger()})
	require.NoError(t, err)
	_, err = cli.Put(ctx, "/k", "kept")
	require.NoError(t, err)
	require.NoError(t, cli.Close())
	s.Close()

	taken, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer taken.Close()
	tries := 0
	conflictOnce := func(c *embed.Config) {
		tries++
		if tries == 1 { // the first try's client port is taken
			u := url.URL{Scheme: "http", Host: taken.Addr().String()}
			c.ListenClientUrls, c.AdvertiseClientUrls = []url.URL{u}, []url.URL{u}
		}
	}
	s, err = Start(ctx, dir, func(o *Options) { o.Configure = conflictOnce })
	require.NoError(t, err)
	defer s.Close()
	require.Equal(t, 2, tries, "the first try lost its port")
	require.Equal(t, "kept", get(s), "the restart kept the dir's data")
}

func TestConfigWarnsOnlyOfSlowRequests(t *testing.T) {
	cfg, err := Config(Member{Dir: t.TempDir(), ClientURL: "http://127.0.0.1:1", PeerURL: "http://127.0.0.1:2"}, ResolveOptions())
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.WarningUnaryRequestDuration; got != embed.DefaultWarningUnaryRequestDuration {
		t.Fatalf("WarningUnaryRequestDuration %v, want %v", got, embed.DefaultWarningUnaryRequestDuration)
	}
}

func TestPickPortUnique(t *testing.T) {
	seen := map[int]bool{}
	for range 50 {
		p, err := PickPort()
		if err != nil {
			t.Fatal(err)
		}
		if seen[p] {
			t.Fatalf("port %d picked twice", p)
		}
		seen[p] = true
	}
}
