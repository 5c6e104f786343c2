// Command etcd35 is etcd 3.5.35 as a process of its own, for the server matrix
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
	start := serverkit.Start(embed.ConfigFromFile, nil, embed.StartEtcd, func(e *embed.Etcd) serverkit.Server {
		return serverkit.Server{Ready: e.Server.ReadyNotify(), Err: e.Err(), Close: e.Close}
	})
	os.Exit(serverkit.Main(version.Version, os.Args[1:], start))
}
