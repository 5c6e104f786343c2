// Package serverkit is the part of the etcd server programs in
// internal/servers that does not depend on an etcd release: the flags, the
// configuration file handed to the release's embed.ConfigFromFile (its keys
// are the same from etcd 3.4 to 3.7), the ready line and the life cycle. It
// uses only the standard library, so that each program pins its etcd release
// alone.
package serverkit

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
)

// ReadyPrefix starts the line a program prints on its standard output once
// the server serves clients, followed by the server's version and its client
// URL: "etcd-server-ready 3.5.35 http://127.0.0.1:23790".
const ReadyPrefix = "etcd-server-ready"

// GCCommand is the line that, written to a program's standard input, makes
// it collect its garbage (runtime.GC) and then print GCDoneLine.
const GCCommand = "gc"

// GCDoneLine is the line a program prints on its standard output once the
// collection a GCCommand asked for is done.
const GCDoneLine = "etcd-server-gc-done"

// Server is a started etcd server, as a program's start function returns it.
type Server struct {
	// Ready is closed once the server serves clients.
	Ready <-chan struct{}
	// Err delivers the error the server stopped with.
	Err <-chan error
	// Close stops the server and waits until it stopped.
	Close func()
}

// StartFunc starts the server described by the etcd configuration file at
// path (embed.ConfigFromFile, then embed.StartEtcd).
type StartFunc func(path string) (Server, error)

// Start returns the StartFunc of a release: load is its
// embed.ConfigFromFile, adjust (nil: none) changes the configuration, start
// is its embed.StartEtcd and serve describes the started server.
func Start[C, E any](load func(path string) (C, error), adjust func(C), start func(C) (E, error), serve func(E) Server) StartFunc {
	return func(path string) (Server, error) {
		cfg, err := load(path)
		if err != nil {
			return Server{}, err
		}
		if adjust != nil {
			adjust(cfg)
		}
		e, err := start(cfg)
		if err != nil {
			return Server{}, err
		}
		return serve(e), nil
	}
}

// Main runs a server program: it parses args (without the program name),
// writes the configuration file, starts the server with start, prints the
// ready line with version, and serves until its standard input closes (so a
// server never outlives the process that started it), SIGINT or SIGTERM
// arrives, or the server fails. While it serves, it runs the commands it
// reads on its standard input, one a line: GCCommand (other lines are
// ignored). It returns the exit code.
func Main(version string, args []string, start StartFunc) int {
	if err := run(version, args, start); err != nil {
		fmt.Fprintf(os.Stderr, "etcd-server %s: %v\n", version, err)
		return 1
	}
	return 0
}

func run(version string, args []string, start StartFunc) error {
	cfg, clientURL, err := parseFlags(args)
	if err != nil {
		return err
	}
	path, err := writeConfig(cfg)
	if err != nil {
		return err
	}
	srv, err := start(path)
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	defer srv.Close()
	select {
	case <-srv.Ready:
	case err := <-srv.Err:
		return fmt.Errorf("stopped before it was ready: %w", err)
	}
	fmt.Printf("%s %s %s\n", ReadyPrefix, version, clientURL)

	stdinClosed := make(chan struct{})
	go func() {
		serveCommands(os.Stdin, os.Stdout)
		close(stdinClosed)
	}()
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	select {
	case <-stdinClosed:
	case <-signals:
	case err := <-srv.Err:
		return fmt.Errorf("stopped: %w", err)
	}
	return nil
}

// serveCommands runs the commands of in, one a line, until in ends (or
// fails), writing their answers to out: GCCommand collects the garbage and
// then writes GCDoneLine. Other lines are ignored.
func serveCommands(in io.Reader, out io.Writer) {
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		if strings.TrimSpace(sc.Text()) == GCCommand {
			runtime.GC()
			_, _ = fmt.Fprintln(out, GCDoneLine)
		}
	}
}

// parseFlags turns the flags into etcd configuration keys and returns them
// with the client URL.
func parseFlags(args []string) (map[string]any, string, error) {
	fs := flag.NewFlagSet("etcd-server", flag.ContinueOnError)
	name := fs.String("name", "etcd0", "member name")
	dataDir := fs.String("data-dir", "", "data directory (required)")
	clientURL := fs.String("listen-client-url", "", "client URL, e.g. http://127.0.0.1:23790 (required)")
	peerURL := fs.String("listen-peer-url", "", "peer URL, e.g. http://127.0.0.1:23800 (required)")
	advertisePeer := fs.String("advertise-peer-url", "", "peer URL published to the cluster (default: listen-peer-url)")
	cluster := fs.String("initial-cluster", "", "name=peerURL,... of every member (default: this member alone)")
	clusterState := fs.String("initial-cluster-state", "new", "new or existing")
	token := fs.String("initial-cluster-token", "etcd-server", "initial cluster token")
	compaction := fs.String("auto-compaction-retention", "0", "revisions to keep when compacting automatically (0: never)")
	fsync := fs.Bool("fsync", false, "fsync the WAL and backend (off: unsafe-no-fsync)")
	maxTxnOps := fs.Uint64("max-txn-ops", 0, "maximum operations per Txn (0: etcd's default)")
	maxRequestBytes := fs.Uint64("max-request-bytes", 0, "maximum client request size (0: etcd's default)")
	quotaBackendBytes := fs.Uint64("quota-backend-bytes", 0, "backend size at which etcd raises the NOSPACE alarm (0: etcd's default)")
	bcryptCost := fs.Uint64("bcrypt-cost", 0, "bcrypt cost of passwords (0: etcd's default)")
	heartbeat := fs.Uint("heartbeat-interval", 50, "raft heartbeat interval in milliseconds")
	election := fs.Uint("election-timeout", 500, "raft election timeout in milliseconds")
	logLevel := fs.String("log-level", "warn", "log level of the server's logs on standard error")
	if err := fs.Parse(args); err != nil {
		return nil, "", err
	}
	if *dataDir == "" || *clientURL == "" || *peerURL == "" {
		return nil, "", errors.New("-data-dir, -listen-client-url and -listen-peer-url are required")
	}
	if *advertisePeer == "" {
		*advertisePeer = *peerURL
	}
	if *cluster == "" {
		*cluster = *name + "=" + *advertisePeer
	}
	cfg := map[string]any{
		"name":                        *name,
		"data-dir":                    *dataDir,
		"listen-client-urls":          *clientURL,
		"advertise-client-urls":       *clientURL,
		"listen-peer-urls":            *peerURL,
		"initial-advertise-peer-urls": *advertisePeer,
		"initial-cluster":             *cluster,
		"initial-cluster-state":       *clusterState,
		"initial-cluster-token":       *token,
		"auto-compaction-mode":        "revision",
		"auto-compaction-retention":   *compaction,
		"unsafe-no-fsync":             !*fsync,
		"heartbeat-interval":          *heartbeat,
		"election-timeout":            *election,
		"enable-grpc-gateway":         false,
		"logger":                      "zap",
		"log-outputs":                 []string{"stderr"},
		"log-level":                   *logLevel,
	}
	for key, v := range map[string]uint64{
		"max-txn-ops": *maxTxnOps, "max-request-bytes": *maxRequestBytes,
		"quota-backend-bytes": *quotaBackendBytes, "bcrypt-cost": *bcryptCost,
	} {
		if v > 0 {
			cfg[key] = v
		}
	}
	return cfg, *clientURL, nil
}

// writeConfig writes cfg as JSON, which is YAML, next to the data directory.
func writeConfig(cfg map[string]any) (string, error) {
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return "", err
	}
	dir, _ := cfg["data-dir"].(string)
	path := filepath.Clean(dir) + ".conf.yaml"
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return "", err
	}
	return path, nil
}
