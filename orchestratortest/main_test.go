package orchestratortest_test

import (
	"testing"

	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// TestMain runs the tests, then checks for leaked goroutines (and stops the
// shared etcd if a test used one).
func TestMain(m *testing.M) {
	etcdtest.Main(m)
}
