// Command etcd36 is etcd 3.6.16 as a process of its own, for the server matrix
// of the orchestrator's tests (make test-servers). Its flags are
// serverkit's.
package main

import (
	"os"

	"go.etcd.io/etcd/api/v3/version"
	"go.etcd.io/etcd/server/v3/embed"

	"github.com/etcdworker/orchestrator/internal/servers/serverkit"
)

func main() {
	start := serverkit.Start(embed.ConfigFromFile, adjust, embed.StartEtcd, func(e *embed.Etcd) serverkit.Server {
		return serverkit.Server{Ready: e.Server.ReadyNotify(), Err: e.Err(), Close: e.Close}
	})
	os.Exit(serverkit.Main(version.Version, os.Args[1:], start))
}

// adjust sets the slow-request threshold, which 3.6's NewConfig leaves at 0:
// a server built from it logs every request as slow.
func adjust(cfg *embed.Config) {
	if cfg.WarningUnaryRequestDuration == 0 {
		cfg.WarningUnaryRequestDuration = embed.DefaultWarningUnaryRequestDuration
	}
}
