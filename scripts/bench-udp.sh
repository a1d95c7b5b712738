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

log() { printf '[bench-udp %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- settings ---

CMD_ENV=()
for v in QUICK ROUNDS UDP_TIME UDP_FLOWS UDP_WINDOW UDP_SIZES TARGETS \
	L4LB_BIN L4LB_BALANCE NGINX_UDP_RESPONSES BENCH_UDP_PORT_BASE KEEP_TMP; do
	if [[ -n ${!v+x} ]]; then
		if [[ ${!v} =~ ^[A-Za-z0-9_./:,=+-]*$ ]]; then CMD_ENV+=("$v=${!v}"); else CMD_ENV+=("$v='${!v}'"); fi
	fi
done
CMD_LINE="${CMD_ENV[*]:+${CMD_ENV[*]} }scripts/bench-udp.sh${*:+ $*}"

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

for v in ROUNDS UDP_TIME UDP_FLOWS UDP_WINDOW BENCH_UDP_PORT_BASE; do
	[[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done
[[ -z ${NGINX_UDP_RESPONSES:-} || $NGINX_UDP_RESPONSES =~ ^[0-9]+$ ]] ||
	die "NGINX_UDP_RESPONSES must be a number, got '$NGINX_UDP_RESPONSES'"
((${#SIZES[@]})) || die "UDP_SIZES is empty"
for s in "${SIZES[@]}"; do
	[[ $s =~ ^[1-9][0-9]*$ ]] && ((s >= 16 && s <= 65507)) || die "UDP_SIZES: $s is not a size in 16-65507"
done
((BENCH_UDP_PORT_BASE + 201 < 32768)) || die "BENCH_UDP_PORT_BASE too high: keep the ports below the ephemeral range"

ALL_TARGETS=(direct l4lb nginx)
read -r -a TARGET_LIST <<<"${TARGETS:-${ALL_TARGETS[*]}}"
for t in "${TARGET_LIST[@]}"; do
	[[ " ${ALL_TARGETS[*]} " == *" $t "* ]] || die "unknown target '$t' in TARGETS (known: ${ALL_TARGETS[*]})"
done
[[ " ${TARGET_LIST[*]} " == *" direct "* ]] || die "TARGETS must include direct (the ratios are to direct)"

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

# Workloads, in run order (one per size), and the rows they produce:
# measure_udp SIZE writes "metric value" lines.
WORKLOADS=()
ROWS=()
declare -A ROW_LABEL=() ROW_FMT=()
for s in "${SIZES[@]}"; do
	WORKLOADS+=("udp$s")
	ROWS+=("udp$s.dps" "udp$s.p99")
	ROW_LABEL[udp$s.dps]="UDP $s B (datagrams/s)"
	ROW_LABEL[udp$s.p99]="UDP $s B p99 RTT (ms)"
	ROW_FMT[udp$s.dps]="%.0f"
	ROW_FMT[udp$s.p99]="%.3f"
done

# ------------------------------------------------------- process handling ---

TMP=$(mktemp -d "${TMPDIR:-/tmp}/l4lb-bench-udp.XXXXXX")
PIDS=()
declare -A PID_NAME=()
POLICY_RC_CREATED=0

stop_pid() {
	local pid=$1 i
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 50; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		log "${PID_NAME[$pid]:-pid $pid} ignored SIGTERM for 5 s, sending SIGKILL"
		kill -KILL "$pid" 2>/dev/null || true
	fi
	wait "$pid" 2>/dev/null || true
}

cleanup() {
	local rc=$? pid i
	trap - EXIT INT TERM
	if [[ -n ${CLIENT_PID:-} ]]; then stop_pid "$CLIENT_PID"; fi
	for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
		pid=${PIDS[i]}
		stop_pid "$pid"
	done
	if ((POLICY_RC_CREATED)); then rm -f /usr/sbin/policy-rc.d; fi
	if [[ ${KEEP_TMP:-0} == 1 ]]; then log "logs and configs kept in $TMP"; else rm -rf "$TMP"; fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_bg NAME LOGFILE CMD...: run CMD in the background and remember its PID
# in $LAST_PID.
start_bg() {
	local name=$1 logf=$2
	shift 2
	"$@" </dev/null >"$logf" 2>&1 &
	LAST_PID=$!
	PIDS+=("$LAST_PID")
	PID_NAME[$LAST_PID]=$name
}

stop_named() {
	local name=$1 pid keep=()
	for pid in "${PIDS[@]}"; do
		if [[ ${PID_NAME[$pid]} == "$name" ]]; then stop_pid "$pid"; else keep+=("$pid"); fi
	done
	PIDS=("${keep[@]}")
}

bound_udp() { [[ -n $(ss -Hlun "sport = :$1" 2>/dev/null) ]]; }

# wait_bound PID PORT...: poll until every UDP PORT is bound, for at most 5 s.
wait_bound() {
	local pid=$1 i p ok
	shift
	for ((i = 0; i < 100; i++)); do
		kill -0 "$pid" 2>/dev/null || return 1
		ok=1
		for p in "$@"; do bound_udp "$p" || { ok=0; break; }; done
		((ok)) && return 0
		sleep 0.05
	done
	return 1
}

# --------------------------------------------------------------- tooling ---

# The stream module: built in, or Debian's libnginx-mod-stream (loaded with
# load_module, as scripts/bench.sh does).
have_stream_module() {
	nginx -V 2>&1 | grep -qE -- '--with-stream( |$)' && return 0
	[[ -f /usr/lib/nginx/modules/ngx_stream_module.so ]]
}

ensure_packages() {
	local missing=()
	command -v ss >/dev/null || missing+=(iproute2)
	if [[ " ${TARGET_LIST[*]} " == *" nginx "* ]]; then
		command -v nginx >/dev/null || missing+=(nginx)
		{ command -v nginx >/dev/null && have_stream_module; } || missing+=(libnginx-mod-stream)
	fi
	((${#missing[@]})) || return 0
	if ((EUID != 0)); then
		log "missing packages (${missing[*]}) and not root: not installing them"
		return 0
	fi
	log "installing missing packages: ${missing[*]}"
	# Keep apt from starting the system nginx: it is not ours to leave behind.
	if [[ ! -e /usr/sbin/policy-rc.d ]]; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod +x /usr/sbin/policy-rc.d
		POLICY_RC_CREATED=1
	fi
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get install -y "${missing[@]}" >"$TMP/apt.log" 2>&1; then
		apt-get update >>"$TMP/apt.log" 2>&1 || true
		apt-get install -y "${missing[@]}" >>"$TMP/apt.log" 2>&1 ||
			{ log "apt-get install failed:"; tail -n 5 "$TMP/apt.log" >&2; }
	fi
	if ((POLICY_RC_CREATED)); then rm -f /usr/sbin/policy-rc.d; POLICY_RC_CREATED=0; fi
}

# ----------------------------------------------------------------- state ---

declare -A STATUS=()  # target -> "ok" or "n/a (reason)"
declare -A SAMPLES=() # "target,metric" -> space separated values
declare -A FAILED=()  # "target,workload" -> failed run count
declare -A NOTE=()    # target -> details printed under the table

not_started() {
	STATUS[$1]="n/a (did not start)"
	NOTE[$1]="$1 did not start: $(log_reason "$2" 3)"
	stop_named "$1"
}

log_reason() {
	local lines
	lines=$(grep -iE 'alert|emerg|error|fatal|panic|fail' "$1" 2>/dev/null) ||
		lines=$(grep -v '^[[:space:]]*$' "$1" 2>/dev/null) || lines="no log output"
	tail -n "${2:-1}" <<<"$lines" | tr -s '\n\t ' ' ' | tr '|' '/' | cut -c1-240 | sed 's/ *$//'
}

# ----------------------------------------------------------------- build ---

UDPLOAD=$TMP/udpload

build_udpload() {
	command -v go >/dev/null || die "go is required to build scripts/udpload"
	log "building scripts/udpload"
	go build -o "$UDPLOAD" ./scripts/udpload >"$TMP/udpload-build.log" 2>&1 ||
		die "go build ./scripts/udpload failed: $(log_reason "$TMP/udpload-build.log" 3)"
}

l4lb_sources_newer() {
	[[ -n $(find . \( -path ./.git -o -path ./bin \) -prune -o \
		\( -name '*.go' ! -name '*_test.go' -o -name go.mod -o -name go.sum \) -newer bin/l4lb -print -quit) ]]
}

build_l4lb() {
	if [[ -n ${L4LB_BIN:-} ]]; then
		[[ -x $L4LB_BIN ]] || { STATUS[l4lb]="n/a (L4LB_BIN=$L4LB_BIN not executable)"; return 1; }
		L4LB=$L4LB_BIN
		return 0
	fi
	L4LB=$ROOT/bin/l4lb
	if [[ -x bin/l4lb ]] && ! l4lb_sources_newer; then return 0; fi
	command -v go >/dev/null || { STATUS[l4lb]="n/a (go not found, cannot build)"; return 1; }
	log "building bin/l4lb"
	mkdir -p bin
	if ! go build -o bin/l4lb ./cmd/l4lb >"$TMP/l4lb-build.log" 2>&1; then
		STATUS[l4lb]="n/a (build failed)"
		NOTE[l4lb]="l4lb build failed: $(log_reason "$TMP/l4lb-build.log" 2)"
		return 1
	fi
}

# -------------------------------------------------------------- backends ---

start_backends() {
	local i=0 b
	for b in "${BACKENDS[@]}"; do
		i=$((i + 1))
		start_bg echo$i "$TMP/echo$i.log" "$UDPLOAD" echo -listen "$b" -lifetime 2h
		wait_bound "$LAST_PID" "${b##*:}" || die "echo backend $b did not start: $(log_reason "$TMP/echo$i.log" 3)"
	done
}

# ---------------------------------------------------------------- targets ---

start_direct() { STATUS[direct]=ok; }

start_l4lb() {
	build_l4lb || return 0
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
	} >"$cfg"
	start_bg l4lb "$TMP/l4lb.log" "$L4LB" run -config "$cfg"
	if wait_bound "$LAST_PID" "${TARGET_ADDR[l4lb]##*:}"; then
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
	command -v nginx >/dev/null || { STATUS[nginx]="n/a (nginx not installed)"; return 0; }
	have_stream_module || { STATUS[nginx]="n/a (nginx stream module not installed)"; return 0; }
	local dir=$TMP/nginx cfg=$TMP/nginx/nginx.conf b
	mkdir -p "$dir"
	{
		if ! nginx -V 2>&1 | grep -qE -- '--with-stream( |$)'; then
			echo "load_module /usr/lib/nginx/modules/ngx_stream_module.so;"
		fi
		if ((EUID == 0)); then echo "user root;"; fi
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
			}
		EOF
	} >"$cfg"
	start_bg nginx "$TMP/nginx.log" nginx -p "$dir" -c "$cfg" -e "$dir/error.log" -g 'daemon off;'
	if wait_bound "$LAST_PID" "${TARGET_ADDR[nginx]##*:}"; then
		STATUS[nginx]=ok
	else
		not_started nginx "$dir/error.log"
	fi
}

# -------------------------------------------------------------- workloads ---

RESULT=$TMP/result
CLIENT_OUT=$TMP/client.out
CLIENT_ERR=$TMP/client.err
CLIENT_PID=

run_client() {
	local limit=$1 rc=0
	shift
	timeout "$limit" "$@" </dev/null >"$CLIENT_OUT" 2>"$CLIENT_ERR" &
	CLIENT_PID=$!
	wait "$CLIENT_PID" || rc=$?
	CLIENT_PID=
	if ((rc == 124)); then echo "timed out after $limit s" >>"$CLIENT_ERR"; fi
	return "$rc"
}

# measure_udp TARGET SIZE: one udpload client run.
measure_udp() {
	local target=$1 size=$2
	if ! run_client $((UDP_TIME + 30)) "$UDPLOAD" client -target "${TARGET_ADDR[$target]}" \
		-flows "$UDP_FLOWS" -window "$UDP_WINDOW" -size "$size" -duration "${UDP_TIME}s"; then
		log "udpload -size $size via $target failed: $(log_reason "$CLIENT_ERR")"
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

# ----------------------------------------------------------------- output ---

cpu_busy_pct() {
	local a b
	a=$(head -n 1 /proc/stat)
	sleep 1
	b=$(head -n 1 /proc/stat)
	awk -v a="$a" -v b="$b" 'BEGIN {
		na = split(a, x); split(b, y); tot = 0
		for (i = 2; i <= na; i++) tot += y[i] - x[i]
		idle = (y[5] - x[5]) + (y[6] - x[6])
		printf "%d\n", (tot > 0) ? 100 * (tot - idle) / tot + 0.5 : 0 }'
}

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) exit 1; if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

versions() {
	local n g
	n=$(nginx -v 2>&1 | sed -n 's|.*nginx/||p' | head -n 1) || true
	g=$(go version 2>/dev/null | awk '{ print $3 }') || true
	printf 'nginx %s, %s' "${n:-?}" "${g:-go ?}"
}

print_table() {
	local t row wl med dmed cell fmt fails loss
	local cpu kernel rev
	cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
	kernel=$(uname -r)
	rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "no commit")
	if [[ -n $(git -C "$ROOT" status --porcelain 2>/dev/null | head -n 1) ]]; then rev+=" (dirty)"; fi
	echo "### l4lb UDP loopback benchmark"
	echo
	echo "- date: $START_DATE (the run took $((SECONDS - START)) s)"
	echo "- command: \`$CMD_LINE\`"
	echo "- host: nproc $NCPU, ${cpu:-unknown CPU}, kernel $kernel;" \
		"CPU already ${BUSY_START}% busy before the run (1 s sample)"
	echo "- versions: $(versions); l4lb $rev, balance $L4LB_BALANCE"
	echo "- workload: scripts/udpload, $UDP_FLOWS flows x $UDP_WINDOW datagrams outstanding, ${UDP_TIME} s" \
		"per run, 2 echo backends; nginx \`udp reuseport\`, workers = cores," \
		"proxy_responses ${NGINX_UDP_RESPONSES:-unset}, proxy_timeout 60s"
	echo "- each cell: median of $ROUNDS interleaved round(s) (ratio to direct); clients, proxy and" \
		"backends share the same $NCPU cores; for p99 lower is better"
	echo
	printf '| workload |'
	for t in "${ALL_TARGETS[@]}"; do printf ' %s |' "$t"; done
	printf '\n|---|'
	for t in "${ALL_TARGETS[@]}"; do printf -- '---:|'; done
	printf '\n'
	for row in "${ROWS[@]}"; do
		wl=${row%%.*} fmt=${ROW_FMT[$row]}
		dmed=$(median <<<"${SAMPLES[direct,$row]:-}") || dmed=
		printf '| %s |' "${ROW_LABEL[$row]}"
		for t in "${ALL_TARGETS[@]}"; do
			if [[ " ${TARGET_LIST[*]} " != *" $t "* ]]; then
				cell="n/a (not selected)"
			elif [[ ${STATUS[$t]:-} != ok ]]; then
				cell=${STATUS[$t]:-n/a}
			elif med=$(median <<<"${SAMPLES[$t,$row]:-}"); then
				# shellcheck disable=SC2059
				cell=$(printf "$fmt" "$med")
				if [[ -n $dmed ]] && awk -v d="$dmed" 'BEGIN { exit !(d > 0) }'; then
					cell+=$(awk -v m="$med" -v d="$dmed" 'BEGIN { printf " (%.2f)", m / d }')
				fi
				if [[ $row == *.dps ]]; then
					loss=$(median <<<"${SAMPLES[$t,$wl.loss]:-}") || loss=0
					if awk -v l="$loss" 'BEGIN { exit !(l > 0) }'; then cell+=" [loss ${loss}%]"; fi
				fi
				fails=${FAILED[$t,$wl]:-0}
				if ((fails)); then cell+=" [$fails/$ROUNDS runs failed]"; fi
			else
				cell="n/a (all runs failed)"
			fi
			printf ' %s |' "$cell"
		done
		printf '\n'
	done
	if ((${#NOTE[@]})); then echo; fi
	for t in "${ALL_TARGETS[@]}"; do
		if [[ -n ${NOTE[$t]:-} ]]; then printf -- '- %s\n' "${NOTE[$t]}"; fi
	done
}

# ------------------------------------------------------------------- main ---

ensure_packages
command -v ss >/dev/null || die "ss is required (install iproute2, or run as root to have it installed)"
for b in "${BACKENDS[@]}" "${TARGET_ADDR[l4lb]}" "${TARGET_ADDR[nginx]}"; do
	if bound_udp "${b##*:}"; then
		die "UDP port ${b##*:} is already in use: set BENCH_UDP_PORT_BASE to a free block"
	fi
done

START=$SECONDS
START_DATE=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
BUSY_START=$(cpu_busy_pct)
if ((BUSY_START >= 20)); then
	log "warning: the CPUs are already ${BUSY_START}% busy before the run: expect noisy results"
fi
log "rounds=$ROUNDS ${UDP_TIME}s per run, $UDP_FLOWS flows x window $UDP_WINDOW, sizes ${SIZES[*]}; targets: ${TARGET_LIST[*]}"
build_udpload
start_backends
for t in "${TARGET_LIST[@]}"; do
	"start_$t"
	[[ ${STATUS[$t]} == ok ]] || log "$t: ${NOTE[$t]:-${STATUS[$t]}}"
done

ACTIVE=()
for t in "${TARGET_LIST[@]}"; do [[ ${STATUS[$t]} == ok ]] && ACTIVE+=("$t"); done

for ((r = 1; r <= ROUNDS; r++)); do
	for ((w = 0; w < ${#WORKLOADS[@]}; w++)); do
		wl=${WORKLOADS[w]}
		# Rotate the target order per round and workload so that no target
		# always runs first (or right after the same neighbour).
		for ((i = 0; i < ${#ACTIVE[@]}; i++)); do
			t=${ACTIVE[(i + r - 1 + w) % ${#ACTIVE[@]}]}
			: >"$RESULT"
			if measure_udp "$t" "${wl#udp}" && [[ -s $RESULT ]]; then
				while read -r metric value; do
					SAMPLES[$t,$wl.$metric]+="$value "
				done <"$RESULT"
				log "round $r/$ROUNDS $wl $t: $(tr '\n' ' ' <"$RESULT")"
			else
				FAILED[$t,$wl]=$((${FAILED[$t,$wl]:-0} + 1))
			fi
		done
	done
done

print_table
log "done in $((SECONDS - START)) s"
