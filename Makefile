GO ?= go
GOLANGCI_LINT_VERSION ?= v2.15.0
GOBIN ?= $(shell $(GO) env GOPATH)/bin
DURATION ?= 10m
# SOAK_TIMEOUT must exceed DURATION, FUZZ_TIMEOUT must exceed FUZZTIME.
SOAK_TIMEOUT ?= 3h
FUZZTIME ?= 30s
FUZZ_TIMEOUT ?= 30m
ORCHESTRATOR_SCALE_KEYS ?= 1000000
SERVERS ?= all

.PHONY: test test-servers lint bench bench-scale cover soak fuzz vuln tools

## test: the full test suite with the race detector (what CI runs). Most
## tests wait on etcd rather than burn CPU (the root package keeps one of
## two cores busy at -parallel=4), so more of them run at once than the
## default -parallel (GOMAXPROCS). ORCHESTRATOR_ETCD_STARTS=FILE counts the
## embedded etcd members started (one line each).
TEST_PARALLEL ?= 6
test:
	$(GO) test -race -count=1 -timeout=10m -parallel=$(TEST_PARALLEL) ./...

## test-servers: the server matrix: the tests that depend on the etcd server
## against etcd 3.4, 3.5, 3.6 and 3.7, each a process of its own built from
## internal/servers (SERVERS=3.5,3.7 picks releases), then the load figures of
## each release (BenchmarkServerLoad, without the race detector).
test-servers:
	ORCHESTRATOR_SERVERS=$(SERVERS) $(GO) test -race -count=1 -timeout=20m -run='^(TestServerMatrix|TestProcessServers|TestProcessCollectGarbage)$$' . ./leader ./internal/etcdtest
	ORCHESTRATOR_SERVERS=$(SERVERS) $(GO) test -count=1 -run='^$$' -bench='^BenchmarkServerLoad$$' -benchtime=1x -timeout=10m .

## lint: golangci-lint with the repo's .golangci.yml.
lint: tools
	$(GOBIN)/golangci-lint run ./...

tools:
	@test -x $(GOBIN)/golangci-lint && $(GOBIN)/golangci-lint version 2>/dev/null | grep -q "$(patsubst v%,%,$(GOLANGCI_LINT_VERSION))" || \
		$(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION)

## bench: micro-benchmarks, then the scenario table against etcd STM and raw Txns
## (one embedded etcd with fsync on; ORCHESTRATOR_BENCH_WINDOW=3s sets each window),
## then the shared Source table (workers on one Source against lone workers; its
## etcd in a process of its own is internal/servers/etcd37, a first build takes minutes).
bench:
	$(GO) test -run='^$$' -bench=. -skip='^Benchmark(Scenarios|Source)$$' -benchmem -count=1 -timeout=30m ./...
	$(GO) test -run='^$$' -bench='^BenchmarkScenarios$$' -benchtime=1x -count=1 -timeout=30m .
	$(GO) test -run='^$$' -bench='^BenchmarkSource$$' -benchtime=1x -count=1 -timeout=30m .

## bench-scale: BenchmarkScale, the worker against raw etcd reads at
## ORCHESTRATOR_SCALE_KEYS keys (default 1M; one etcd in its own process, the server
## program of internal/servers/etcd37, fsync off).
bench-scale:
	ORCHESTRATOR_SCALE_KEYS=$(ORCHESTRATOR_SCALE_KEYS) $(GO) test -run='^$$' -bench='^BenchmarkScale$$' -benchtime=1x -count=1 -timeout=60m .
	ORCHESTRATOR_SCALE_KEYS=$(ORCHESTRATOR_SCALE_KEYS) $(GO) test -run='^$$' -bench='^BenchmarkWatchApplyEvents$$' -benchmem -count=1 -timeout=30m .

## cover: coverage of every package.
cover:
	$(GO) test -count=1 -timeout=10m -parallel=$(TEST_PARALLEL) -coverprofile=coverage.out ./...
	$(GO) tool cover -func=coverage.out | tail -n 1

## soak: the fault suite with random faults for DURATION (e.g. make soak
## DURATION=10m), bounded by SOAK_TIMEOUT.
soak:
	ORCHESTRATOR_SOAK=$(DURATION) $(GO) test -race -count=1 -run='^TestSoak$$' -timeout=$(SOAK_TIMEOUT) -v .

## fuzz: each fuzz target for FUZZTIME, bounded by FUZZ_TIMEOUT.
fuzz:
	$(GO) test -run='^$$' -fuzz='^FuzzKeys$$' -fuzztime=$(FUZZTIME) -timeout=$(FUZZ_TIMEOUT) ./util
	$(GO) test -run='^$$' -fuzz='^FuzzBatch$$' -fuzztime=$(FUZZTIME) -timeout=$(FUZZ_TIMEOUT) .

## vuln: govulncheck (needs the online vulnerability database; not in CI).
vuln:
	$(GO) run golang.org/x/vuln/cmd/govulncheck@latest ./...
