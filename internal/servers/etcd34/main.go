// Command etcd34 is etcd 3.4.25 as a process of its own, for the server
// matrix of the orchestrator's tests (make test-servers). Its flags are
// serverkit's. etcd 3.4 is the module go.etcd.io/etcd, whose v3.4 tags are
// not valid module versions: go.mod pins the release's commit as a
// pseudo-version (the newest 3.4 the module proxy serves).
package main

import (
	"os"

	"go.etcd.io/etcd/embed"
	"go.etcd.io/etcd/version"

	"github.com/etcdworker/orchestrator/internal/servers/serverkit"
)

func main() {
	start := serverkit.Start(embed.ConfigFromFile, nil, embed.StartEtcd, func(e *embed.Etcd) serverkit.Server {
		return serverkit.Server{Ready: e.Server.ReadyNotify(), Err: e.Err(), Close: e.Close}
	})
	os.Exit(serverkit.Main(version.Version, os.Args[1:], start))
}
