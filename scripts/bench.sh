#!/usr/bin/env bash
# scripts/bench.sh: benchmark l4lb against a direct connection, HAProxy and
# nginx stream, all on loopback, all fronting the same local backends.
#
# This is a benchmark, not a test: it prints a Markdown table (stdout) that can
# be pasted into the README; progress and diagnostics go to stderr.
#
#   scripts/bench.sh                 # 3 interleaved rounds, medians
#   ROUNDS=5 scripts/bench.sh        # more rounds
#   QUICK=1 scripts/bench.sh         # short smoke run (1 round, short workloads)
#
# Environment (all optional):
#   ROUNDS           rounds per cell; the cell is the median (default 3, QUICK: 1)
#   QUICK=1          short run: 2 s iperf3 tests, fewer redis requests
#   IPERF_TIME       seconds per iperf3 test (default 5, QUICK: 2)
#   REDIS_CLIENTS    redis-benchmark -c (default 50)
#   REDIS_N_K1       redis-benchmark -n with keep-alive (default 200000, QUICK: 20000)
#   REDIS_N_K0       redis-benchmark -n with -k 0, one connection per request
#                    (default 20000, QUICK: 3000)
#   IDLE_CONNS       idle proxied connections held for the descriptor and
#                    memory rows (default 10000, QUICK: 2000)
#   TARGETS          columns to run, subset of "direct l4lb haproxy nginx"
#   L4LB_BIN         use this binary instead of building bin/l4lb
#   L4LB_BALANCE     l4lb balance algorithm (default round_robin)
#   BENCH_PORT_BASE  first port of the block used (default 17000; uses base+1..base+303)
#   KEEP_TMP=1       keep the temp dir (configs, proxy and server logs) for debugging
#
# Every address is on 127.0.0.1. Every process the script starts is stopped on
# exit, its temp dir removed, and any sysctl it changes is restored.
#
# Structure: one measure_<workload> function per workload (ROW_* tables list the
# rows each produces) and one start_<target> function per proxy, so new rows
# (UDP later) and new columns slot in without touching the driver.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BENCH_NAME=bench # the prefix of the log lines
# The shared machinery (processes, packages, rounds, the table) is in bench-lib.sh.
# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"

# ---------------------------------------------------------------- settings ---

# Remember what the user set explicitly, to print the exact command.
set_cmd_line scripts/bench.sh "$*" QUICK ROUNDS IPERF_TIME REDIS_CLIENTS REDIS_N_K1 REDIS_N_K0 \
	IDLE_CONNS TARGETS L4LB_BIN L4LB_BALANCE BENCH_PORT_BASE KEEP_TMP

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
	ROUNDS=${ROUNDS:-1}
	IPERF_TIME=${IPERF_TIME:-2}
	REDIS_N_K1=${REDIS_N_K1:-20000}
	REDIS_N_K0=${REDIS_N_K0:-3000}
	IDLE_CONNS=${IDLE_CONNS:-2000}
else
	ROUNDS=${ROUNDS:-3}
	IPERF_TIME=${IPERF_TIME:-5}
	REDIS_N_K1=${REDIS_N_K1:-200000}
	REDIS_N_K0=${REDIS_N_K0:-20000}
	IDLE_CONNS=${IDLE_CONNS:-10000}
fi
REDIS_CLIENTS=${REDIS_CLIENTS:-50}
L4LB_BALANCE=${L4LB_BALANCE:-round_robin}
BENCH_PORT_BASE=${BENCH_PORT_BASE:-17000}
NCPU=$(nproc)
CLK_TCK=$(getconf CLK_TCK)

# The idle rows hold IDLE_CONNS proxied connections: two descriptors each in
# a proxy, one in the client and one in the backend. Root may raise the
# descriptor limit of this shell (and so of everything it starts) for that.
FD_WANT=$((5 * IDLE_CONNS / 2 + 4096))
if (($(ulimit -Hn) < FD_WANT)) && ((EUID == 0)); then ulimit -Hn "$FD_WANT" 2>/dev/null || true; fi
if (($(ulimit -Sn) < FD_WANT)); then ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true; fi

# Connection limits for the proxies, kept inside the hard fd limit: a proxied
# connection costs two fds, plus HAProxy's splice pipes (maxconn/4 pipes of two
# fds each), and HAProxy refuses to start if it cannot get them all.
FD_HARD=$(ulimit -Hn)
[[ $FD_HARD =~ ^[0-9]+$ ]] || FD_HARD=1048576
# Where the limit cannot be raised, hold fewer idle connections: l4lb bounds
# its connections at a third of its descriptors (cmd/l4lb/nofile.go).
IDLE_FIT=$(((FD_HARD - 512) / 3 / 1000 * 1000))
if ((IDLE_CONNS > IDLE_FIT)); then
	echo "[bench] descriptor limit $FD_HARD: IDLE_CONNS lowered from $IDLE_CONNS to $IDLE_FIT" >&2
	IDLE_CONNS=$IDLE_FIT
fi
PROXY_MAXCONN=$(((FD_HARD - 256) * 2 / 5))
MAXCONN_CAP=$((IDLE_CONNS + 1000 > 8000 ? IDLE_CONNS + 1000 : 8000))
((PROXY_MAXCONN <= MAXCONN_CAP)) || PROXY_MAXCONN=$MAXCONN_CAP

require_positive_ints ROUNDS IPERF_TIME REDIS_CLIENTS REDIS_N_K1 REDIS_N_K0 IDLE_CONNS BENCH_PORT_BASE
((BENCH_PORT_BASE + 303 < 32768)) || die "BENCH_PORT_BASE too high: keep the ports below the ephemeral range"

ALL_TARGETS=(direct l4lb haproxy nginx)
parse_targets

# Ports: backends at base+1.., then one block of 100 per proxy; within a block
# +1 is the iperf3 service, +2 the redis service and +3 the idle-connection
# service (scripts/idleconns).
declare -A PORT=()
BACKEND_KINDS=(iperf redis idle)
for t in direct l4lb haproxy nginx; do
	case $t in direct) b=0 ;; l4lb) b=100 ;; haproxy) b=200 ;; nginx) b=300 ;; esac
	for ((k = 0; k < ${#BACKEND_KINDS[@]}; k++)); do
		PORT[$t,${BACKEND_KINDS[k]}]=$((BENCH_PORT_BASE + b + k + 1))
	done
done
LOCALHOST=127.0.0.1

# Workloads, in run order, and the rows ("workload.metric", label, printf
# format) they produce: measure_<workload> writes "metric value" lines.
WORKLOADS=(iperf_p1 iperf_p8 redis_k1 redis_k0 idle)
ROWS=(iperf_p1.gbps iperf_p8.gbps redis_k1.rps redis_k1.p99 redis_k0.rps redis_k0.p99
	idle.fds idle.kib iperf_p1.cpugb iperf_p8.cpugb redis_k1.cpu redis_k0.cpu
	iperf_p1.busygb iperf_p8.busygb redis_k1.busy redis_k0.busy)
declare -A ROW_LABEL=(
	[iperf_p1.gbps]="iperf3 -P 1 (Gbit/s)"
	[iperf_p8.gbps]="iperf3 -P 8 (Gbit/s)"
	[redis_k1.rps]="redis -k 1 (req/s)"
	[redis_k1.p99]="redis -k 1 p99 (ms)"
	[redis_k0.rps]="redis -k 0 (req/s)"
	[redis_k0.p99]="redis -k 0 p99 (ms)"
	[idle.fds]="proxy fds per idle connection"
	[idle.kib]="KiB per idle connection (kernel + proxy)"
	[iperf_p1.cpugb]="proxy CPU-s per GB, iperf3 -P 1"
	[iperf_p8.cpugb]="proxy CPU-s per GB, iperf3 -P 8"
	[redis_k1.cpu]="proxy CPU-ms per 1000 requests, redis -k 1"
	[redis_k0.cpu]="proxy CPU-ms per 1000 requests, redis -k 0"
	[iperf_p1.busygb]="all-core busy CPU-s per GB, iperf3 -P 1"
	[iperf_p8.busygb]="all-core busy CPU-s per GB, iperf3 -P 8"
	[redis_k1.busy]="all-core busy CPU-µs per request, redis -k 1"
	[redis_k0.busy]="all-core busy CPU-µs per request, redis -k 0"
)
declare -A ROW_FMT=(
	[iperf_p1.gbps]="%.2f" [iperf_p8.gbps]="%.2f"
	[redis_k1.rps]="%.0f" [redis_k1.p99]="%.3f"
	[redis_k0.rps]="%.0f" [redis_k0.p99]="%.3f"
	[idle.fds]="%.2f" [idle.kib]="%.1f"
	[iperf_p1.cpugb]="%.3f" [iperf_p8.cpugb]="%.3f"
	[redis_k1.cpu]="%.1f" [redis_k0.cpu]="%.1f"
	[iperf_p1.busygb]="%.3f" [iperf_p8.busygb]="%.3f"
	[redis_k1.busy]="%.1f" [redis_k0.busy]="%.1f"
)
# Rows that measure what the proxy itself costs: no ratio to direct, which
# costs nothing (the value is direct's cell: n/a for CPU, 0 for descriptors
# and memory); lower is better.
declare -A ROW_COST=([idle.fds]=0 [idle.kib]=0 [iperf_p1.cpugb]=– [iperf_p8.cpugb]=– [redis_k1.cpu]=– [redis_k0.cpu]=–)

# ------------------------------------------------------- process handling ---

bench_setup l4lb-bench

# ------------------------------------------------------ process accounting ---

declare -A TPID=() # target -> main PID of the proxy

# target_pids TARGET: the processes of a proxy (nginx: master and workers).
target_pids() {
	local pid=${TPID[$1]:-}
	[[ -n $pid ]] || return 0
	echo "$pid"
	pgrep -P "$pid" 2>/dev/null || true
}

# cpu_ticks PID...: user + system CPU time of the processes, in clock ticks.
cpu_ticks() {
	local pid total=0 stat f
	for pid in "$@"; do
		stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
		# Fields after the ")" that ends the command name: utime is the
		# 12th, stime the 13th.
		read -r -a f <<<"${stat##*) }"
		total=$((total + f[11] + f[12]))
	done
	echo "$total"
}

# busy_ticks: time all cores spent busy since boot, in clock ticks: user,
# nice, system, irq and softirq from /proc/stat. Softirq matters: the
# kernel delivers loopback packets there, and that time is charged to no
# process, so the proxy's own CPU rows leave it out. Steal is not counted
# (the hypervisor running someone else).
busy_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat; }

# rss_kib PID...: resident memory of the processes, in KiB.
rss_kib() {
	local pid total=0 v
	for pid in "$@"; do
		v=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || v=
		total=$((total + ${v:-0}))
	done
	echo "$total"
}

# fd_count PID...: open descriptors of the processes.
fd_count() {
	local pid total=0 n
	for pid in "$@"; do
		n=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l) || n=0
		total=$((total + n))
	done
	echo "$total"
}

# kernel_kib: kernel memory that sockets use, in KiB: slab caches (socket,
# inode, file, epoll entries...) plus TCP buffer pages, less TIME_WAIT
# sockets, which a previous cell's closes leave behind for a minute and
# which would otherwise drift into this cell's numbers.
kernel_kib() {
	local slab tcp_pages tw=0
	slab=$(awk '/^Slab:/ { print $2 }' /proc/meminfo)
	tcp_pages=$(awk '$1 == "TCP:" { for (i = 2; i < NF; i++) if ($i == "mem") print $(i + 1) }' /proc/net/sockstat)
	if [[ -r /proc/slabinfo ]]; then
		tw=$(awk '$1 == "tw_sock_TCP" || $1 == "tw_sock_TCPv6" { kib += $3 * $4 / 1024 } END { printf "%d\n", kib }' /proc/slabinfo 2>/dev/null) || tw=0
	fi
	echo $((slab + ${tcp_pages:-0} * $(getconf PAGESIZE) / 1024 - tw))
}

# -------------------------------------------------------------- backends ---

start_iperf3_server() {
	local p=${PORT[direct,iperf]}
	start_bg iperf3-server "$TMP/iperf3-server.log" iperf3 -s -B "$LOCALHOST" -p "$p"
	wait_ports tcp "$LAST_PID" "$p"
}

build_idleconns() {
	command -v go >/dev/null || die "go is needed to build scripts/idleconns (the idle-connection rows)"
	go build -o "$TMP/idleconns" ./scripts/idleconns >"$TMP/idleconns-build.log" 2>&1 ||
		die "go build ./scripts/idleconns failed: $(log_reason "$TMP/idleconns-build.log" 3)"
	IDLECONNS=$TMP/idleconns
}

start_backends() {
	start_iperf3_server || die "iperf3 server did not start: $(log_reason "$TMP/iperf3-server.log" 3)"
	build_idleconns
	start_bg idleconns-server "$TMP/idleconns-server.log" "$IDLECONNS" serve -listen "$LOCALHOST:${PORT[direct,idle]}"
	wait_ports tcp "$LAST_PID" "${PORT[direct,idle]}" || die "idleconns server did not start: $(log_reason "$TMP/idleconns-server.log" 3)"
	local p=${PORT[direct,redis]}
	start_bg redis-server "$TMP/redis-server.log" redis-server --bind "$LOCALHOST" --port "$p" \
		--save '' --appendonly no --daemonize no --dir "$TMP" --maxclients 10000 --tcp-backlog 4096
	wait_ports tcp "$LAST_PID" "$p" || die "redis-server did not start: $(log_reason "$TMP/redis-server.log" 3)"
}

# ---------------------------------------------------------------- targets ---
# start_<target> sets STATUS[target]: "ok" when its iperf and redis ports
# listen, otherwise "n/a (reason)". It must not fail the run.

start_direct() { STATUS[direct]=ok; }

start_l4lb() {
	build_l4lb 15 || return 0
	local cfg=$TMP/l4lb.toml kind
	{
		printf '[admin]\nlisten = ""\n'
		for kind in "${BACKEND_KINDS[@]}"; do
			cat <<-EOF

				[services.bench_$kind]
				listen = "$LOCALHOST:${PORT[l4lb,$kind]}"
				protocol = "tcp"
				balance = "$L4LB_BALANCE"
				workers = 0
				connect_timeout = "3s"
				idle_timeout = "1h"

				  [[services.bench_$kind.backends]]
				  address = "$LOCALHOST:${PORT[direct,$kind]}"
				  weight = 100
			EOF
		done
	} >"$cfg"
	start_bg l4lb "$TMP/l4lb.log" "$L4LB" run -config "$cfg"
	if wait_ports tcp "$LAST_PID" "${PORT[l4lb,iperf]}" "${PORT[l4lb,redis]}" "${PORT[l4lb,idle]}"; then
		STATUS[l4lb]=ok
		TPID[l4lb]=$LAST_PID
	else
		not_started l4lb "$TMP/l4lb.log"
	fi
}

start_haproxy() {
	command -v haproxy >/dev/null || { STATUS[haproxy]="n/a (haproxy not installed)"; return 0; }
	local cfg=$TMP/haproxy.cfg kind
	{
		cat <<-EOF
			global
			    nbthread $NCPU
			    maxconn $PROXY_MAXCONN
			    pidfile $TMP/haproxy.pid

			defaults
			    mode tcp
			    balance roundrobin
			    option splice-auto
			    maxconn $PROXY_MAXCONN
			    timeout connect 3s
			    timeout client 1h
			    timeout server 1h
		EOF
		for kind in "${BACKEND_KINDS[@]}"; do
			cat <<-EOF

				listen bench_$kind
				    bind $LOCALHOST:${PORT[haproxy,$kind]}
				    server ${kind}1 $LOCALHOST:${PORT[direct,$kind]}
			EOF
		done
	} >"$cfg"
	start_bg haproxy "$TMP/haproxy.log" haproxy -f "$cfg" -db
	if wait_ports tcp "$LAST_PID" "${PORT[haproxy,iperf]}" "${PORT[haproxy,redis]}" "${PORT[haproxy,idle]}"; then
		STATUS[haproxy]=ok
		TPID[haproxy]=$LAST_PID
	else
		not_started haproxy "$TMP/haproxy.log"
	fi
}

start_nginx() {
	nginx_usable || return 0
	local dir=$TMP/nginx cfg=$TMP/nginx/nginx.conf kind
	mkdir -p "$dir"
	{
		nginx_conf_prelude
		cat <<-EOF
			worker_processes $NCPU;
			worker_rlimit_nofile $FD_HARD;
			pid $dir/nginx.pid;
			error_log $dir/error.log warn;

			events {
			    worker_connections $((2 * PROXY_MAXCONN));
			}

			stream {
		EOF
		for kind in "${BACKEND_KINDS[@]}"; do
			cat <<-EOF
				    server {
				        listen $LOCALHOST:${PORT[nginx,$kind]} reuseport;
				        proxy_pass $LOCALHOST:${PORT[direct,$kind]};
				        proxy_connect_timeout 3s;
				        proxy_timeout 1h;
				    }
			EOF
		done
		echo "}"
	} >"$cfg"
	start_bg nginx "$TMP/nginx.log" nginx -p "$dir" -c "$cfg" -e "$dir/error.log" -g 'daemon off;'
	if wait_ports tcp "$LAST_PID" "${PORT[nginx,iperf]}" "${PORT[nginx,redis]}" "${PORT[nginx,idle]}"; then
		STATUS[nginx]=ok
		TPID[nginx]=$LAST_PID
	else
		not_started nginx "$dir/error.log"
	fi
}

# -------------------------------------------------------------- workloads ---
# measure_<workload> TARGET writes "metric value" lines to $RESULT, or fails.
# They run in this shell (not in $(...)) and their clients through run_client,
# so that INT/TERM stop the run at once instead of after the current client.

# is_positive X: X is a number > 0.
is_positive() { awk -v x="$1" 'BEGIN { exit !(x ~ /^[0-9.eE+-]+$/ && x + 0 > 0) }'; }

# iperf3_run TARGET P: one iperf3 test against TARGET with P parallel streams.
iperf3_run() {
	local target=$1 streams=$2 port=${PORT[$1,iperf]} attempt err gbps gb t0 t1 b0 b1
	local -a pids
	mapfile -t pids < <(target_pids "$target")
	# The iperf3 server runs one test at a time and answers "busy" while it
	# still tears the previous one down: retry that (bounded).
	for ((attempt = 0; attempt < 20; attempt++)); do
		t0=$(cpu_ticks "${pids[@]}") b0=$(busy_ticks)
		if run_client $((IPERF_TIME + 30)) iperf3 -c "$LOCALHOST" -p "$port" -t "$IPERF_TIME" \
			-P "$streams" -J --connect-timeout 3000; then
			t1=$(cpu_ticks "${pids[@]}") b1=$(busy_ticks)
			gbps=$(jq -r '.end.sum_received.bits_per_second / 1e9' "$CLIENT_OUT" 2>/dev/null) || gbps=
			gb=$(jq -r '.end.sum_received.bytes / 1e9' "$CLIENT_OUT" 2>/dev/null) || gb=
			if is_positive "$gbps"; then
				echo "gbps $gbps" >"$RESULT"
				# Proxy CPU time (user + system, every process of the
				# proxy) per GB that reached the iperf3 server.
				if ((${#pids[@]})) && is_positive "$gb"; then
					awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v gb="$gb" 'BEGIN { printf "cpugb %.4f\n", t / hz / gb }' >>"$RESULT"
				fi
				# What the whole machine spent per GB: client, proxy, server
				# and the kernel's softirq work, for direct too.
				if is_positive "$gb"; then
					awk -v t=$((b1 - b0)) -v hz="$CLK_TCK" -v gb="$gb" 'BEGIN { printf "busygb %.4f\n", t / hz / gb }' >>"$RESULT"
				fi
				return 0
			fi
			err="no throughput in the iperf3 output"
			break
		fi
		err=$(jq -r '.error // empty' "$CLIENT_OUT" 2>/dev/null) || err=
		[[ -n $err ]] || err=$(log_reason "$CLIENT_ERR")
		[[ $err == *busy* ]] || break
		sleep 0.25
	done
	log "iperf3 -P $streams via $target failed: $err"
	# A test cut short can leave the iperf3 server waiting (busy) for a long
	# time: restart it so the next cells do not fail too.
	stop_named iperf3-server
	start_iperf3_server || log "could not restart the iperf3 server: $(log_reason "$TMP/iperf3-server.log")"
	return 1
}
measure_iperf_p1() { iperf3_run "$1" 1; }
measure_iperf_p8() { iperf3_run "$1" 8; }

# redis_run TARGET KEEPALIVE N: redis-benchmark PING (multibulk) against TARGET.
redis_run() {
	local target=$1 k=$2 n=$3 port=${PORT[$1,redis]} t0 t1 b0 b1
	local -a pids
	mapfile -t pids < <(target_pids "$target")
	t0=$(cpu_ticks "${pids[@]}") b0=$(busy_ticks)
	if ! run_client 180 redis-benchmark -h "$LOCALHOST" -p "$port" -t ping_mbulk \
		-c "$REDIS_CLIENTS" -k "$k" -n "$n" --csv; then
		log "redis-benchmark -k $k via $target failed: $(log_reason "$CLIENT_ERR")"
		return 1
	fi
	t1=$(cpu_ticks "${pids[@]}") b1=$(busy_ticks)
	# --csv: a header line naming the columns, then one line per test.
	awk -F, '{ gsub(/"/, "") }
		NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
		$1 == "PING_MBULK" && ("rps" in col) && ("p99_latency_ms" in col) && $col["rps"] > 0 {
			print "rps", $col["rps"]; print "p99", $col["p99_latency_ms"]; found = 1 }
		END { exit !found }' "$CLIENT_OUT" >"$RESULT" || {
		log "redis-benchmark -k $k via $target: unexpected output: $(head -c 300 "$CLIENT_OUT" | tr '\n' ' ')"
		return 1
	}
	# Proxy CPU time (user + system, every process of the proxy) per 1000
	# requests: steadier on this shared machine than requests/s.
	if ((${#pids[@]})); then
		awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$n" 'BEGIN { printf "cpu %.4f\n", t / hz * 1000 / (n / 1000) }' >>"$RESULT"
	fi
	# The whole machine's busy time per request (client, proxy, server,
	# softirq). The cores are nearly saturated in every column, direct
	# included, so its ratio to direct's predicts the requests/s ratio:
	# it shows how much any proxy may add for a given target.
	awk -v t=$((b1 - b0)) -v hz="$CLK_TCK" -v n="$n" 'BEGIN { printf "busy %.4f\n", t / hz * 1e6 / n }' >>"$RESULT"
}
measure_redis_k1() { redis_run "$1" 1 "$REDIS_N_K1"; }
measure_redis_k0() { redis_run "$1" 0 "$REDIS_N_K0"; }

# settle_kernel waits until the sockets of the previous cells are gone (the
# count of TCP sockets in use holds still for a second, at most 15 s), then
# has the kernel drop the dentry and inode caches it can (root only; the
# benchmark's own reads of /proc/PID/fd fill them): both would otherwise
# drift into the next cell's kernel memory. Measured on 5 idle-only
# rounds, direct's cell went from -5.5..9.0 KiB to 8.4..9.2 with it.
settle_kernel() {
	local prev=-1 now i still=0
	for ((i = 0; i < 60 && still < 4; i++)); do
		now=$(awk '$1 == "TCP:" { print $3 }' /proc/net/sockstat)
		if [[ $now == "$prev" ]]; then still=$((still + 1)); else still=0; fi
		prev=$now
		sleep 0.25
	done
	sync
	echo 2 >/proc/sys/vm/drop_caches 2>/dev/null || true
	sleep 0.5
}

# measure_idle TARGET: IDLE_CONNS connections through TARGET, each with one
# byte echoed end to end, then idle; what the proxy holds for them:
# descriptors, resident memory, and kernel memory (which also counts the
# client's and backend's sockets: print_table subtracts direct's).
measure_idle() {
	local target=$1 port=${PORT[$1,idle]} k0 k1 r0 r1 f0 f1 i pid logf=$TMP/idle-client.log
	local -a pids
	mapfile -t pids < <(target_pids "$target")
	settle_kernel
	k0=$(kernel_kib) r0=$(rss_kib "${pids[@]}") f0=$(fd_count "${pids[@]}")
	start_bg idle-client "$logf" "$IDLECONNS" hold -connect "$LOCALHOST:$port" -n "$IDLE_CONNS"
	pid=$LAST_PID
	for ((i = 0; i < 1200; i++)); do
		grep -q '^ready' "$logf" && break
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if ! grep -q '^ready' "$logf"; then
		log "idle connections via $target failed: $(log_reason "$logf" 2)"
		stop_named idle-client
		return 1
	fi
	sleep 1 # deferred frees, a GC cycle
	k1=$(kernel_kib) r1=$(rss_kib "${pids[@]}") f1=$(fd_count "${pids[@]}")
	stop_named idle-client
	awk -v n="$IDLE_CONNS" -v k=$((k1 - k0)) -v r=$((r1 - r0)) -v f=$((f1 - f0)) 'BEGIN {
		printf "fds %.4f\nrss %.4f\nkernel %.4f\n", f / n, r / n, k / n }' >"$RESULT"
}

# measure_workload TARGET WORKLOAD: the hook run_rounds calls.
measure_workload() { "measure_$2" "$1"; }

# ----------------------------------------------------------------- output ---

# row_median TARGET ROW: the cell's median. idle.kib is derived: the kernel
# memory the connections took beyond what the same connections take direct
# (client and backend sockets), plus the proxy's resident memory.
row_median() {
	local t=$1 row=$2 k d r
	if [[ $row == idle.kib ]]; then
		k=$(median <<<"${SAMPLES[$t,idle.kernel]:-}") || return 1
		d=$(median <<<"${SAMPLES[direct,idle.kernel]:-}") || return 1
		r=$(median <<<"${SAMPLES[$t,idle.rss]:-0}") || r=0
		awk -v k="$k" -v d="$d" -v r="$r" 'BEGIN { print k - d + r }'
		return
	fi
	sample_median "$t" "$row"
}

print_table() {
	print_table_head "l4lb loopback benchmark" haproxy nginx iperf3 redis go
	echo "- workloads: iperf3 ${IPERF_TIME} s per test; redis-benchmark PING_MBULK -c $REDIS_CLIENTS," \
		"-n $REDIS_N_K1 (-k 1) / $REDIS_N_K0 (-k 0); tcp_tw_reuse=$(cat /proc/sys/net/ipv4/tcp_tw_reuse)"
	echo "- each cell: median of $ROUNDS interleaved round(s) (ratio to direct); clients, proxy and" \
		"backends share the same $NCPU cores; for p99 lower is better"
	echo "- idle rows: $IDLE_CONNS connections through the proxy (scripts/idleconns), one byte echoed" \
		"on each, then idle; descriptors and resident memory of the proxy's processes, plus kernel" \
		"memory (slab and TCP buffers) beyond what the same connections take direct ($(
			m=$(median <<<"${SAMPLES[direct,idle.kernel]:-}") && printf '%.1f' "$m" || echo '?'
		) KiB each, client and backend sockets); lower is better"
	echo "- CPU rows: user + system CPU time of the proxy's processes per GB received by the" \
		"iperf3 server, or per 1000 redis requests, from /proc/PID/stat; lower is better"
	echo "- all-core busy rows: what the whole machine spent (user, system, irq and softirq of" \
		"every core, from /proc/stat: client, proxy, backend and the kernel's packet delivery) per GB" \
		"or per request; lower is better. Where the cores are saturated, direct's value divided by a" \
		"proxy's predicts that proxy's throughput ratio"
	echo
	print_table_body
}

# ------------------------------------------------------------------- main ---

need=(iperf3=iperf3 redis-server=redis-server redis-benchmark=redis-tools jq=jq ss=iproute2)
if selected haproxy; then need+=(haproxy=haproxy); fi
ensure_packages "${need[@]}"
for tool in iperf3 redis-server redis-benchmark jq ss; do
	command -v "$tool" >/dev/null || die "$tool is required (install it, or run as root to have it installed)"
done

for kind in "${BACKEND_KINDS[@]}"; do
	for t in "${TARGET_LIST[@]}"; do
		if port_bound tcp "${PORT[$t,$kind]}"; then
			die "port ${PORT[$t,$kind]} is already in use: set BENCH_PORT_BASE to a free block"
		fi
	done
done

ensure_tw_reuse "redis -k 0"

mark_start
log "rounds=$ROUNDS iperf3=${IPERF_TIME}s redis -n k1=$REDIS_N_K1 k0=$REDIS_N_K0 targets: ${TARGET_LIST[*]}"
start_backends
start_targets
run_rounds

print_table
log "done in $((SECONDS - START)) s"
