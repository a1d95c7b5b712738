# l4lb: `make run` starts a local demo, `make test` installs what the tests
# need (as root, with apt-get) and runs every test.

GO       ?= go
PKGS_UNIT = $(shell $(GO) list ./... | grep -v /integration)
# Debian packages the tests, the benchmark and the soak use, as "command:package".
TEST_TOOLS  = ip:iproute2 iperf3:iperf3 ncat:ncat nft:nftables redis-server:redis-server redis-cli:redis-tools nstat:iproute2 ss:iproute2 prlimit:util-linux strace:strace useradd:passwd
BENCH_TOOLS = haproxy:haproxy nginx:nginx redis-benchmark:redis-tools iperf3:iperf3
SOAK_TOOLS  = redis-server:redis-server redis-benchmark:redis-tools iperf3:iperf3 jq:jq curl:curl ss:iproute2

.PHONY: all build run test test-unit test-integration deps bench bench-reload soak splice-proof fuzz clean

all: build

# The version l4lb reports: the commit, from git (go's own VCS stamp may be
# off, as GOFLAGS=-buildvcs=false turns it off).
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o bin/l4lb ./cmd/l4lb

run:
	./scripts/demo.sh

test: deps test-unit test-integration

test-unit:
	$(GO) vet ./...
	$(GO) test -race -count=1 $(PKGS_UNIT)
	# The TCP data path once more as where io_uring is unavailable.
	L4LB_TEST_NO_IO_URING=1 $(GO) test -race -count=1 ./l4/

test-integration: build
	$(GO) test -count=1 -timeout 10m ./integration/

deps:
	@./scripts/install-deps.sh $(TEST_TOOLS)

bench: build
	@./scripts/install-deps.sh $(BENCH_TOOLS)
	./scripts/bench.sh
	./scripts/bench-udp.sh

# What each proxy loses on reload: l4lb's reload and upgrade, HAProxy's and
# nginx's reloads, side by side under the same load (about 2 minutes). The
# script builds l4lb and its load tool into its temp dir, and installs
# HAProxy and nginx with apt-get (as root) where missing.
bench-reload:
	./scripts/bench-reload.sh

# A leak check under SOAK_MINUTES (default 10) of mixed load with reloads and
# backend kills; not part of `make test`. Exits 1 naming what l4lb did not
# give back.
soak: build
	@./scripts/install-deps.sh $(SOAK_TOOLS)
	./scripts/soak.sh

# Fuzzes each target for FUZZTIME (go test -fuzz runs one target at a
# time). New crashers land in the package's testdata/fuzz/, where `make
# test` then replays them with the committed seeds.
FUZZTIME ?= 30s
FUZZ_TARGETS = ./config/:FuzzParse ./l4/:FuzzParseProxyHeader ./l4/:FuzzProxyHeaderPrefixes

fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t##*:}; \
		echo "fuzz $$name in $$pkg for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) $$pkg; \
	done

# Shows with strace that proxied bytes move with splice(2).
splice-proof: build
	./scripts/splice-proof.sh

clean:
	rm -rf bin
