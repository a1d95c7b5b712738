#!/usr/bin/env bash
# scripts/bench-reload.sh: what each proxy loses while it reloads, side by
# side in one run: l4lb reloading its config (SIGHUP), l4lb upgrading its
# binary (SIGUSR2), HAProxy reloading in master-worker mode (seamless, with
# `expose-fd listeners`) and nginx stream reloading (`nginx -s reload`), all
# on loopback, all fronting the same backends, under the same load.
#
# This is a benchmark, not a test: it prints a Markdown table (stdout) that can
# be pasted into the README; progress and diagnostics go to stderr.
#
#   scripts/bench-reload.sh                  # 20 reloads per target, 1 s apart
#   RELOADS=5 scripts/bench-reload.sh        # a short run
#
# One target after the other: the proxy starts, the load starts and warms
# up, the proxy is reloaded RELOADS times (RELOAD_EVERY seconds after each
# reload is done), the load stops, and what it counted makes the column.
# The load is scripts/reloadprobe (built here), three clients at once:
#
#   - churn: CHURN_WORKERS workers, each opening connections one after the
#     other as fast as it can (connect, send a line, read its echo, close):
#     the successes, and the failures by kind.
#   - streams: STREAMS long connections opened before the first reload,
#     each sending a checksummed line every 50 ms through all the reloads,
#     every echo checked: the streams cut, damaged, and the lines lost.
#   - udp: UDP_FLOWS client sockets, each sending a sequence-numbered
#     datagram every 20 ms to an echo backend that replies with the source
#     address:port it saw: the datagrams without a reply, and the flows
#     whose backend-side source port changed (a game server would take the
#     new port for a new client). HAProxy 2.6 proxies no UDP: n/a.
#
# Each reload really applies: every proxy alternates between two config
# files that differ in a backend's weight (TCP and UDP). The upgrade keeps
# its config: each one execs the same binary, which takes over the
# listening sockets, and the next waits until the pidfile names the new
# process. The notes under the table say how many reloads each proxy
# applied, from its own log.
#
# Graceful settings throughout, so that a proxy that can keep the long
# connections does: l4lb drain_timeout 10m, HAProxy without
# hard-stop-after, nginx without worker_shutdown_timeout; idle timeouts
# 1h (TCP) and 10 s (UDP flows and nginx UDP sessions).
#
# Environment (all optional):
#   RELOADS            reloads per target (default 20)
#   RELOAD_EVERY       seconds between a reload (done) and the next (default 1)
#   CHURN_WORKERS      churn connections under way at once (default 8)
#   STREAMS            long connections (default 20)
#   UDP_FLOWS          UDP client sockets (default 16)
#   TARGETS            columns to run, subset of "l4lb l4lb_upgrade haproxy nginx"
#   L4LB_BIN           use this binary instead of building one into the temp dir
#   RELOAD_PORT_BASE   first port of the block used (default 17800; uses base+1..base+131)
#   KEEP_TMP=1         keep the temp dir (configs, logs, client output) for debugging
#
# Every address is on 127.0.0.1. Every process the script starts is stopped on
# exit (the proxies' old workers and upgraded processes too) and its temp dir
# removed.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BENCH_NAME=bench-reload # the prefix of the log lines
# The shared machinery (processes, packages, the table) is in bench-lib.sh.
# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"

# ---------------------------------------------------------------- settings ---

set_cmd_line scripts/bench-reload.sh "$*" RELOADS RELOAD_EVERY CHURN_WORKERS STREAMS UDP_FLOWS TARGETS \
	L4LB_BIN RELOAD_PORT_BASE KEEP_TMP

RELOADS=${RELOADS:-20}
RELOAD_EVERY=${RELOAD_EVERY:-1}
CHURN_WORKERS=${CHURN_WORKERS:-8}
STREAMS=${STREAMS:-20}
UDP_FLOWS=${UDP_FLOWS:-16}
RELOAD_PORT_BASE=${RELOAD_PORT_BASE:-17800}
L4LB_BALANCE=round_robin # every proxy balances round robin (print_table_head names it)
NCPU=$(nproc)
ROUNDS=1 # one measurement per cell (print_table_body names it in failures)

require_positive_ints RELOADS CHURN_WORKERS STREAMS UDP_FLOWS RELOAD_PORT_BASE
if ! [[ $RELOAD_EVERY =~ ^[0-9]*\.?[0-9]+$ ]] || ! awk -v s="$RELOAD_EVERY" 'BEGIN { exit !(s >= 0.2) }'; then
	die "RELOAD_EVERY must be a number of seconds >= 0.2 (l4lb merges triggers within 100 ms), got '$RELOAD_EVERY'"
fi
((RELOAD_PORT_BASE + 131 < 32768)) || die "RELOAD_PORT_BASE too high: keep the ports below the ephemeral range"

ALL_TARGETS=(l4lb l4lb_upgrade haproxy nginx)
# TARGET_LABEL is declared by bench_setup (below) and kept there.
declare -A TARGET_LABEL=([l4lb]="l4lb reload" [l4lb_upgrade]="l4lb upgrade" [haproxy]="haproxy reload" [nginx]="nginx reload")
read -r -a TARGET_LIST <<<"${TARGETS:-${ALL_TARGETS[*]}}"
((${#TARGET_LIST[@]})) || die "TARGETS is empty"
for t in "${TARGET_LIST[@]}"; do
	[[ " ${ALL_TARGETS[*]} " == *" $t "* ]] || die "unknown target '$t' in TARGETS (known: ${ALL_TARGETS[*]})"
done

# Ports: the two TCP echo backends at base+1 and base+2, the two UDP echo
# backends at base+11 and base+12; each target at base+101, +111, +121 and
# +131 (TCP, and UDP on the same port).
LOCALHOST=127.0.0.1
TCP_BACKENDS=("$LOCALHOST:$((RELOAD_PORT_BASE + 1))" "$LOCALHOST:$((RELOAD_PORT_BASE + 2))")
UDP_BACKENDS=("$LOCALHOST:$((RELOAD_PORT_BASE + 11))" "$LOCALHOST:$((RELOAD_PORT_BASE + 12))")
declare -A PORT=([l4lb]=$((RELOAD_PORT_BASE + 101)) [l4lb_upgrade]=$((RELOAD_PORT_BASE + 111))
	[haproxy]=$((RELOAD_PORT_BASE + 121)) [nginx]=$((RELOAD_PORT_BASE + 131)))
declare -A HAS_UDP=([l4lb]=1 [l4lb_upgrade]=1 [haproxy]=0 [nginx]=1)
# The weight of the second backend in the two configs every reload
# alternates between (the first backend keeps 100).
WEIGHTS=(100 50)

# Rows: row_median TARGET ROW (below) makes each cell, as text.
ROWS=(churn.ok churn.failed streams.cut streams.lost udp.lost udp.moved)
declare -A ROW_LABEL=(
	[churn.ok]="TCP churn: connections that succeeded"
	[churn.failed]="TCP churn: connections that failed"
	[streams.cut]="TCP long streams: cut or damaged (of $STREAMS)"
	[streams.lost]="TCP long streams: lines lost"
	[udp.lost]="UDP flows: datagrams without a reply"
	[udp.moved]="UDP flows: backend-side source port changed (of $UDP_FLOWS flows)"
)
declare -A ROW_FMT=()
for row in "${ROWS[@]}"; do ROW_FMT[$row]=%s; done
declare -A ROW_COST=() # no ratios: there is no direct column

# ------------------------------------------------------- process handling ---

bench_setup l4lb-bench-reload
declare -A RESULTS=()  # "target,key" -> value, from the clients' count lines
declare -A SESSION=()  # target -> the session (setsid) its proxy runs in
declare -A APPLIED=()  # target -> reloads applied
declare -A TROUBLE=()  # target -> what went wrong in the proxy's log, if anything

# The proxies' processes that bench-lib does not know of: nginx's and
# HAProxy's old workers, and the processes each l4lb upgrade starts (the
# old one execs the new, which outlives it). All stay in the session
# start_bg made for the proxy, so they are found by its id.
# Zombies are left out: a child of this shell waits there to be reaped.
session_pids() { ps -s "$1" -o pid=,stat= 2>/dev/null | awk '$2 !~ /^Z/ { print $1 }' || true; }

# stop_session SID: every process left in the session: SIGTERM (twice: a
# second one ends l4lb's drain at once), then SIGKILL after 5 s.
stop_session() {
	local sid=$1 i pid
	local -a left
	mapfile -t left < <(session_pids "$sid")
	((${#left[@]})) || return 0
	for pid in "${left[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
	sleep 0.2
	for pid in "${left[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
	for ((i = 0; i < 50; i++)); do
		[[ -n $(session_pids "$sid") ]] || return 0
		sleep 0.1
	done
	mapfile -t left < <(session_pids "$sid")
	log "session $sid: ${#left[@]} process(es) ignored SIGTERM for 5 s, sending SIGKILL"
	for pid in "${left[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}

# stop_target TARGET: its proxy and everything left in its session.
stop_target() {
	local t=$1 sid=${SESSION[$1]:-}
	[[ -n $sid ]] || return 0
	stop_session "$sid"
	stop_named "$t"
	unset "SESSION[$t]"
}

reload_cleanup() {
	local rc=$? t
	set +e # no errexit in here: (exit rc) below would end the trap
	for t in "${!SESSION[@]}"; do stop_session "${SESSION[$t]}"; done
	(exit "$rc") # cleanup takes the exit status from $?
	cleanup
}
trap reload_cleanup EXIT

# ----------------------------------------------------------------- build ---

PROBE=$TMP/bin/reloadprobe

build_tools() {
	command -v go >/dev/null || die "go is required to build scripts/reloadprobe and l4lb"
	log "building scripts/reloadprobe"
	mkdir -p "$TMP/bin"
	go build -o "$PROBE" ./scripts/reloadprobe >"$TMP/reloadprobe-build.log" 2>&1 ||
		die "go build ./scripts/reloadprobe failed: $(log_reason "$TMP/reloadprobe-build.log" 3)"
	if [[ -n ${L4LB_BIN:-} ]]; then
		[[ -x $L4LB_BIN ]] || die "L4LB_BIN=$L4LB_BIN is not executable"
		L4LB=$(realpath "$L4LB_BIN")
		return 0
	fi
	# A binary of its own: each upgrade execs the binary at the path l4lb
	# started from, and bin/l4lb may be rebuilt meanwhile.
	log "building l4lb"
	L4LB=$TMP/bin/l4lb
	if ! go build -ldflags "-X main.version=$(git describe --tags --always --dirty 2>/dev/null || echo dev)" \
		-o "$L4LB" ./cmd/l4lb >"$TMP/l4lb-build.log" 2>&1; then
		STATUS[l4lb]="n/a (build failed)" STATUS[l4lb_upgrade]="n/a (build failed)"
		NOTE[l4lb]="l4lb build failed: $(log_reason "$TMP/l4lb-build.log" 2)"
		L4LB=
	fi
}

# -------------------------------------------------------------- backends ---

start_backends() {
	local IFS=,
	start_bg tcpecho "$TMP/tcpecho.log" "$PROBE" tcpecho -listen "${TCP_BACKENDS[*]}"
	wait_ports tcp "$LAST_PID" "${TCP_BACKENDS[0]##*:}" "${TCP_BACKENDS[1]##*:}" ||
		die "TCP echo backends did not start: $(log_reason "$TMP/tcpecho.log" 3)"
	start_bg udpecho "$TMP/udpecho.log" "$PROBE" udpecho -listen "${UDP_BACKENDS[*]}"
	wait_ports udp "$LAST_PID" "${UDP_BACKENDS[0]##*:}" "${UDP_BACKENDS[1]##*:}" ||
		die "UDP echo backends did not start: $(log_reason "$TMP/udpecho.log" 3)"
}

# ---------------------------------------------------------------- targets ---
# write_config_<proxy> TARGET WEIGHT FILE writes the proxy's config with
# WEIGHT for the second backend; start_<target> starts the proxy on the
# first of the two configs ($TMP/TARGET/config, a copy of config.0) and
# sets STATUS[target]; reload_<target> N does the Nth reload, to config.(N % 2).

# wait_target TARGET PID: its ports listen (TCP, and UDP where it has UDP).
wait_target() {
	local t=$1 pid=$2
	wait_ports tcp "$pid" "${PORT[$t]}" || return 1
	((!HAS_UDP[$t])) || wait_ports udp "$pid" "${PORT[$t]}"
}

# prepare_configs TARGET WRITER NAME: config.0 and config.1 (the two
# weights) in $TMP/TARGET, and the active one, NAME, a copy of config.0.
prepare_configs() {
	local t=$1 writer=$2 dir=$TMP/$1 i
	mkdir -p "$dir"
	for i in 0 1; do "$writer" "$t" "${WEIGHTS[i]}" >"$dir/config.$i"; done
	cp "$dir/config.0" "$dir/$3"
}

# use_config TARGET NAME N: the active config becomes config.(N % 2).
use_config() { cp -f "$TMP/$1/config.$(($3 % 2))" "$TMP/$1/$2"; }

write_config_l4lb() {
	local t=$1 w=$2
	cat <<-EOF
		[admin]
		listen = ""

		[services.echo]
		listen = "$LOCALHOST:${PORT[$t]}"
		protocol = "tcp"
		balance = "$L4LB_BALANCE"
		workers = 0
		connect_timeout = "3s"
		idle_timeout = "1h"
		drain_timeout = "10m"

		  [[services.echo.backends]]
		  address = "${TCP_BACKENDS[0]}"
		  weight = 100

		  [[services.echo.backends]]
		  address = "${TCP_BACKENDS[1]}"
		  weight = $w

		[services.flows]
		listen = "$LOCALHOST:${PORT[$t]}"
		protocol = "udp"
		balance = "$L4LB_BALANCE"
		workers = 0
		idle_timeout = "10s"
		drain_timeout = "10m"

		  [services.flows.health]
		  kind = "none"

		  [[services.flows.backends]]
		  address = "${UDP_BACKENDS[0]}"
		  weight = 100

		  [[services.flows.backends]]
		  address = "${UDP_BACKENDS[1]}"
		  weight = $w
	EOF
}

# start_l4lb_common TARGET: l4lb with a pidfile (the upgrade signals the
# process it names).
start_l4lb_common() {
	local t=$1 dir=$TMP/$1
	if [[ -z ${L4LB:-} ]]; then
		STATUS[$t]=${STATUS[$t]:-"n/a (no l4lb binary)"}
		return 0
	fi
	prepare_configs "$t" write_config_l4lb l4lb.toml
	start_bg "$t" "$dir/l4lb.log" "$L4LB" run -config "$dir/l4lb.toml" -pidfile "$dir/l4lb.pid"
	SESSION[$t]=$LAST_PID
	if wait_target "$t" "$LAST_PID"; then
		STATUS[$t]=ok
	else
		not_started "$t" "$dir/l4lb.log"
	fi
}
start_l4lb() { start_l4lb_common l4lb; }
start_l4lb_upgrade() { start_l4lb_common l4lb_upgrade; }

reload_l4lb() {
	use_config l4lb l4lb.toml "$1"
	kill -HUP "$(cat "$TMP/l4lb/l4lb.pid")"
}

# reload_l4lb_upgrade N: SIGUSR2 to the process the pidfile names, then wait
# (at most 40 s: l4lb gives a new process 30 s to be ready) until the
# pidfile names another.
reload_l4lb_upgrade() {
	local pidfile=$TMP/l4lb_upgrade/l4lb.pid old new i
	old=$(cat "$pidfile")
	kill -USR2 "$old"
	for ((i = 0; i < 400; i++)); do
		new=$(cat "$pidfile" 2>/dev/null) || new=
		if [[ -n $new && $new != "$old" ]]; then return 0; fi
		sleep 0.1
	done
	log "l4lb upgrade $1: the pidfile still names $old after 40 s"
}

write_config_haproxy() {
	local t=$1 w=$2
	cat <<-EOF
		global
		    nbthread $NCPU
		    maxconn 4000
		    stats socket $TMP/$t/stats.sock mode 600 level admin expose-fd listeners

		defaults
		    mode tcp
		    balance roundrobin
		    option splice-auto
		    timeout connect 3s
		    timeout client 1h
		    timeout server 1h

		listen echo
		    bind $LOCALHOST:${PORT[$t]}
		    server echo1 ${TCP_BACKENDS[0]} weight 100
		    server echo2 ${TCP_BACKENDS[1]} weight $w
	EOF
}

# HAProxy in master-worker mode (-W, the master CLI on -S); -db keeps the
# master in the foreground. A reload is SIGUSR2 to the master: it execs
# itself on the config and passes the listening sockets to the new worker
# (2.6 does so over a socket pair, the stats socket's `expose-fd listeners`
# being what makes them passable); the old worker finishes its connections.
start_haproxy() {
	command -v haproxy >/dev/null || { STATUS[haproxy]="n/a (haproxy not installed)"; return 0; }
	local dir=$TMP/haproxy
	prepare_configs haproxy write_config_haproxy haproxy.cfg
	start_bg haproxy "$dir/haproxy.log" haproxy -W -S "$dir/master.sock" -f "$dir/haproxy.cfg" -db
	SESSION[haproxy]=$LAST_PID
	HAPROXY_MASTER=$LAST_PID
	if wait_target haproxy "$LAST_PID"; then
		STATUS[haproxy]=ok
	else
		not_started haproxy "$dir/haproxy.log"
	fi
}

reload_haproxy() {
	use_config haproxy haproxy.cfg "$1"
	kill -USR2 "$HAPROXY_MASTER"
}

write_config_nginx() {
	local t=$1 w=$2 dir=$TMP/$1
	nginx_conf_prelude
	cat <<-EOF
		worker_processes $NCPU;
		worker_rlimit_nofile $(ulimit -Hn);
		pid $dir/nginx.pid;
		error_log $dir/error.log notice;

		events {
		    worker_connections 8192;
		}

		stream {
		    upstream echo {
		        server ${TCP_BACKENDS[0]} weight=100;
		        server ${TCP_BACKENDS[1]} weight=$w;
		    }
		    upstream flows {
		        server ${UDP_BACKENDS[0]} weight=100;
		        server ${UDP_BACKENDS[1]} weight=$w;
		    }
		    server {
		        listen $LOCALHOST:${PORT[$t]} reuseport;
		        proxy_pass echo;
		        proxy_connect_timeout 3s;
		        proxy_timeout 1h;
		    }
		    server {
		        listen $LOCALHOST:${PORT[$t]} udp reuseport;
		        proxy_pass flows;
		        proxy_timeout 10s;
		    }
		}
	EOF
}

# nginx as bench.sh runs it (stream module, reuseport, workers = cores), in
# the foreground; `nginx -s reload` with the same -p/-c/-e signals the
# master, which starts new workers on the config and has the old ones
# finish their connections (no worker_shutdown_timeout: as long as they
# last). The error log at notice level says each reload.
start_nginx() {
	nginx_usable || return 0
	local dir=$TMP/nginx
	prepare_configs nginx write_config_nginx nginx.conf
	start_bg nginx "$dir/nginx.log" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" -g 'daemon off;'
	SESSION[nginx]=$LAST_PID
	if wait_target nginx "$LAST_PID"; then
		STATUS[nginx]=ok
	else
		not_started nginx "$dir/error.log"
	fi
}

reload_nginx() {
	local dir=$TMP/nginx
	use_config nginx nginx.conf "$1"
	nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" -s reload >>"$dir/reload.log" 2>&1 ||
		log "nginx -s reload $1 failed: $(log_reason "$dir/reload.log")"
}

# applied_<target>: how many reloads the proxy's own log says it applied
# (APPLIED), and what went wrong in it meanwhile (TROUBLE), read after the
# load and before the stop (whose own messages are no trouble: nginx's
# fast shutdown, say, alerts on each UDP session it closes).
applied_l4lb_common() {
	local t=$1 logf=$TMP/$1/l4lb.log n
	if [[ $t == l4lb ]]; then
		APPLIED[$t]=$(grep -c ' l4lb: reloaded: ' "$logf" || true)
	else
		APPLIED[$t]=$(grep -c ' l4lb: upgrade: the new process is ready' "$logf" || true)
	fi
	n=$(grep -cE '\[ERROR\]|^panic:|^fatal error:' "$logf" || true)
	((n == 0)) || TROUBLE[$t]="$n error line(s) in its log: $(grep -E '\[ERROR\]|^panic:|^fatal error:' "$logf" | head -n 1 | cut -c1-200)"
}
applied_l4lb() { applied_l4lb_common l4lb; }
applied_l4lb_upgrade() { applied_l4lb_common l4lb_upgrade; }
applied_haproxy() {
	local logf=$TMP/haproxy/haproxy.log crashed
	APPLIED[haproxy]=$(grep -c 'Loading success' "$logf" || true)
	# The first one is the start.
	((APPLIED[haproxy] == 0)) || APPLIED[haproxy]=$((APPLIED[haproxy] - 1))
	# A worker's exit other than 0 (done) or 143 (SIGTERM, which only the
	# stop sends, after this).
	crashed=$(grep -E 'worker \([0-9]+\) exited with code' "$logf" | grep -vE 'exited with code (0|143) ' || true)
	[[ -z $crashed ]] || TROUBLE[haproxy]="$(wc -l <<<"$crashed") worker(s) exited abnormally: $(sed -n 's/.*\(exited with code [0-9]* ([^)]*)\).*/\1/p' <<<"$crashed" | sort | uniq -c | sed 's/^ *//' | paste -sd ';' -)"
}
applied_nginx() {
	local logf=$TMP/nginx/error.log n
	APPLIED[nginx]=$(grep -c ': reconfiguring$' "$logf" || true)
	n=$(grep -cE 'exited on signal|\[(alert|crit|emerg)\]' "$logf" || true)
	((n == 0)) || TROUBLE[nginx]="$n alert(s) in its error log: $(grep -E 'exited on signal|\[(alert|crit|emerg)\]' "$logf" | head -n 1 | cut -c1-200)"
}

# -------------------------------------------------------------- the load ---

declare -A CLIENT=() # client kind -> its PID, while it runs

# start_clients TARGET: the three clients against the target, each in a
# session of its own; then wait (at most 15 s) for each to say it is ready.
start_clients() {
	local t=$1 addr=$LOCALHOST:${PORT[$1]} kind i ok
	local max=$((RELOADS * 60 + 120))s # a bound, should the script never stop them
	CLIENT=()
	start_bg client "$TMP/$t/churn.out" "$PROBE" churn -target "$addr" -workers "$CHURN_WORKERS" -max "$max"
	CLIENT[churn]=$LAST_PID
	start_bg client "$TMP/$t/streams.out" "$PROBE" streams -target "$addr" -n "$STREAMS" -every 50ms -max "$max"
	CLIENT[streams]=$LAST_PID
	if ((HAS_UDP[$t])); then
		start_bg client "$TMP/$t/udp.out" "$PROBE" udp -target "$addr" -flows "$UDP_FLOWS" -every 20ms -max "$max"
		CLIENT[udp]=$LAST_PID
	fi
	for ((i = 0; i < 150; i++)); do
		ok=1
		for kind in "${!CLIENT[@]}"; do
			grep -q '^ready' "$TMP/$t/$kind.out" 2>/dev/null || ok=0
		done
		((ok)) && return 0
		sleep 0.1
	done
	for kind in "${!CLIENT[@]}"; do
		grep -q '^ready' "$TMP/$t/$kind.out" 2>/dev/null ||
			log "$t: the $kind client is not ready after 15 s: $(log_reason "$TMP/$t/$kind.out" 2)"
	done
}

# stop_clients TARGET: SIGTERM each client, wait for its count line (at most
# 20 s: the streams wait up to 5 s for their last echoes), keep the counts
# in RESULTS.
stop_clients() {
	local t=$1 kind pid i kv counts
	for kind in "${!CLIENT[@]}"; do kill -TERM "${CLIENT[$kind]}" 2>/dev/null || true; done
	for kind in "${!CLIENT[@]}"; do
		pid=${CLIENT[$kind]}
		for ((i = 0; i < 200; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			log "$t: the $kind client did not finish within 20 s"
		fi
		stop_pid "$pid"
		read -r -a counts < <(grep -m 1 "^$kind " "$TMP/$t/$kind.out" | cut -d ' ' -f 2-) || counts=()
		for kv in "${counts[@]}"; do RESULTS[$t,$kind.${kv%%=*}]=${kv#*=}; done
		grep -q "^$kind " "$TMP/$t/$kind.out" ||
			log "$t: no counts from the $kind client: $(log_reason "$TMP/$t/$kind.out" 2)"
	done
	local keep=() p
	for p in "${PIDS[@]}"; do [[ ${PID_NAME[$p]} == client ]] || keep+=("$p"); done
	PIDS=("${keep[@]}")
	CLIENT=()
}

# measure TARGET: start the proxy, the load, RELOADS reloads, stop the load
# and the proxy.
measure() {
	local t=$1 i t0
	"start_$t"
	if [[ ${STATUS[$t]:-} != ok ]]; then
		log "$t: ${NOTE[$t]:-${STATUS[$t]:-n/a}}"
		stop_target "$t"
		return 0
	fi
	log "$t: started; starting the load"
	start_clients "$t"
	sleep 1 # the load before the first reload
	t0=$SECONDS
	for ((i = 1; i <= RELOADS; i++)); do
		"reload_$t" "$i"
		sleep "$RELOAD_EVERY"
	done
	log "$t: $RELOADS reloads in $((SECONDS - t0)) s; stopping the load"
	stop_clients "$t"
	log "$t: $(for k in "${!RESULTS[@]}"; do [[ $k == "$t,"* ]] && printf '%s=%s ' "${k#*,}" "${RESULTS[$k]}"; done)"
	sleep 1 # old workers and processes finish on their own, and say so in the log
	"applied_$t"
	stop_target "$t"
}

# ----------------------------------------------------------------- output ---

# r TARGET KEY: a client count, or "?".
r() { echo "${RESULTS[$1,$2]:-?}"; }

# row_median TARGET ROW: the cell, as text (the hook print_table_body calls;
# there is one measurement per cell, no median).
row_median() {
	local t=$1 row=$2 kind s
	[[ ${STATUS[$t]:-} == ok ]] || return 1
	case $row in
	churn.ok)
		[[ -n ${RESULTS[$t,churn.ok]+x} ]] || return 1
		r "$t" churn.ok
		;;
	churn.failed)
		[[ -n ${RESULTS[$t,churn.ok]+x} ]] || return 1
		local total=0 parts=()
		for kind in refused reset timeout closed wrong other; do
			s=${RESULTS[$t,churn.$kind]:-0}
			total=$((total + s))
			((s == 0)) || parts+=("$s $kind")
		done
		if ((total)); then
			local IFS=,
			printf '**%d** (%s)' "$total" "${parts[*]}"
		else
			echo 0
		fi
		;;
	streams.cut)
		[[ -n ${RESULTS[$t,streams.n]+x} ]] || return 1
		s=$(($(r "$t" streams.cut) + $(r "$t" streams.damaged) + $(r "$t" streams.open_failed)))
		if ((s)); then
			printf '**%d** (%s cut, %s damaged, %s not opened)' "$s" "$(r "$t" streams.cut)" \
				"$(r "$t" streams.damaged)" "$(r "$t" streams.open_failed)"
		else
			echo 0
		fi
		;;
	streams.lost)
		[[ -n ${RESULTS[$t,streams.n]+x} ]] || return 1
		s=$(r "$t" streams.lines_lost)
		if [[ $s == 0 ]]; then printf '0 of %s' "$(r "$t" streams.lines_sent)"; else printf '**%s** of %s' "$s" "$(r "$t" streams.lines_sent)"; fi
		;;
	udp.lost | udp.moved)
		if ((!HAS_UDP[$t])); then
			echo "n/a (haproxy 2.6 proxies no UDP)"
			return 0
		fi
		[[ -n ${RESULTS[$t,udp.flows]+x} ]] || return 1
		if [[ $row == udp.lost ]]; then
			s=$(r "$t" udp.lost)
			if [[ $s == 0 ]]; then printf '0 of %s' "$(r "$t" udp.sent)"; else printf '**%s** of %s' "$s" "$(r "$t" udp.sent)"; fi
			if [[ $(r "$t" udp.icmp_refused) != 0 ]]; then printf ' (%s ICMP port unreachable)' "$(r "$t" udp.icmp_refused)"; fi
		else
			s=$(r "$t" udp.moved_flows)
			if [[ $s == 0 ]]; then echo 0; else printf '**%s** (%s changes)' "$s" "$(r "$t" udp.source_changes)"; fi
		fi
		;;
	*) return 1 ;;
	esac
}

print_table() {
	print_table_head "l4lb reload benchmark: what a reload loses" haproxy nginx go
	echo "- each column: the proxy reloaded $RELOADS times, $RELOAD_EVERY s after each reload is done," \
		"under the load below, one target after the other; every proxy in front of the same two TCP" \
		"line-echo and two UDP echo backends (scripts/reloadprobe), round robin; reloads alternate" \
		"between two configs that differ in the second backend's weight (100 and 50); the l4lb" \
		"upgrade execs the same binary on the same config"
	echo "- TCP churn: $CHURN_WORKERS workers, each a new connection per line (connect, send, read the" \
		"echo, close) as fast as it can, 3 s timeout per step; failures by kind: refused, reset, timeout," \
		"closed (EOF before the echo), wrong (echo), other"
	echo "- TCP long streams: $STREAMS connections opened before the first reload, a checksummed line" \
		"every 50 ms each through all the reloads, each echo checked; cut: the connection failed," \
		"damaged: an echo wrong or missing; l4lb drain_timeout 10m, HAProxy without hard-stop-after," \
		"nginx without worker_shutdown_timeout"
	echo "- UDP flows: $UDP_FLOWS client sockets, a sequence-numbered datagram every 20 ms each, 1 s" \
		"for late replies at the end; the echo backend returns the source address:port it saw; l4lb" \
		"idle_timeout 10s, nginx \`udp reuseport\` proxy_timeout 10s; HAProxy 2.6 has no UDP proxying"
	echo "- failures in **bold**"
	echo
	print_table_body
}

# notes: the reloads each proxy applied, from its own log.
set_notes() {
	local t
	for t in "${ALL_TARGETS[@]}"; do
		[[ ${STATUS[$t]:-} == ok ]] || continue
		case $t in
		l4lb) NOTE[$t]="l4lb reload: ${APPLIED[$t]:-?} of $RELOADS reloads applied (\`reloaded\` lines in its log, each a new config version)" ;;
		l4lb_upgrade) NOTE[$t]="l4lb upgrade: ${APPLIED[$t]:-?} of $RELOADS upgrades applied (\`upgrade: the new process is ready\` in its log; each waited for the pidfile to name the new process)" ;;
		haproxy) NOTE[$t]="haproxy reload: ${APPLIED[$t]:-?} of $RELOADS reloads applied (\`Loading success\` from the master after each SIGUSR2)" ;;
		nginx) NOTE[$t]="nginx reload: ${APPLIED[$t]:-?} of $RELOADS reloads applied (\`reconfiguring\` in its error log after each \`nginx -s reload\`)" ;;
		esac
		if [[ -n ${TROUBLE[$t]:-} ]]; then NOTE[$t]+="; ${TROUBLE[$t]}"; fi
	done
}

# ------------------------------------------------------------------- main ---

need=(ss=iproute2)
if selected haproxy; then need+=(haproxy=haproxy); fi
ensure_packages "${need[@]}"
command -v ss >/dev/null || die "ss is required (install iproute2, or run as root to have it installed)"

for p in "${TCP_BACKENDS[@]##*:}" "${PORT[@]}"; do
	! port_bound tcp "$p" || die "TCP port $p is already in use: set RELOAD_PORT_BASE to a free block"
done
for p in "${UDP_BACKENDS[@]##*:}" "${PORT[@]}"; do
	! port_bound udp "$p" || die "UDP port $p is already in use: set RELOAD_PORT_BASE to a free block"
done

ensure_tw_reuse "the churn"

mark_start
log "reloads=$RELOADS every ${RELOAD_EVERY}s; churn $CHURN_WORKERS workers, $STREAMS streams, $UDP_FLOWS UDP flows; targets: ${TARGET_LIST[*]}"
build_tools
start_backends
for t in "${TARGET_LIST[@]}"; do measure "$t"; done
set_notes

print_table
log "done in $((SECONDS - START)) s"
