#!/usr/bin/env bash
# make run: l4lb in front of three demo backends on loopback, until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

go build -ldflags "-X main.version=$(git describe --tags --always --dirty 2>/dev/null || echo dev)" -o bin/l4lb ./cmd/l4lb
go build -o bin/demo-backend ./scripts/demo-backend

pids=()
cleanup() {
	trap - EXIT INT TERM
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
	echo "demo stopped"
}
trap cleanup EXIT INT TERM

bin/demo-backend -listen 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003 &
pids+=($!)
bin/l4lb run -config scripts/demo.toml &
pids+=($!)
lb=$!

cat <<MSG

l4lb demo: 127.0.0.1:7000 -> backends 127.0.0.1:7001, :7002, :7003 (weight 50)
  try:    nc 127.0.0.1 7000          (each line you type comes back; the greeting names the backend)
  no nc?  bash -c 'exec 3<>/dev/tcp/127.0.0.1/7000; head -1 <&3'
  status: bin/l4lb status
  edit scripts/demo.toml (e.g. set a weight to 0) and l4lb reloads it; or: kill -HUP $lb
  Ctrl-C stops everything.

MSG
wait -n "${pids[@]}"
