package orchestrator

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/etcdworker/orchestrator/internal/embedetcd"
)

// The scale benchmark runs etcd in a process of its own by default, as it is
// deployed: an etcd embedded in the benchmark process shares its heap and
// collector, and at a million keys the collector's scans of etcd's index
// weigh on every read measured, the raw baselines' as much as the worker's.
// ORCHESTRATOR_SCALE_ETCD=embedded runs it in the benchmark process instead.
//
// The child is this test binary run again with only TestScaleEtcdProcess
// selected and scaleChildDirEnv set: it starts an embedded etcd in that
// directory, prints its endpoint and serves until its standard input
// closes.

const (
	scaleChildDirEnv  = "ORCHESTRATOR_SCALE_ETCD_CHILD_DIR"
	scaleChildPrefix  = "scale-etcd-endpoint: "
	scaleChildGC      = "gc"
	scaleChildGCDone  = "scale-etcd-gc-done"
	scaleQuotaBytes   = 8 << 30
	scaleChildTimeout = time.Minute
)

// scaleEtcdMode returns "process" (the default) or "embedded".
func scaleEtcdMode(b *testing.B) string {
	switch m := os.Getenv("ORCHESTRATOR_SCALE_ETCD"); m {
	case "", "process":
		return "process"
	case "embedded":
		return m
	default:
		b.Fatalf("ORCHESTRATOR_SCALE_ETCD=%q: want process or embedded", m)
		return ""
	}
}

// TestScaleEtcdProcess is the etcd child of BenchmarkScale; it skips
// unless started by startScaleEtcdProcess.
func TestScaleEtcdProcess(t *testing.T) {
	dir := os.Getenv(scaleChildDirEnv)
	if dir == "" {
		t.Skip("the etcd process of BenchmarkScale")
	}
	ctx, cancel := context.WithTimeout(context.Background(), scaleChildTimeout)
	defer cancel()
	srv, err := embedetcd.Start(ctx, dir, embedetcd.WithQuotaBackendBytes(scaleQuotaBytes))
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	fmt.Printf("%s%s\n", scaleChildPrefix, srv.Endpoints()[0])
	// Serve until the benchmark closes stdin; collect garbage when it asks,
	// so that a read does not pay for the collection of the one before.
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		if sc.Text() == scaleChildGC {
			runtime.GC()
			fmt.Println(scaleChildGCDone)
		}
	}
}

// startScaleEtcdProcess starts the etcd child and returns its endpoint and
// a function that makes it collect its garbage and waits until it did; the
// child is stopped and joined by b.Cleanup.
func startScaleEtcdProcess(b *testing.B) (string, func()) {
	exe, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^TestScaleEtcdProcess$", "-test.bench=^$", "-test.count=1")
	cmd.Env = append(os.Environ(), scaleChildDirEnv+"="+b.TempDir())
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	found, read, collected := make(chan string, 1), make(chan struct{}), make(chan struct{}, 1)
	b.Cleanup(func() {
		_ = stdin.Close()
		<-read // the child closed its stdout: it is exiting
		_ = cmd.Wait()
	})
	go func() { // ends when the child's stdout closes
		defer close(read)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if ep, ok := strings.CutPrefix(sc.Text(), scaleChildPrefix); ok {
				found <- ep
			}
			if sc.Text() == scaleChildGCDone {
				collected <- struct{}{}
			}
		}
		close(found)
	}()
	collect := func() {
		if _, err := fmt.Fprintln(stdin, scaleChildGC); err != nil {
			b.Fatal(err)
		}
		select {
		case <-collected:
		case <-read:
			b.Fatal("the etcd process ended")
		case <-time.After(scaleChildTimeout):
			b.Fatal("the etcd process did not collect in time")
		}
	}
	select {
	case ep, ok := <-found:
		if !ok {
			b.Fatal("the etcd process ended before it served")
		}
		return ep, collect
	case <-time.After(scaleChildTimeout):
		b.Fatal("the etcd process did not start in time")
		return "", nil
	}
}
