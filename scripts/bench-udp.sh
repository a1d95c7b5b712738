#!/usr/bin/env bash
# scripts/bench-udp.sh: benchmark l4lb's UDP data path against a direct
# exchange and nginx stream (`udp reuseport`), all on loopback, all fronting
# the same two echo backends. The UDP counterpart of scripts/bench.sh, in the
# same style and output format.
#
# This is a benchmark, not a test: it prints a Markdown table (stdout) that can
# be pasted into the README; progress and diagnostics go to stderr.
#
#   scripts/bench-udp.sh                 # 3 interleaved rounds, medians
#   ROUNDS=5 scripts/bench-udp.sh        # more rounds
#   QUICK=1 scripts/bench-udp.sh         # short smoke run (1 round, 2 s runs)
#
# The load is scripts/udpload (built here): UDP_FLOWS flows (client sockets,
# distinct source ports), each keeping UDP_WINDOW datagrams outstanding
# against echo backends; a cell is replies per second (datagrams/s that made
# the round trip) or the p99 round-trip time. Loss, when there is any, is
# shown in the cell.
#
# Environment (all optional):
#   ROUNDS           rounds per cell; the cell is the median (default 3, QUICK: 1)
#   QUICK=1          short run: 2 s per measurement
#   UDP_TIME         seconds per measurement (default 5, QUICK: 2)
#   UDP_FLOWS        client flows (default 32)
#   UDP_WINDOW       datagrams outstanding per flow (default 4)
#   UDP_SIZES        datagram sizes in bytes (default "64 1200")
#   UDP_DNS=0        skip the DNS-style row (each 64 B query from a new port,
#                    l4lb replies_per_datagram = 1, nginx proxy_responses 1)
#   TARGETS          columns to run, subset of "direct l4lb nginx"
#   L4LB_BIN         use this binary instead of building bin/l4lb
#   L4LB_BALANCE     l4lb balance algorithm (default round_robin)
#   NGINX_UDP_RESPONSES  nginx proxy_responses (default unset: no limit; see start_nginx)
#   BENCH_UDP_PORT_BASE  first UDP port of the block used (default 17500; uses base+1..base+201)
#   KEEP_TMP=1       keep the temp dir (configs, proxy and server logs) for debugging
#
# Every address is on 127.0.0.1. Every process the script starts is stopped on
# exit and its temp dir removed.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BENCH_NAME=bench-udp # the prefix of the log lines
# The shared machinery (processes, packages, rounds, the table) is in bench-lib.sh.
# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"

# ---------------------------------------------------------------- settings ---

set_cmd_line scripts/bench-udp.sh "$*" QUICK ROUNDS UDP_TIME UDP_FLOWS UDP_WINDOW UDP_SIZES UDP_DNS TARGETS \
	L4LB_BIN L4LB_BALANCE NGINX_UDP_RESPONSES BENCH_UDP_PORT_BASE KEEP_TMP

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
	ROUNDS=${ROUNDS:-1}
	UDP_TIME=${UDP_TIME:-2}
else
	ROUNDS=${ROUNDS:-3}
	UDP_TIME=${UDP_TIME:-5}
fi
UDP_FLOWS=${UDP_FLOWS:-32}
UDP_WINDOW=${UDP_WINDOW:-4}
read -r -a SIZES <<<"${UDP_SIZES:-64 1200}"
L4LB_BALANCE=${L4LB_BALANCE:-round_robin}
BENCH_UDP_PORT_BASE=${BENCH_UDP_PORT_BASE:-17500}
NCPU=$(nproc)

require_positive_ints ROUNDS UDP_TIME UDP_FLOWS UDP_WINDOW BENCH_UDP_PORT_BASE
[[ -z ${NGINX_UDP_RESPONSES:-} || $NGINX_UDP_RESPONSES =~ ^[0-9]+$ ]] ||
	die "NGINX_UDP_RESPONSES must be a number, got '$NGINX_UDP_RESPONSES'"
((${#SIZES[@]})) || die "UDP_SIZES is empty"
for s in "${SIZES[@]}"; do
	[[ $s =~ ^[1-9][0-9]*$ ]] && ((s >= 16 && s <= 65507)) || die "UDP_SIZES: $s is not a size in 16-65507"
done
((BENCH_UDP_PORT_BASE + 201 < 32768)) || die "BENCH_UDP_PORT_BASE too high: keep the ports below the ephemeral range"

ALL_TARGETS=(direct l4lb nginx)
parse_targets

# Ports (UDP): the two echo backends at base+1 and base+2, l4lb at base+101,
# nginx at base+201. "direct" sends each flow straight to one of the backends,
# in turn, as the proxies' round robin would.
LOCALHOST=127.0.0.1
BACKENDS=("$LOCALHOST:$((BENCH_UDP_PORT_BASE + 1))" "$LOCALHOST:$((BENCH_UDP_PORT_BASE + 2))")
declare -A TARGET_ADDR=(
	[direct]=$(
		IFS=,
		echo "${BACKENDS[*]}"
	)
	[l4lb]=$LOCALHOST:$((BENCH_UDP_PORT_BASE + 101))
	[nginx]=$LOCALHOST:$((BENCH_UDP_PORT_BASE + 201))
)
# The DNS-style workload's service: one flow per query, ended by its reply.
declare -A DNS_ADDR=(
	[direct]=${TARGET_ADDR[direct]}
	[l4lb]=$LOCALHOST:$((BENCH_UDP_PORT_BASE + 102))
	[nginx]=$LOCALHOST:$((BENCH_UDP_PORT_BASE + 202))
)

# Workloads, in run order (one per size), and the rows they produce:
# measure_udp SIZE writes "metric value" lines. No cost rows (ROW_COST): every
# row has its ratio to direct.
WORKLOADS=()
ROWS=()
declare -A ROW_LABEL=() ROW_FMT=() ROW_COST=()
for s in "${SIZES[@]}"; do
	WORKLOADS+=("udp$s")
	ROWS+=("udp$s.dps" "udp$s.p99")
	ROW_LABEL[udp$s.dps]="UDP $s B (datagrams/s)"
	ROW_LABEL[udp$s.p99]="UDP $s B p99 RTT (ms)"
	ROW_FMT[udp$s.dps]="%.0f"
	ROW_FMT[udp$s.p99]="%.3f"
done
if [[ ${UDP_DNS:-1} != 0 ]]; then
	WORKLOADS+=(dns)
	ROWS+=(dns.dps dns.p99)
	ROW_LABEL[dns.dps]="UDP 64 B, a new port per query (queries/s)"
	ROW_LABEL[dns.p99]="UDP 64 B, a new port per query, p99 RTT (ms)"
	ROW_FMT[dns.dps]="%.0f"
	ROW_FMT[dns.p99]="%.3f"
fi

# ------------------------------------------------------- process handling ---

bench_setup l4lb-bench-udp

# ----------------------------------------------------------------- build ---

UDPLOAD=$TMP/udpload

build_udpload() {
	command -v go >/dev/null || die "go is required to build scripts/udpload"
	log "building scripts/udpload"
	go build -o "$UDPLOAD" ./scripts/udpload >"$TMP/udpload-build.log" 2>&1 ||
		die "go build ./scripts/udpload failed: $(log_reason "$TMP/udpload-build.log" 3)"
}

# -------------------------------------------------------------- backends ---

start_backends() {
	local i=0 b
	for b in "${BACKENDS[@]}"; do
		i=$((i + 1))
		start_bg echo$i "$TMP/echo$i.log" "$UDPLOAD" echo -listen "$b" -lifetime 2h
		wait_ports udp "$LAST_PID" "${b##*:}" || die "echo backend $b did not start: $(log_reason "$TMP/echo$i.log" 3)"
	done
}

# ---------------------------------------------------------------- targets ---

start_direct() { STATUS[direct]=ok; }

start_l4lb() {
	build_l4lb 0 || return 0
	local cfg=$TMP/l4lb.toml b
	{
		cat <<-EOF
			[admin]
			listen = ""

			[services.bench_udp]
			listen = "${TARGET_ADDR[l4lb]}"
			protocol = "udp"
			balance = "$L4LB_BALANCE"
			workers = 0
			idle_timeout = "60s"
			drain_timeout = "0s"

			  [services.bench_udp.health]
			  kind = "none"
		EOF
		for b in "${BACKENDS[@]}"; do
			printf '\n  [[services.bench_udp.backends]]\n  address = "%s"\n  weight = 100\n' "$b"
		done
		cat <<-EOF

			[services.bench_dns]
			listen = "${DNS_ADDR[l4lb]}"
			protocol = "udp"
			balance = "$L4LB_BALANCE"
			workers = 0
			replies_per_datagram = 1
			drain_timeout = "0s"

			  [services.bench_dns.health]
			  kind = "none"
		EOF
		for b in "${BACKENDS[@]}"; do
			printf '\n  [[services.bench_dns.backends]]\n  address = "%s"\n  weight = 100\n' "$b"
		done
	} >"$cfg"
	start_bg l4lb "$TMP/l4lb.log" "$L4LB" run -config "$cfg"
	if wait_ports udp "$LAST_PID" "${TARGET_ADDR[l4lb]##*:}"; then
		STATUS[l4lb]=ok
	else
		not_started l4lb "$TMP/l4lb.log"
	fi
}

# nginx: one session per client address:port (proxy_requests 0, the
# default), like l4lb's flows, ended by proxy_timeout after 60 s idle like
# l4lb's idle_timeout. proxy_responses is left unset (no limit) by default:
# with several datagrams outstanding per flow, `proxy_responses 1` ends a
# session whenever its replies catch up with its requests, and the next
# datagram then opens a new session and upstream socket; on this machine
# that made nginx 20-40% slower, so the default is the faster setting for
# nginx. NGINX_UDP_RESPONSES=1 measures the DNS-style setting.
start_nginx() {
	nginx_usable || return 0
	local dir=$TMP/nginx cfg=$TMP/nginx/nginx.conf b
	mkdir -p "$dir"
	{
		nginx_conf_prelude
		cat <<-EOF
			worker_processes $NCPU;
			worker_rlimit_nofile 65536;
			pid $dir/nginx.pid;
			error_log $dir/error.log warn;

			events {
			    worker_connections 16384;
			}

			stream {
			    upstream bench_udp {
		EOF
		for b in "${BACKENDS[@]}"; do echo "        server $b;"; done
		cat <<-EOF
			    }
			    server {
			        listen ${TARGET_ADDR[nginx]} udp reuseport;
			        proxy_pass bench_udp;
			        ${NGINX_UDP_RESPONSES:+proxy_responses $NGINX_UDP_RESPONSES;}
			        proxy_timeout 60s;
			    }
			    server {
			        listen ${DNS_ADDR[nginx]} udp reuseport;
			        proxy_pass bench_udp;
			        proxy_responses 1;
			        proxy_timeout 60s;
			    }
			}
		EOF
	} >"$cfg"
	start_bg nginx "$TMP/nginx.log" nginx -p "$dir" -c "$cfg" -e "$dir/error.log" -g 'daemon off;'
	if wait_ports udp "$LAST_PID" "${TARGET_ADDR[nginx]##*:}"; then
		STATUS[nginx]=ok
	else
		not_started nginx "$dir/error.log"
	fi
}

# -------------------------------------------------------------- workloads ---

# measure_udp TARGET SIZE [dns]: one udpload client run; with dns, each
# query from a new port, against the target's DNS-style service.
measure_udp() {
	local target=$1 size=$2 addr=${TARGET_ADDR[$1]} load=(-window "$UDP_WINDOW")
	if [[ ${3:-} == dns ]]; then
		addr=${DNS_ADDR[$target]} load=(-fresh)
	fi
	if ! run_client $((UDP_TIME + 30)) "$UDPLOAD" client -target "$addr" \
		-flows "$UDP_FLOWS" "${load[@]}" -size "$size" -duration "${UDP_TIME}s"; then
		log "udpload -size $size ${3:-} via $target failed: $(log_reason "$CLIENT_ERR")"
		return 1
	fi
	# One line of key=value pairs.
	tr ' ' '\n' <"$CLIENT_OUT" | awk -F= '
		$1 == "replies_per_s" && $2 > 0 { print "dps", $2; ok = 1 }
		$1 == "p99_us" { print "p99", $2 / 1000 }
		$1 == "loss_pct" { print "loss", $2 }
		END { exit !ok }' >"$RESULT" || {
		log "udpload via $target: unexpected output: $(head -c 300 "$CLIENT_OUT")"
		return 1
	}
}

# measure_workload TARGET WORKLOAD: the hook run_rounds calls (WORKLOAD udpSIZE
# or dns).
measure_workload() {
	if [[ $2 == dns ]]; then
		measure_udp "$1" 64 dns
	else
		measure_udp "$1" "${2#udp}"
	fi
}

# ----------------------------------------------------------------- output ---

# cell_extra TARGET ROW WORKLOAD: the loss, if any, in the datagrams/s cells.
cell_extra() {
	local loss
	[[ $2 == *.dps ]] || return 0
	loss=$(median <<<"${SAMPLES[$1,$3.loss]:-}") || loss=0
	if awk -v l="$loss" 'BEGIN { exit !(l > 0) }'; then printf ' [loss %s%%]' "$loss"; fi
}

print_table() {
	print_table_head "l4lb UDP loopback benchmark" nginx go
	echo "- workload: scripts/udpload, $UDP_FLOWS flows x $UDP_WINDOW datagrams outstanding, ${UDP_TIME} s" \
		"per run, 2 echo backends; nginx \`udp reuseport\`, workers = cores," \
		"proxy_responses ${NGINX_UDP_RESPONSES:-unset}, proxy_timeout 60s; the new-port-per-query rows:" \
		"$UDP_FLOWS queriers, one query at a time each, l4lb replies_per_datagram = 1, nginx proxy_responses 1"
	echo "- each cell: median of $ROUNDS interleaved round(s) (ratio to direct); clients, proxy and" \
		"backends share the same $NCPU cores; for p99 lower is better"
	echo
	print_table_body
}

# ------------------------------------------------------------------- main ---

ensure_packages ss=iproute2
command -v ss >/dev/null || die "ss is required (install iproute2, or run as root to have it installed)"
for b in "${BACKENDS[@]}" "${TARGET_ADDR[l4lb]}" "${TARGET_ADDR[nginx]}" "${DNS_ADDR[l4lb]}" "${DNS_ADDR[nginx]}"; do
	if port_bound udp "${b##*:}"; then
		die "UDP port ${b##*:} is already in use: set BENCH_UDP_PORT_BASE to a free block"
	fi
done

mark_start
log "rounds=$ROUNDS ${UDP_TIME}s per run, $UDP_FLOWS flows x window $UDP_WINDOW, sizes ${SIZES[*]}; targets: ${TARGET_LIST[*]}"
build_udpload
start_backends
start_targets
run_rounds

print_table
log "done in $((SECONDS - START)) s"
