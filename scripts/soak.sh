#!/usr/bin/env bash
# scripts/soak.sh: run l4lb under a long mixed load, with reloads and
# backends dying, and check that it gives back what it took: descriptors,
# goroutines, pipes, sockets and its active-connection gauges must return
# to their values after start-up once the load stops and the timeouts have
# passed. A leak test, not a benchmark: it exits 1 naming what did not
# come back (or what l4lb logged at error level), 0 otherwise.
#
#   scripts/soak.sh                  # 10 minutes of load
#   SOAK_MINUTES=2 scripts/soak.sh   # a shorter run
#
# The load, on loopback, all at once and each in a bounded loop:
#   - redis-benchmark bursts, -k 1 and -k 0, through a round_robin service
#     in front of redis-server instances (active checks: PING/+PONG);
#   - short iperf3 runs (-P 1, -P 2, -R) through a maglev service;
#   - scripts/soakclient through a least_conn service in front of
#     scripts/demo-backend: half-closes, resets mid-transfer (SO_LINGER 0
#     with bytes in flight both ways), resets right after connect;
#   - scripts/idleconns holding a few hundred idle connections, then
#     releasing them;
#   - scripts/udpload: steady flows through a UDP service, and queries
#     from a new port each (-fresh) through one with replies_per_datagram = 1.
# Meanwhile l4lb is reloaded with SIGHUP every RELOAD_SECONDS, cycling
# three configs that add and remove backends and a service, change
# weights and make a backend a backup and back; and every CHAOS_SECONDS a
# backend is killed (SIGKILL) and restarted CHAOS_DOWN_SECONDS later, so
# the checks (and passive_fall) take it down and bring it back.
#
# Every SAMPLE_SECONDS a line goes to samples.csv in the temp dir: l4lb's
# descriptors (pipes and sockets apart), RSS, threads, goroutines (from
# -pprof), its TCP sockets by state and UDP sockets (ss), and the gauges
# of /metrics. The summary (stdout) gives the load done, baseline, peak
# and end values, and growth over the run.
#
# Environment (all optional):
#   SOAK_MINUTES     minutes of load (default 10)
#   SAMPLE_SECONDS   seconds between samples (default 5)
#   RELOAD_SECONDS   seconds between reloads (default 4)
#   CHAOS_SECONDS    seconds between backend kills (default 20)
#   CHAOS_DOWN_SECONDS  how long a killed backend stays dead (default 6)
#   SOAK_PORT_BASE   first port of the block used (default 21000; uses base+1..base+107)
#   L4LB_BIN         use this binary instead of building bin/l4lb
#   KEEP_TMP=0       remove the temp dir (samples.csv, configs, logs) after a
#                    passing run; by default it is kept, as the samples are
#                    the result (a failing run always keeps it)
#
# Every address is 127.0.0.1. Every process the script starts is stopped on
# exit.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BENCH_NAME=soak
# Processes, logging and the l4lb build are shared with the benchmarks.
# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"

# ------------------------------------------------------------------ ports ---

SOAK_PORT_BASE=${SOAK_PORT_BASE:-21000}
B=$SOAK_PORT_BASE
# Backends: base+1.. (redis), +11.. (iperf3), +21.. (line echo), +31
# (idleconns), +41.. (UDP echo). l4lb: +99 pprof, +100 admin, +101.. services.
P_PPROF=$((B + 99)) P_ADMIN=$((B + 100))
P_REDIS=$((B + 101)) P_IPERF=$((B + 102)) P_ECHO=$((B + 103)) P_IDLE=$((B + 104))
P_UDP=$((B + 105)) P_DNS=$((B + 106)) P_EXTRA=$((B + 107))
LOCALHOST=127.0.0.1

# ------------------------------------------------------------ load loops ---
#
# Each load loop runs as this script with --loop KIND, in a session of its
# own (start_bg), until LOAD_END (epoch seconds). Its clients run in the
# background with a time limit and are waited for, so a SIGTERM reaches
# the loop at once and the trap stops its whole process group.

# bounded SECONDS CMD...: run CMD for at most SECONDS, interruptibly.
bounded() {
	local limit=$1
	shift
	timeout "$limit" "$@" &
	wait $!
}

loop_redis() {
	local out rc
	while ((EPOCHSECONDS < LOAD_END)); do
		# Kept connections: three request types, 20 clients.
		rc=0
		out=$(bounded 60 redis-benchmark -h "$LOCALHOST" -p "$P_REDIS" -c 20 -n 20000 -k 1 -t ping_mbulk,set,get -q 2>&1) || rc=$?
		echo "k1 rc=$rc requests=$((rc == 0 ? 60000 : 0)) $(tr '\r\n' '  ' <<<"$out" | tail -c 300)"
		# A connection per request.
		rc=0
		out=$(bounded 60 redis-benchmark -h "$LOCALHOST" -p "$P_REDIS" -c 10 -n 2000 -k 0 -t ping_mbulk -q 2>&1) || rc=$?
		echo "k0 rc=$rc requests=$((rc == 0 ? 2000 : 0)) $(tr '\r\n' '  ' <<<"$out" | tail -c 300)"
		sleep 1
	done
}

loop_iperf() {
	local n=0 rc out args
	while ((EPOCHSECONDS < LOAD_END)); do
		case $((n++ % 3)) in 0) args=(-P 1) ;; 1) args=(-P 2) ;; 2) args=(-R) ;; esac
		rc=0
		out=$(bounded 20 iperf3 -c "$LOCALHOST" -p "$P_IPERF" -t 2 -J "${args[@]}" 2>&1) || rc=$?
		echo "iperf ${args[*]} rc=$rc bytes=$(jq -r '.end.sum_received.bytes // 0' <<<"$out" 2>/dev/null || echo 0)"
		sleep 2
	done
}

loop_udp() {
	local out rc
	while ((EPOCHSECONDS < LOAD_END)); do
		rc=0
		out=$(bounded 30 "$SOAK_BIN/udpload" client -target "$LOCALHOST:$P_UDP" -flows 16 -window 2 -size 200 -duration 8s 2>&1) || rc=$?
		echo "flows rc=$rc $out"
		sleep 1
	done
}

loop_dns() {
	local out rc
	while ((EPOCHSECONDS < LOAD_END)); do
		rc=0
		out=$(bounded 30 "$SOAK_BIN/udpload" client -target "$LOCALHOST:$P_DNS" -flows 4 -size 64 -duration 5s -fresh 2>&1) || rc=$?
		echo "fresh rc=$rc $out"
		sleep 2
	done
}

loop_idle() {
	local n pid i hold rc started
	while ((EPOCHSECONDS < LOAD_END)); do
		n=$((100 + RANDOM % 300))
		started=$SECONDS
		# Emptied here, not by the redirection below: that happens in the
		# child, and the wait could read the last hold's "ready" first.
		: >"$SOAK_TMP/idle.out"
		"$SOAK_BIN/idleconns" hold -connect "$LOCALHOST:$P_IDLE" -n "$n" -timeout 20s >"$SOAK_TMP/idle.out" 2>&1 &
		pid=$!
		# Until ready, or until hold gives up (-timeout) and says why.
		for ((i = 0; i < 300; i++)); do
			grep -q '^ready' "$SOAK_TMP/idle.out" 2>/dev/null && break
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if grep -q '^ready' "$SOAK_TMP/idle.out"; then
			hold=$((3 + RANDOM % 8))
			echo "idle ok held=$n for ${hold}s, ready after $((SECONDS - started))s"
			sleep "$hold"
			kill -TERM "$pid" 2>/dev/null || true
			wait "$pid" 2>/dev/null || true
		else
			kill -TERM "$pid" 2>/dev/null || true
			rc=0
			wait "$pid" 2>/dev/null || rc=$?
			echo "idle failed n=$n after $((SECONDS - started))s rc=$rc: $(head -c 300 "$SOAK_TMP/idle.out" | tr '\n' ' ')"
		fi
		sleep 1
	done
}

# The extra services exist in one config of three: connections and flows
# opened to them drain when a reload removes them, and a reload brings
# them back while they drain.
loop_extra() {
	local out rc pid
	while ((EPOCHSECONDS < LOAD_END)); do
		"$SOAK_BIN/idleconns" hold -connect "$LOCALHOST:$P_EXTRA" -n 20 -timeout 5s >/dev/null 2>&1 &
		pid=$!
		rc=0
		out=$(bounded 20 "$SOAK_BIN/udpload" client -target "$LOCALHOST:$P_EXTRA" -flows 8 -window 1 -duration 6s -warmup 0s 2>&1) || rc=$?
		kill -TERM "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
		echo "extra rc=$rc $out"
	done
}

loop_churn() {
	local out rc
	while ((EPOCHSECONDS < LOAD_END)); do
		rc=0
		out=$(bounded 40 "$SOAK_BIN/soakclient" -target "$LOCALHOST:$P_ECHO" -workers 3 -duration 15s 2>&1) || rc=$?
		echo "churn rc=$rc $out"
	done
}

if [[ ${1:-} == --loop ]]; then
	trap 'trap - TERM; kill -TERM -- -$$ 2>/dev/null; exit 143' TERM
	"loop_$2"
	exit 0
fi

# ---------------------------------------------------------------- settings ---

SOAK_MINUTES=${SOAK_MINUTES:-10}
SAMPLE_SECONDS=${SAMPLE_SECONDS:-5}
RELOAD_SECONDS=${RELOAD_SECONDS:-4}
CHAOS_SECONDS=${CHAOS_SECONDS:-20}
CHAOS_DOWN_SECONDS=${CHAOS_DOWN_SECONDS:-6}
require_positive_ints SOAK_MINUTES SAMPLE_SECONDS RELOAD_SECONDS CHAOS_SECONDS CHAOS_DOWN_SECONDS SOAK_PORT_BASE
((B + 107 < 32768)) || die "SOAK_PORT_BASE too high: keep the ports below the ephemeral range"

# The timeouts of the soak's configs: short, so that the end waits seconds.
TCP_IDLE_TIMEOUT=20 # s; longer than idleconns holds its connections (3-10 s)
UDP_IDLE_TIMEOUT=3  # s
DRAIN_TIMEOUT=5     # s
HALF_CLOSE_TIMEOUT=5
# The extra services are removed for two reload periods of three: a drain
# longer than that sees them come back while they drain.
EXTRA_DRAIN_TIMEOUT=$((2 * RELOAD_SECONDS + 2))
# How long the end waits for everything to come back: a connection stuck
# without traffic is closed at idle_timeout, a draining one at
# drain_timeout; past both (and the 250 ms UDP timer tick) nothing may
# remain.
SETTLE_LIMIT=$((TCP_IDLE_TIMEOUT + (EXTRA_DRAIN_TIMEOUT > DRAIN_TIMEOUT ? EXTRA_DRAIN_TIMEOUT : DRAIN_TIMEOUT) + 5))

# What may differ from the baseline once everything is idle again, and why.
# Pipes: the pipe pool (l4/splice.go) keeps up to maxIdlePipes (128) empty
# pipes, two descriptors each, for the next bulk transfers; they are
# reused, not leaked. Baseline has none (no transfer has run yet).
PIPE_FD_SLACK=$((2 * 128))
# Goroutines: none. A goroutine left over is a leak.
GOROUTINE_SLACK=0
# Descriptors other than pipes: none.
FD_SLACK=0

KEEP_TMP=${KEEP_TMP:-1}
bench_setup l4lb-soak
SOAK_TMP=$TMP
SOAK_BIN=$TMP/bin
mkdir -p "$SOAK_BIN" "$TMP/load"
CSV=$TMP/samples.csv

# A failing run keeps its temp dir for the post-mortem.
soak_exit() {
	local rc=$?
	if ((rc != 0)); then KEEP_TMP=1; fi
	# cleanup exits with the status it is called with.
	return_status "$rc" || cleanup
	cleanup
}
return_status() { return "$1"; }
trap soak_exit EXIT

for tool in redis-server redis-benchmark iperf3 jq curl ss; do
	command -v "$tool" >/dev/null || die "$tool not found (make soak installs what it needs)"
done

build_l4lb 15 || die "${NOTE[l4lb]:-cannot build l4lb}"
for tool in udpload idleconns demo-backend soakclient; do
	go build -o "$SOAK_BIN/$tool" "./scripts/$tool" || die "cannot build scripts/$tool"
done

# --------------------------------------------------------------- backends ---

declare -A BACKEND_PID=() BACKEND_CMD=()
REDIS_PORTS=($((B + 1)) $((B + 2)) $((B + 3)))
IPERF_PORTS=($((B + 11)) $((B + 12)))
ECHO_PORTS=($((B + 21)) $((B + 22)) $((B + 23)))
IDLE_PORT=$((B + 31))
UDP_PORTS=($((B + 41)) $((B + 42)) $((B + 43)))

for p in "${REDIS_PORTS[@]}"; do
	BACKEND_CMD[redis-$p]="tcp $p redis-server --port $p --bind $LOCALHOST --save '' --appendonly no --maxclients 2000 --dir $TMP"
done
for p in "${IPERF_PORTS[@]}"; do BACKEND_CMD[iperf-$p]="tcp $p iperf3 -s -B $LOCALHOST -p $p"; done
for p in "${ECHO_PORTS[@]}"; do BACKEND_CMD[echo-$p]="tcp $p $SOAK_BIN/demo-backend -listen $LOCALHOST:$p"; done
BACKEND_CMD[idle-$IDLE_PORT]="tcp $IDLE_PORT $SOAK_BIN/idleconns serve -listen $LOCALHOST:$IDLE_PORT"
for p in "${UDP_PORTS[@]}"; do
	BACKEND_CMD[udp-$p]="udp $p $SOAK_BIN/udpload echo -listen $LOCALHOST:$p -lifetime $((SOAK_MINUTES + 10))m"
done

start_backend() {
	local name=$1 proto port cmd
	read -r proto port cmd <<<"${BACKEND_CMD[$name]}"
	eval "start_bg $name $TMP/$name.log $cmd"
	BACKEND_PID[$name]=$LAST_PID
	wait_ports "$proto" "$LAST_PID" "$port" || die "backend $name did not start: $(log_reason "$TMP/$name.log" 2)"
}

# kill_backend NAME: SIGKILL, as a crash: no goodbye to its clients.
kill_backend() {
	local name=$1 pid=${BACKEND_PID[$1]} keep=() p
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
	PIDS=("${keep[@]}")
	BACKEND_PID[$name]=
}

for name in "${!BACKEND_CMD[@]}"; do start_backend "$name"; done

# ----------------------------------------------------------------- configs ---
#
# Three configs, cycled by the reloads: a is the start and the end.
#   b: redis +3rd backend, a weight halved; echo's 2nd backend a backup and
#      its 3rd a primary; udp +3rd backend; dns -2nd (drains); +service extra
#   c: redis -2nd (drains); echo's 1st at weight 0 (drains); udp -1st;
#      dns all three; extra removed (its connections drain)

tcp_service() { # NAME PORT BALANCE [DRAIN_SECONDS]
	cat <<-EOF

		[services.$1]
		listen = "$LOCALHOST:$2"
		protocol = "tcp"
		balance = "$3"
		connect_timeout = "1s"
		idle_timeout = "${TCP_IDLE_TIMEOUT}s"
		drain_timeout = "${4:-$DRAIN_TIMEOUT}s"
		half_close_timeout = "${HALF_CLOSE_TIMEOUT}s"
		passive_fall = 3
	EOF
}

tcp_health() { # SERVICE INTERVAL [SEND EXPECT]
	printf '\n  [services.%s.health]\n  interval = "%s"\n  timeout = "300ms"\n  rise = 2\n  fall = 2\n' "$1" "$2"
	if [[ -n ${3:-} ]]; then
		printf '  kind = "send_expect"\n  send = "%s"\n  expect = "%s"\n' "$3" "$4"
	else
		printf '  kind = "tcp"\n'
	fi
}

udp_service() { # NAME PORT BALANCE [REPLIES [DRAIN_SECONDS]]
	cat <<-EOF

		[services.$1]
		listen = "$LOCALHOST:$2"
		protocol = "udp"
		balance = "$3"
		$([[ $3 == maglev ]] && echo 'hash_key = "source_ip_port"')
		idle_timeout = "${UDP_IDLE_TIMEOUT}s"
		drain_timeout = "${5:-$DRAIN_TIMEOUT}s"
		max_flows = 4096
		$([[ -n ${4:-} ]] && echo "replies_per_datagram = $4")

		  [services.$1.health]
		  kind = "send_expect"
		  interval = "500ms"
		  timeout = "300ms"
		  rise = 2
		  fall = 2
		  send = "ping"
		  expect = "ping"
	EOF
}

backend() { # SERVICE PORT [WEIGHT [BACKUP]]
	printf '\n  [[services.%s.backends]]\n  address = "%s:%s"\n  weight = %s\n' "$1" "$LOCALHOST" "$2" "${3:-100}"
	if [[ ${4:-} == backup ]]; then printf '  backup = true\n'; fi
}

write_config() { # a|b|c
	local v=$1
	printf '[admin]\nlisten = "%s:%s"\n' "$LOCALHOST" "$P_ADMIN"

	tcp_service redis "$P_REDIS" round_robin
	tcp_health redis 500ms 'PING\r\n' '+PONG'
	case $v in
	a) backend redis $((B + 1)); backend redis $((B + 2)) ;;
	b) backend redis $((B + 1)) 50; backend redis $((B + 2)); backend redis $((B + 3)) ;;
	c) backend redis $((B + 1)); backend redis $((B + 3)) 200 ;;
	esac

	# maglev on the source IP: iperf3's control and data connections
	# must reach the same server.
	tcp_service iperf "$P_IPERF" maglev
	tcp_health iperf 1s
	backend iperf $((B + 11)); backend iperf $((B + 12))

	# Closing on down and on failback: the paths that close connections
	# in bulk are taken too.
	tcp_service echo "$P_ECHO" least_conn
	printf 'on_down = "close"\non_failback = "close"\n'
	tcp_health echo 500ms
	case $v in
	a) backend echo $((B + 21)); backend echo $((B + 22)); backend echo $((B + 23)) 100 backup ;;
	b) backend echo $((B + 21)); backend echo $((B + 22)) 100 backup; backend echo $((B + 23)) ;;
	c) backend echo $((B + 21)) 0; backend echo $((B + 22)); backend echo $((B + 23)) 100 backup ;;
	esac

	tcp_service idle "$P_IDLE" maglev
	printf 'hash_key = "source_ip_port"\n'
	tcp_health idle 1s
	backend idle "$IDLE_PORT"

	udp_service udp "$P_UDP" maglev
	case $v in
	a) backend udp $((B + 41)); backend udp $((B + 42)) ;;
	b) backend udp $((B + 41)); backend udp $((B + 42)); backend udp $((B + 43)) ;;
	c) backend udp $((B + 42)); backend udp $((B + 43)) ;;
	esac

	udp_service dns "$P_DNS" round_robin 1
	case $v in
	a) backend dns $((B + 41)); backend dns $((B + 42)) ;;
	b) backend dns $((B + 41)) ;;
	c) backend dns $((B + 41)); backend dns $((B + 42)); backend dns $((B + 43)) ;;
	esac

	if [[ $v == b ]]; then
		tcp_service extra "$P_EXTRA" maglev "$EXTRA_DRAIN_TIMEOUT"
		tcp_health extra 500ms
		backend extra $((B + 23))
		udp_service extra_udp "$P_EXTRA" maglev "" "$EXTRA_DRAIN_TIMEOUT"
		backend extra_udp $((B + 43))
	fi
}

CFG=$TMP/l4lb.toml
for v in a b c; do
	write_config "$v" >"$TMP/l4lb-$v.toml"
	"$L4LB" check "$TMP/l4lb-$v.toml" >/dev/null || die "config $v is invalid: $("$L4LB" check "$TMP/l4lb-$v.toml" 2>&1 | head -n 3)"
done

# use_config a|b|c: make it l4lb's file (renamed over: never half written).
use_config() {
	cp "$TMP/l4lb-$1.toml" "$CFG.new"
	mv "$CFG.new" "$CFG"
}

# ------------------------------------------------------------------- l4lb ---

use_config a
start_bg l4lb "$TMP/l4lb.log" "$L4LB" run -config "$CFG" -pprof "$LOCALHOST:$P_PPROF"
L4LB_PID=$LAST_PID
for ((i = 0; i < 100; i++)); do
	grep -q 'l4lb: ready' "$TMP/l4lb.log" && break
	kill -0 "$L4LB_PID" 2>/dev/null || die "l4lb exited: $(log_reason "$TMP/l4lb.log" 3)"
	sleep 0.1
done
grep -q 'l4lb: ready' "$TMP/l4lb.log" || die "l4lb not ready after 10 s: $(log_reason "$TMP/l4lb.log" 3)"

# ---------------------------------------------------------------- samples ---

CSV_HEADER=t_s,phase,fds,pipe_fds,socket_fds,other_fds,rss_kib,threads,goroutines,tcp_listen,tcp_estab,tcp_syn_sent,tcp_close_wait,tcp_fin_wait,tcp_closing,udp_unconn,udp_connected,open_connections,backend_active,udp_flows,draining
# The columns the end compares with the baseline, and how.
echo "$CSV_HEADER" >"$CSV"

# metric_sum NAME: the sum of a /metrics gauge over its labels ("" when
# the endpoint does not answer).
METRICS=
metric_sum() { awk -v m="l4lb_$1" '$1 == m || index($1, m "{") == 1 { s += $2; n++ } END { if (n) printf "%d", s; else print 0 }' <<<"$METRICS"; }

# sample PHASE: one CSV line of l4lb's state, also kept in SAMPLE[column].
declare -A SAMPLE=()
sample() {
	local phase=$1 links tcp udp g status
	# find fails when a descriptor closes while it lists them: keep what
	# it read.
	links=$(find "/proc/$L4LB_PID/fd" -mindepth 1 -printf '%l\n' 2>/dev/null || true)
	SAMPLE[fds]=$(grep -c . <<<"$links" || true)
	SAMPLE[pipe_fds]=$(grep -c '^pipe:' <<<"$links" || true)
	SAMPLE[socket_fds]=$(grep -c '^socket:' <<<"$links" || true)
	SAMPLE[other_fds]=$((SAMPLE[fds] - SAMPLE[pipe_fds] - SAMPLE[socket_fds]))
	status=$(cat "/proc/$L4LB_PID/status" 2>/dev/null) || status=
	SAMPLE[rss_kib]=$(awk '/^VmRSS:/ { print $2 }' <<<"$status")
	SAMPLE[threads]=$(awk '/^Threads:/ { print $2 }' <<<"$status")
	g=$(curl -s -m 5 "http://$LOCALHOST:$P_PPROF/debug/pprof/goroutine?debug=1") || g=
	SAMPLE[goroutines]=$(sed -n '1s/^goroutine profile: total \([0-9]*\).*/\1/p' <<<"$g")
	# Only l4lb's own sockets (TIME-WAIT has no owner: l4lb holds nothing
	# for it).
	tcp=$(ss -tanpH 2>/dev/null | grep "pid=$L4LB_PID," || true)
	udp=$(ss -uanpH 2>/dev/null | grep "pid=$L4LB_PID," || true)
	SAMPLE[tcp_listen]=$(grep -c '^LISTEN' <<<"$tcp" || true)
	SAMPLE[tcp_estab]=$(grep -c '^ESTAB' <<<"$tcp" || true)
	SAMPLE[tcp_syn_sent]=$(grep -c '^SYN-SENT' <<<"$tcp" || true)
	SAMPLE[tcp_close_wait]=$(grep -c '^CLOSE-WAIT' <<<"$tcp" || true)
	SAMPLE[tcp_fin_wait]=$(grep -c '^FIN-WAIT' <<<"$tcp" || true)
	SAMPLE[tcp_closing]=$(grep -cE '^(LAST-ACK|CLOSING)' <<<"$tcp" || true)
	SAMPLE[udp_unconn]=$(grep -c '^UNCONN' <<<"$udp" || true)
	SAMPLE[udp_connected]=$(grep -c '^ESTAB' <<<"$udp" || true)
	METRICS=$(curl -s -m 2 "http://$LOCALHOST:$P_ADMIN/metrics") || METRICS=
	SAMPLE[open_connections]=$(metric_sum open_connections)
	SAMPLE[backend_active]=$(metric_sum backend_connections_active)
	SAMPLE[udp_flows]=$(metric_sum udp_flows_active)
	SAMPLE[draining]=$(metric_sum draining_connections)
	local line="$((SECONDS - T0)),$phase" c
	for c in $(tr ',' ' ' <<<"${CSV_HEADER#t_s,phase,}"); do line+=",${SAMPLE[$c]:-}"; done
	echo "$line" >>"$CSV"
}

T0=$SECONDS
# The baseline: l4lb started, its first checks done, nothing proxied yet.
# Probes of a few backends may be in flight at any instant: the lowest of
# three samples is the idle state.
declare -A BASE=()
sleep 2
for ((i = 0; i < 3; i++)); do
	sample baseline
	for c in $(tr ',' ' ' <<<"${CSV_HEADER#t_s,phase,}"); do
		if [[ -z ${BASE[$c]:-} ]] || ((SAMPLE[$c] < BASE[$c])); then BASE[$c]=${SAMPLE[$c]}; fi
	done
	sleep 1
done
log "baseline: fds=${BASE[fds]} (pipes ${BASE[pipe_fds]}, sockets ${BASE[socket_fds]}) goroutines=${BASE[goroutines]} rss=${BASE[rss_kib]} KiB threads=${BASE[threads]} tcp listen=${BASE[tcp_listen]} udp=${BASE[udp_unconn]}"
[[ -n ${BASE[goroutines]} ]] || die "no goroutine count from -pprof on $LOCALHOST:$P_PPROF"

# ------------------------------------------------------------------- load ---

LOAD_SECONDS=$((SOAK_MINUTES * 60))
LOAD_END=$((EPOCHSECONDS + LOAD_SECONDS))
export LOAD_END LOCALHOST P_REDIS P_IPERF P_ECHO P_IDLE P_UDP P_DNS P_EXTRA SOAK_BIN SOAK_TMP
LOOPS=(redis iperf udp dns idle churn extra)
declare -A LOOP_PID=()
for l in "${LOOPS[@]}"; do
	start_bg "loop-$l" "$TMP/load/$l.log" "$ROOT/scripts/soak.sh" --loop "$l"
	LOOP_PID[$l]=$LAST_PID
done
log "load running for $SOAK_MINUTES min: ${LOOPS[*]}; reload every ${RELOAD_SECONDS}s, a backend killed every ${CHAOS_SECONDS}s"

CONFIGS=(a b c)
CHAOS_VICTIMS=(redis-$((B + 2)) echo-$((B + 22)) udp-$((B + 42)) redis-$((B + 1)))
reloads=0 kills=0 dead= dead_until=0 next_sample=0 next_reload=$((EPOCHSECONDS + RELOAD_SECONDS))
next_chaos=$((EPOCHSECONDS + CHAOS_SECONDS))
while ((EPOCHSECONDS < LOAD_END)); do
	kill -0 "$L4LB_PID" 2>/dev/null || die "l4lb exited during the load: $(log_reason "$TMP/l4lb.log" 3)"
	if ((EPOCHSECONDS >= next_reload)); then
		reloads=$((reloads + 1))
		use_config "${CONFIGS[reloads % 3]}"
		# SIGHUP, and every other time POST /reload, which answers once
		# the reload is applied.
		if ((reloads % 2)); then
			kill -HUP "$L4LB_PID"
		else
			"$L4LB" reload -admin "$LOCALHOST:$P_ADMIN" >>"$TMP/reload.log" 2>&1 || log "l4lb reload failed: $(tail -n 1 "$TMP/reload.log")"
		fi
		next_reload=$((EPOCHSECONDS + RELOAD_SECONDS))
	fi
	if [[ -z $dead ]] && ((EPOCHSECONDS >= next_chaos)); then
		dead=${CHAOS_VICTIMS[kills % ${#CHAOS_VICTIMS[@]}]}
		kills=$((kills + 1))
		kill_backend "$dead"
		dead_until=$((EPOCHSECONDS + CHAOS_DOWN_SECONDS))
	fi
	if [[ -n $dead ]] && ((EPOCHSECONDS >= dead_until)); then
		start_backend "$dead"
		dead=
		next_chaos=$((EPOCHSECONDS + CHAOS_SECONDS))
	fi
	if ((EPOCHSECONDS >= next_sample)); then
		sample load
		next_sample=$((EPOCHSECONDS + SAMPLE_SECONDS))
	fi
	sleep 0.5
done

# ------------------------------------------------------------------- end ---

log "load time over: waiting for the loops to finish their last runs"
for l in "${LOOPS[@]}"; do
	pid=${LOOP_PID[$l]}
	for ((i = 0; i < 600; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
	stop_named "loop-$l"
done
if [[ -n $dead ]]; then start_backend "$dead"; fi
use_config a
kill -HUP "$L4LB_PID"
log "back on config a, every backend up; waiting up to ${SETTLE_LIMIT}s for l4lb to come back to its baseline"

# settled: every check holds; PROBLEMS says which do not.
settled() {
	PROBLEMS=()
	local c
	((SAMPLE[goroutines] <= BASE[goroutines] + GOROUTINE_SLACK)) ||
		PROBLEMS+=("goroutines ${SAMPLE[goroutines]} > baseline ${BASE[goroutines]}")
	((SAMPLE[pipe_fds] <= BASE[pipe_fds] + PIPE_FD_SLACK)) ||
		PROBLEMS+=("pipe fds ${SAMPLE[pipe_fds]} > baseline ${BASE[pipe_fds]} + the pool's $PIPE_FD_SLACK")
	((SAMPLE[fds] - SAMPLE[pipe_fds] <= BASE[fds] - BASE[pipe_fds] + FD_SLACK)) ||
		PROBLEMS+=("fds other than pipes $((SAMPLE[fds] - SAMPLE[pipe_fds])) > baseline $((BASE[fds] - BASE[pipe_fds]))")
	for c in tcp_listen udp_unconn; do
		((SAMPLE[$c] == BASE[$c])) || PROBLEMS+=("$c ${SAMPLE[$c]} != baseline ${BASE[$c]}")
	done
	for c in tcp_estab tcp_syn_sent tcp_close_wait tcp_fin_wait tcp_closing udp_connected; do
		((SAMPLE[$c] <= BASE[$c])) || PROBLEMS+=("$c ${SAMPLE[$c]} > baseline ${BASE[$c]}")
	done
	for c in open_connections backend_active udp_flows draining; do
		((SAMPLE[$c] == 0)) || PROBLEMS+=("gauge $c ${SAMPLE[$c]} != 0")
	done
	((${#PROBLEMS[@]} == 0))
}

settle_start=$SECONDS
while :; do
	sample settle
	if settled; then break; fi
	if ((SECONDS - settle_start >= SETTLE_LIMIT)); then break; fi
	sleep 1
done
SETTLE_TOOK=$((SECONDS - settle_start))
# One more sample a few seconds on: settled must also stay settled.
if ((${#PROBLEMS[@]} == 0)); then
	sleep 3
	sample final
	settled || true
else
	sample final
fi

# Whatever l4lb logged at error level, and any panic, fails the run.
ERRORS=$(grep -E '\[ERROR\]|^panic:|^fatal error:|DATA RACE' "$TMP/l4lb.log" || true)
if [[ -n $ERRORS ]]; then PROBLEMS+=("l4lb logged $(grep -c . <<<"$ERRORS") error lines; first: $(head -n 1 <<<"$ERRORS" | cut -c1-200)"); fi
METRICS=$(curl -s -m 2 "http://$LOCALHOST:$P_ADMIN/metrics") || METRICS=
RELOADS_OK=$(awk '$1 == "l4lb_reloads_total{result=\"ok\"}" { print $2 }' <<<"$METRICS")
RELOADS_FAILED=$(awk '$1 == "l4lb_reloads_total{result=\"failed\"}" { print $2 }' <<<"$METRICS")
((${RELOADS_FAILED:-0} == 0)) || PROBLEMS+=("$RELOADS_FAILED reloads failed")
kill -0 "$L4LB_PID" 2>/dev/null || PROBLEMS+=("l4lb exited")

# ---------------------------------------------------------------- summary ---

col_stat() { # COLUMN PHASE: min max of the column over the PHASE's samples
	awk -F, -v col="$1" -v ph="$2" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == col) c = i; next }
		$2 == ph { if (min == "" || $c < min) min = $c; if ($c > max) max = $c }
		END { printf "%s-%s", min, max }' "$CSV"
}
# growth COLUMN: the mean over the first and the last third of the load.
growth() {
	awk -F, -v col="$1" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == col) c = i; next }
		$2 == "load" { v[++n] = $c }
		END { k = int(n / 3); if (k < 1) { print "n/a"; exit }
			for (i = 1; i <= k; i++) { a += v[i]; b += v[n - k + i] }
			printf "%.0f -> %.0f", a / k, b / k }' "$CSV"
}
sum_field() { # FILE KEY: the sum of KEY=N over the file's lines
	grep -o "$2=[0-9]*" "$1" 2>/dev/null | awk -F= '{ s += $2 } END { printf "%.0f", s }'
}
runs() { # FILE PREFIX: "ok/all" runs
	awk -v p="$2" '$1 == p { n++; if ($2 == "rc=0") ok++ } END { printf "%d/%d", ok, n }' "$1"
}

{
	echo "### l4lb soak"
	echo
	echo "- $(date -u '+%Y-%m-%d %H:%M UTC'), l4lb $(git rev-parse --short HEAD)$([[ -n $(git status --porcelain | head -n 1) ]] && echo ' (dirty)'), $SOAK_MINUTES min of load, $(nproc) cores, kernel $(uname -r)"
	echo "- redis: -k 1 runs $(runs "$TMP/load/redis.log" k1), -k 0 runs $(runs "$TMP/load/redis.log" k0), $(sum_field "$TMP/load/redis.log" requests) requests in successful runs"
	echo "- iperf3: $(grep -c 'rc=0' "$TMP/load/iperf.log" || true)/$(grep -c . "$TMP/load/iperf.log" || true) runs ok, $(($(sum_field "$TMP/load/iperf.log" bytes) / 1000000)) MB received"
	echo "- udp flows: $(grep -c 'rc=0' "$TMP/load/udp.log" || true) runs, $(sum_field "$TMP/load/udp.log" received) of $(sum_field "$TMP/load/udp.log" sent) datagrams answered"
	echo "- udp fresh port per query: $(grep -c 'rc=0' "$TMP/load/dns.log" || true) runs, $(sum_field "$TMP/load/dns.log" received) of $(sum_field "$TMP/load/dns.log" sent) queries answered"
	echo "- idle: $(grep -c 'idle ok' "$TMP/load/idle.log" || true)/$(grep -c . "$TMP/load/idle.log" || true) holds, $(sum_field "$TMP/load/idle.log" held) connections held"
	echo "- extra services (removed and re-added by the reloads): $(sum_field "$TMP/load/extra.log" received) of $(sum_field "$TMP/load/extra.log" sent) datagrams answered"
	echo "- churn: $(sum_field "$TMP/load/churn.log" halfclose_ok) half-closes ok, $(sum_field "$TMP/load/churn.log" halfclose_failed) cut short, $(sum_field "$TMP/load/churn.log" reset_mid) resets mid-transfer, $(sum_field "$TMP/load/churn.log" reset_early) resets after connect, $(sum_field "$TMP/load/churn.log" dial_failed) dials failed"
	echo "- reloads: $reloads sent, l4lb counted ${RELOADS_OK:-?} ok, ${RELOADS_FAILED:-?} failed; backends killed and restarted: $kills"
	echo "- health transitions: $(grep -c 'backend health changed' "$TMP/l4lb.log" || true); l4lb log lines at WARN: $(grep -c '\[WARN\]' "$TMP/l4lb.log" || true), ERROR: $(grep -c '\[ERROR\]' "$TMP/l4lb.log" || true)"
	echo "- back to the baseline after ${SETTLE_TOOK}s (limit ${SETTLE_LIMIT}s)"
	echo
	echo "| value | baseline | during load (min-max) | first third -> last third of load | end |"
	echo "|---|---:|---:|---:|---:|"
	for c in fds pipe_fds socket_fds other_fds goroutines rss_kib threads tcp_estab tcp_close_wait udp_connected open_connections backend_active udp_flows draining; do
		echo "| $c | ${BASE[$c]} | $(col_stat "$c" load) | $(growth "$c") | ${SAMPLE[$c]} |"
	done
	echo
	echo "samples: $CSV"
}
if ((${#PROBLEMS[@]})); then
	echo
	echo "FAILED: not back to the baseline:"
	printf -- '- %s\n' "${PROBLEMS[@]}"
	exit 1
fi
echo
echo "OK: descriptors, goroutines, pipes, sockets and gauges back to the baseline"
