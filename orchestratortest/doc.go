// Package orchestratortest starts real etcd servers inside the test process,
// for testing code built on the orchestrator package (reactors, states,
// controllers that campaign for leadership) against the real thing instead
// of a mock.
//
// The servers are embedded etcd v3 members (go.etcd.io/etcd/server/v3/embed)
// listening on free 127.0.0.1 ports, with their data in a temporary
// directory, fsync off and short raft timings, so a server is ready in well
// under a second. Nothing is left behind: clients, servers and directories
// go away with Close, or with the test's Cleanup for the testing.TB helpers,
// and no goroutine outlives them (the package's own tests run under goleak).
//
// In a test:
//
//	func TestMyController(t *testing.T) {
//		client := orchestratortest.StartEtcd(t)
//		w, err := orchestrator.NewEtcdWorker(client, "/app", reactor, state)
//		...
//	}
//
// StartEtcdServer gives access to the server (endpoints, more clients,
// compaction, lease revocation), StartCluster starts several members, and
// Start is the variant without a testing.TB for examples and programs
// (MustStart panics instead of returning an error).
package orchestratortest
