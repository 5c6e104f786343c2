module github.com/etcdworker/orchestrator/internal/servers/serverkit

go 1.26.0
