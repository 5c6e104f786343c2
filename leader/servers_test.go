package leader_test

import (
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// TestServerMatrix runs the leader failover with fencing against a server
// of each release etcdtest.MatrixVersions selects, as a process of its own
// (see the root package's TestServerMatrix).
func TestServerMatrix(t *testing.T) {
	for _, release := range etcdtest.MatrixVersions(t) {
		t.Run("etcd"+release, func(t *testing.T) {
			srv := etcdtest.StartProcess(t, etcdtest.ServerBinary(t, release))
			failoverFencesOff(t, testNames(t), srv.Client(t), processClients{t: t, srv: srv})
		})
	}
}

// processClients makes clients of a server process, closed by t.Cleanup.
type processClients struct {
	t   *testing.T
	srv *etcdtest.Process
}

// NewClient implements clientMaker.
func (p processClients) NewClient() (*clientv3.Client, error) { return p.srv.Client(p.t), nil }
