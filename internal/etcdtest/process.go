package etcdtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/internal/embedetcd"
)

// etcd servers as processes of their own, one program per release.
//
// internal/servers/etcdXY is a Go module of its own that pins etcd release
// X.Y (so the library's go.mod stays on one release) and builds a small
// server program on that release's embed package. ServerBinary builds it;
// StartProcess runs it as a child process.

const (
	// ServerBuildTimeout bounds one build of a server program (a first
	// build compiles a whole etcd release: minutes on two cores).
	ServerBuildTimeout = 15 * time.Minute
	// ProcessReadyTimeout bounds how long StartProcess waits for the
	// server's ready line.
	ProcessReadyTimeout = 30 * time.Second
	// ProcessGCTimeout bounds how long CollectGarbage waits for the server
	// to say that it collected its garbage.
	ProcessGCTimeout = time.Minute
	// MatrixEnv selects the releases the server matrix runs against:
	// "all", or a comma-separated list such as "3.5,3.7". Unset, the
	// matrix tests skip (make test-servers sets it).
	MatrixEnv = "ORCHESTRATOR_SERVERS"
	// serverBinEnv overrides where ServerBinary puts the programs.
	serverBinEnv = "ORCHESTRATOR_SERVER_BIN"
	// readyPrefix starts the server program's ready line (serverkit's
	// ReadyPrefix): "etcd-server-ready <version> <client URL>". This and the
	// two constants below are copies of serverkit's, which is a module of
	// its own that this module does not require.
	readyPrefix = "etcd-server-ready "
	// gcCommand, written to the server's standard input, makes it collect
	// its garbage (serverkit's GCCommand).
	gcCommand = "gc"
	// gcDoneLine is the line the server prints once it did (serverkit's
	// GCDoneLine).
	gcDoneLine = "etcd-server-gc-done"
)

// ProcessVersions returns the etcd releases internal/servers has a program
// for, oldest first.
func ProcessVersions() []string { return []string{"3.4", "3.5", "3.6", "3.7"} }

// MatrixVersions returns the releases MatrixEnv selects, and skips t when
// it selects none. The test fails on a release without a program.
func MatrixVersions(t testing.TB) []string {
	t.Helper()
	sel := os.Getenv(MatrixEnv)
	switch sel {
	case "":
		t.Skipf("the server matrix runs with %s=all (make test-servers)", MatrixEnv)
	case "all":
		return ProcessVersions()
	}
	var out []string
	for _, v := range strings.Split(sel, ",") {
		v = strings.TrimSpace(v)
		if !slices.Contains(ProcessVersions(), v) {
			t.Fatalf("etcdtest: %s=%q: no server program for %q (have %v)", MatrixEnv, sel, v, ProcessVersions())
		}
		out = append(out, v)
	}
	return out
}

// Target is an etcd that tests run against: an embedded Server or a
// Process.
type Target interface {
	// Endpoints returns the client URLs.
	Endpoints() []string
	// Client returns a new client, closed by t.Cleanup.
	Client(t testing.TB) *clientv3.Client
}

// ServerBinary builds the server program of release version (one of
// ProcessVersions, e.g. "3.5") and returns its path. The program goes to
// $ORCHESTRATOR_SERVER_BIN, by default a directory in the user's cache
// directory; go build links it again only when its sources or dependencies
// changed (the packages come from the Go build cache), so after the first
// build it costs about a second. Builds of one release by concurrent test
// processes take turns. The test fails if the build fails or takes longer
// than ServerBuildTimeout.
func ServerBinary(t testing.TB, version string) string {
	t.Helper()
	path, err := buildServer(version)
	if err != nil {
		t.Fatalf("etcdtest: %v", err)
	}
	return path
}

func buildServer(version string) (string, error) {
	name := "etcd" + strings.ReplaceAll(version, ".", "")
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", errors.New("cannot locate internal/servers")
	}
	src := filepath.Join(filepath.Dir(file), "..", "servers", name)
	if _, err := os.Stat(filepath.Join(src, "go.mod")); err != nil {
		return "", fmt.Errorf("no server program for etcd %q (want one of %v): %w", version, ProcessVersions(), err)
	}
	dir := os.Getenv(serverBinEnv)
	if dir == "" {
		cache, err := os.UserCacheDir()
		if err != nil {
			return "", fmt.Errorf("no cache directory for the server programs (set %s): %w", serverBinEnv, err)
		}
		dir = filepath.Join(cache, "orchestrator-etcd-servers")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	unlock, err := lockFile(filepath.Join(dir, name+".lock"))
	if err != nil {
		return "", err
	}
	defer unlock()
	ctx, cancel := context.WithTimeout(context.Background(), ServerBuildTimeout)
	defer cancel()
	bin := filepath.Join(dir, name)
	cmd := exec.CommandContext(ctx, "go", "build", "-buildvcs=false", "-ldflags=-s -w", "-o", bin, ".")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "GOWORK=off")
	start := time.Now()
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build the etcd %s server (%v): %w\n%s", version, time.Since(start).Round(time.Second), err, out)
	}
	return bin, nil
}

// Process is an etcd server running as a child process, in a process group
// of its own, with its data in a test's temporary directory.
type Process struct {
	version  string
	endpoint string
	cmd      *exec.Cmd
	stdin    io.WriteCloser // held open: the server stops when it closes
	out      *serverOutput  // the server's standard output
	logs     *Buffer        // the server's standard error
	exited   chan struct{}  // closed once the process was waited for
	waitErr  error          // set before exited is closed
	stopOnce sync.Once
	gcMu     sync.Mutex // one CollectGarbage at a time
}

// StartProcess starts the server program binary (see ServerBinary) as a
// single member with its data in t.TempDir(), client and peer URLs on free
// 127.0.0.1 ports, fsync off and no auto-compaction, plus flags (serverkit's,
// e.g. "-bcrypt-cost=4"). It waits for the server's ready line (at most
// ProcessReadyTimeout) and registers Stop with t.Cleanup. A start that loses
// a port race is retried with other ports. The test fails if the server
// does not start.
func StartProcess(t testing.TB, binary string, flags ...string) *Process {
	t.Helper()
	dir := t.TempDir()
	var lastErr error
	for attempt := range 5 {
		p, err := startProcess(binary, filepath.Join(dir, fmt.Sprintf("try%d", attempt)), flags)
		if err == nil {
			t.Cleanup(p.Stop)
			return p
		}
		lastErr = err
		if !embedetcd.IsAddrInUse(err) {
			break
		}
	}
	t.Fatalf("etcdtest: start %s: %v", filepath.Base(binary), lastErr)
	return nil
}

func startProcess(binary, dir string, flags []string) (*Process, error) {
	curl, err := embedetcd.PickURL()
	if err != nil {
		return nil, err
	}
	purl, err := embedetcd.PickURL()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	args := append([]string{"-data-dir", filepath.Join(dir, "data"),
		"-listen-client-url", curl, "-listen-peer-url", purl}, flags...)
	cmd := exec.Command(binary, args...)
	p := &Process{cmd: cmd, out: newServerOutput(), logs: &Buffer{}, exited: make(chan struct{}), endpoint: curl}
	cmd.Stdout, cmd.Stderr = p.out, p.logs
	setProcessGroup(cmd)
	// The server stops when its standard input closes: it does not outlive
	// this process, however this process ends.
	if p.stdin, err = cmd.StdinPipe(); err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	timer := time.NewTimer(ProcessReadyTimeout)
	defer timer.Stop()
	select {
	case line := <-p.out.ready:
		p.version, _, _ = strings.Cut(line, " ")
		return p, nil
	case <-p.exited:
		return nil, fmt.Errorf("exited before it was ready (%w): %s", p.waitErr, p.logs.String())
	case <-timer.C:
		p.Stop()
		return nil, fmt.Errorf("not ready after %v: %s", ProcessReadyTimeout, p.logs.String())
	}
}

// Endpoints returns the server's client URL.
func (p *Process) Endpoints() []string { return []string{p.endpoint} }

// Version returns the version the server reported, e.g. "3.5.35".
func (p *Process) Version() string { return p.version }

// Client returns a new client connected to the server, closed by t.Cleanup
// (before the server, since cleanups run last-in first-out).
func (p *Process) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	return NewClient(t, p.endpoint)
}

// Logs returns what the server wrote to its standard error so far (its
// warnings and errors, as JSON lines).
func (p *Process) Logs() string { return p.logs.String() }

// CollectGarbage makes the server collect its garbage (runtime.GC in its
// process) and waits until it says it did, at most ProcessGCTimeout. The
// test fails if the process ended or did not answer in time.
func (p *Process) CollectGarbage(t testing.TB) {
	t.Helper()
	if err := p.collectGarbage(ProcessGCTimeout); err != nil {
		t.Fatalf("etcdtest: %v", err)
	}
}

func (p *Process) collectGarbage(timeout time.Duration) error {
	p.gcMu.Lock()
	defer p.gcMu.Unlock()
	select {
	case <-p.exited:
		return fmt.Errorf("collect garbage: %w", p.endedError())
	case <-p.out.gcDone: // the late answer to an earlier request that timed out
	default:
	}
	if _, err := io.WriteString(p.stdin, gcCommand+"\n"); err != nil {
		return fmt.Errorf("collect garbage: %w", err)
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-p.out.gcDone:
		return nil
	case <-p.exited:
		return fmt.Errorf("collect garbage: %w: %s", p.endedError(), p.logs.String())
	case <-timer.C:
		return fmt.Errorf("collect garbage: no answer after %v", timeout)
	}
}

// endedError says how the process ended; call it once exited is closed.
func (p *Process) endedError() error {
	if p.waitErr == nil {
		return errors.New("the server process ended")
	}
	return fmt.Errorf("the server process ended: %w", p.waitErr)
}

// Stop kills the server's process group and waits until the process is
// gone. It is idempotent and also run by t.Cleanup.
func (p *Process) Stop() {
	p.stopOnce.Do(func() {
		killProcessGroup(p.cmd)
		<-p.exited
		_ = p.stdin.Close()
	})
}

// serverOutput receives the server's standard output, a line at a time: it
// delivers the rest of the ready line once (on ready) and signals each
// gc-done line (on gcDone, which holds one signal; more are dropped). Other
// lines are ignored.
type serverOutput struct {
	mu     sync.Mutex
	buf    []byte
	done   bool // the ready line was delivered
	ready  chan string
	gcDone chan struct{}
}

func newServerOutput() *serverOutput {
	return &serverOutput{ready: make(chan string, 1), gcDone: make(chan struct{}, 1)}
}

func (w *serverOutput) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, b...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			return len(b), nil
		}
		line := string(w.buf[:i])
		w.buf = w.buf[i+1:]
		if rest, ok := strings.CutPrefix(line, readyPrefix); ok && !w.done {
			w.done = true
			w.ready <- rest
		} else if line == gcDoneLine {
			select {
			case w.gcDone <- struct{}{}:
			default:
			}
		}
	}
}
