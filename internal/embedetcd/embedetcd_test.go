package embedetcd

import (
	"context"
	"testing"
	"time"

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
