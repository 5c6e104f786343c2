package jsonstate_test

import (
	"testing"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// TestMain runs the tests on one shared etcd (etcdtest.Shared), then checks
// for leaked goroutines.
func TestMain(m *testing.M) {
	etcdtest.Main(m)
}
