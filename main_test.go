package orchestrator

import (
	"testing"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// TestMain runs the tests against one shared etcd (etcdtest.Shared) for the
// tests that inject no fault, then stops it and checks for leaked
// goroutines.
func TestMain(m *testing.M) {
	etcdtest.Main(m)
}
