package embedetcd

import (
	"fmt"
	"os"
)

// StartsEnv names a file to which every Launch appends one line (process id
// and member directory), so that the embedded etcd members a whole `go test
// ./...` starts can be counted: ORCHESTRATOR_ETCD_STARTS=/tmp/starts make
// test; wc -l /tmp/starts.
const StartsEnv = "ORCHESTRATOR_ETCD_STARTS"

func countStart(m Member) {
	path := os.Getenv(StartsEnv)
	if path == "" {
		return
	}
	// One write of a short line to a file opened for appending: lines of
	// concurrent starts (of this process or others) do not interleave.
	f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return
	}
	_, _ = fmt.Fprintf(f, "%d %s\n", os.Getpid(), m.Dir)
	_ = f.Close()
}
