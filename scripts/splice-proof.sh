#!/usr/bin/env bash
# splice-proof.sh: runs l4lb in front of an iperf3 server on loopback,
# traces it with strace during a 2-second iperf3 run, and prints the
# syscall counts: the proxied bytes go through splice(2), not read/write.
set -euo pipefail
cd "$(dirname "$0")/.."
for cmd in iperf3 strace; do
	command -v "$cmd" >/dev/null || { echo "splice-proof needs $cmd (apt-get install $cmd)" >&2; exit 1; }
done
dir=$(mktemp -d)
pids=()
cleanup() {
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$dir"
}
trap cleanup EXIT INT TERM

cat >"$dir/l4lb.toml" <<CONF
[admin]
listen = ""
[services.proof]
listen = "127.0.0.1:17811"
  [[services.proof.backends]]
  address = "127.0.0.1:17812"
CONF
iperf3 -s -B 127.0.0.1 -p 17812 >/dev/null 2>&1 &
pids+=($!)
bin/l4lb run -config "$dir/l4lb.toml" 2>"$dir/l4lb.log" &
lb=$!
pids+=($lb)
for _ in $(seq 50); do grep -q 'l4lb: ready' "$dir/l4lb.log" && break; sleep 0.1; done
strace -f -c -e trace=splice,read,write,readv,writev,sendto,recvfrom -p "$lb" -o "$dir/strace.txt" &
st=$!
sleep 0.5
iperf3 -c 127.0.0.1 -p 17811 -t 2 | tail -3
kill -INT "$st"; wait "$st" || true
cat "$dir/strace.txt"
awk '$NF == "splice" && $4 > 0 { found = 1 } END { exit !found }' "$dir/strace.txt" ||
	{ echo "no splice calls seen" >&2; exit 1; }
echo "OK: l4lb moved the bytes with splice(2)"
