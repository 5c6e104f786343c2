//go:build unix

package etcdtest

import (
	"errors"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestProcessServers starts each selected release as a process: it serves
// clients, reports its version, logs no request as slow under a light load
// (etcd 3.6's embed config leaves the threshold at 0 unless the program sets
// it), and Stop leaves no process behind.
func TestProcessServers(t *testing.T) {
	for _, v := range MatrixVersions(t) {
		t.Run("etcd"+v, func(t *testing.T) {
			ctx := ctxT(t, time.Minute)
			p := StartProcess(t, ServerBinary(t, v))
			require.True(t, strings.HasPrefix(p.Version(), v+"."), "version %q", p.Version())
			cli := p.Client(t)
			const puts = 20
			for i := range puts {
				mustPut(ctx, t, cli, fmt.Sprintf("k%d", i), "v")
			}
			require.Equal(t, "v", mustGet(ctx, t, cli, "k0"))
			slow := strings.Count(p.Logs(), `"msg":"request stats"`)
			require.Less(t, slow, puts/2, "requests logged as slow:\n%s", p.Logs())
			require.NoError(t, cli.Close())

			pid := p.cmd.Process.Pid
			p.Stop()
			p.Stop() // idempotent
			require.True(t, errors.Is(syscall.Kill(pid, 0), syscall.ESRCH), "the server process is still there")
		})
	}
}

// TestProcessCollectGarbage: a server started with -quota-backend-bytes
// takes that quota, collects its garbage each time it is asked and says so,
// and once it stopped, a request to collect fails at once instead of
// waiting for an answer.
func TestProcessCollectGarbage(t *testing.T) {
	for _, v := range MatrixVersions(t) {
		t.Run("etcd"+v, func(t *testing.T) {
			const quota = 3 << 30
			p := StartProcess(t, ServerBinary(t, v), fmt.Sprintf("-quota-backend-bytes=%d", quota), "-log-level=info")
			logged := fmt.Sprintf(`"quota-size-bytes":%d`, quota) // its standard error may still be on its way
			require.Eventually(t, func() bool { return strings.Contains(p.Logs(), logged) }, 10*time.Second, 10*time.Millisecond,
				"the quota is not in the logs:\n%s", p.Logs())
			for range 3 {
				start := time.Now()
				p.CollectGarbage(t)
				require.Less(t, time.Since(start), ProcessGCTimeout)
			}
			p.Stop()
			start := time.Now()
			require.ErrorContains(t, p.collectGarbage(ProcessGCTimeout), "ended")
			require.Less(t, time.Since(start), time.Second)
		})
	}
}
