# shellcheck shell=bash
# scripts/bench-lib.sh: machinery shared by scripts/bench.sh (TCP) and
# scripts/bench-udp.sh (UDP). Sourced, never run: it only defines functions,
# so sourcing it has no side effects.
#
# What the functions expect from the sourcing script:
#   BENCH_NAME       prefix of the log lines ("bench", "bench-udp"), set
#                    before sourcing
#   ROOT             the repository root (the scripts cd there)
#   ALL_TARGETS      every column, in table order; TARGET_LIST (set by
#                    parse_targets) the selected ones; TARGET_LABEL, optional,
#                    a column's header where it is not the target's name
#   STATUS, SAMPLES, FAILED, NOTE   per-target state (declared by bench_setup)
#   ROWS, ROW_LABEL, ROW_FMT, ROW_COST   the table rows (see print_table_body)
#   hooks            measure_workload TARGET WORKLOAD (run_rounds),
#                    start_<target> (start_targets), optionally row_median
#                    and cell_extra (print_table_body)

log() { printf '[%s %(%H:%M:%S)T] %s\n' "${BENCH_NAME:-bench}" -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- settings ---

# set_cmd_line SCRIPT ARGS VAR...: CMD_LINE, the exact command, with the VARs
# the user set explicitly (ARGS: the script's "$*").
set_cmd_line() {
	local script=$1 args=$2 v
	shift 2
	local -a env=()
	for v in "$@"; do
		if [[ -n ${!v+x} ]]; then
			if [[ ${!v} =~ ^[A-Za-z0-9_./:,=+-]*$ ]]; then env+=("$v=${!v}"); else env+=("$v='${!v}'"); fi
		fi
	done
	CMD_LINE="${env[*]:+${env[*]} }$script${args:+ $args}"
}

# require_positive_ints VAR...: die unless every VAR is a positive integer.
require_positive_ints() {
	local v
	for v in "$@"; do
		[[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
	done
}

# parse_targets: TARGET_LIST from TARGETS (default: ALL_TARGETS), checked.
parse_targets() {
	local t
	read -r -a TARGET_LIST <<<"${TARGETS:-${ALL_TARGETS[*]}}"
	for t in "${TARGET_LIST[@]}"; do
		[[ " ${ALL_TARGETS[*]} " == *" $t "* ]] || die "unknown target '$t' in TARGETS (known: ${ALL_TARGETS[*]})"
	done
	[[ " ${TARGET_LIST[*]} " == *" direct "* ]] || die "TARGETS must include direct (the ratios are to direct)"
}

# selected TARGET: TARGET is in TARGET_LIST.
selected() { [[ " ${TARGET_LIST[*]} " == *" $1 "* ]]; }

# ------------------------------------------------------- process handling ---

# bench_setup TMP_PREFIX: the temp dir ($TMP), the process and state tables,
# and the traps that stop everything started (cleanup) on exit.
bench_setup() {
	TMP=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
	PIDS=()
	declare -gA PID_NAME=()
	SYSCTL_RESTORE=() # "name=value" to put back on exit
	POLICY_RC_CREATED=0
	declare -gA STATUS=()  # target -> "ok" or "n/a (reason)"
	declare -gA SAMPLES=() # "target,metric" -> space separated values
	declare -gA FAILED=()  # "target,workload" -> failed run count
	declare -gA NOTE=()    # target -> details printed under the table
	declare -gA TARGET_LABEL # target -> column header, where not its name (kept if set)
	RESULT=$TMP/result
	CLIENT_OUT=$TMP/client.out
	CLIENT_ERR=$TMP/client.err
	CLIENT_PID=
	trap cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
}

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
	local rc=$? pid i kv
	trap - EXIT INT TERM
	if [[ -n ${CLIENT_PID:-} ]]; then stop_pid "$CLIENT_PID"; fi
	for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
		pid=${PIDS[i]}
		stop_pid "$pid"
	done
	for kv in "${SYSCTL_RESTORE[@]}"; do
		sysctl -q -w "$kv" >/dev/null 2>&1 || log "could not restore sysctl $kv"
	done
	if ((POLICY_RC_CREATED)); then rm -f /usr/sbin/policy-rc.d; fi
	if [[ ${KEEP_TMP:-0} == 1 ]]; then log "logs and configs kept in $TMP"; else rm -rf "$TMP"; fi
	exit "$rc"
}

# start_bg NAME LOGFILE CMD...: run CMD in the background (a child of this
# shell, so it can be waited for) and remember its PID in $LAST_PID.
#
# Each server (backends and proxies) runs in a session of its own. With
# the kernel's autogroup scheduling on (kernel.sched_autogroup_enabled, the
# default of most distributions), a session is one scheduling group, and
# groups share the CPU evenly. Each process of the run stands for a host of
# its own, so each gets a fair share as one unit, whatever its number of
# threads. In one shared group the scheduler would weigh thread against
# thread instead, and a proxy's extra threads (Go's runtime, HAProxy's
# nbthread) would compete with the client and the backend one by one: on
# redis -k 1 that moved l4lb from 39-45k requests/s to 32-37k and HAProxy
# from 37-39k to 34-42k (docs/performance.md). setsid replaces itself with
# CMD (this background job is no group leader), so the PID stays CMD's.
start_bg() {
	local name=$1 logf=$2
	shift 2
	setsid "$@" </dev/null >"$logf" 2>&1 &
	LAST_PID=$!
	PIDS+=("$LAST_PID")
	PID_NAME[$LAST_PID]=$name
}

# stop_named NAME: stop every remembered process called NAME.
stop_named() {
	local name=$1 pid keep=()
	for pid in "${PIDS[@]}"; do
		if [[ ${PID_NAME[$pid]} == "$name" ]]; then stop_pid "$pid"; else keep+=("$pid"); fi
	done
	PIDS=("${keep[@]}")
}

# port_bound tcp|udp PORT: something listens on (tcp) or is bound to (udp) PORT.
port_bound() { [[ -n $(ss -Hl"${1:0:1}"n "sport = :$2" 2>/dev/null) ]]; }

# wait_ports tcp|udp PID PORT...: poll until every PORT listens (tcp) or is
# bound (udp), for at most 5 s, while PID lives. No connection is made: a
# stray connection would confuse the iperf3 server.
wait_ports() {
	local proto=$1 pid=$2 i p ok
	shift 2
	for ((i = 0; i < 100; i++)); do
		kill -0 "$pid" 2>/dev/null || return 1
		ok=1
		for p in "$@"; do port_bound "$proto" "$p" || { ok=0; break; }; done
		((ok)) && return 0
		sleep 0.05
	done
	return 1
}

# --------------------------------------------------------------- tooling ---

# The stream module: built in, or Debian's libnginx-mod-stream (loaded with
# load_module by the start_nginx functions).
have_stream_module() {
	nginx -V 2>&1 | grep -qE -- '--with-stream( |$)' && return 0
	[[ -f /usr/lib/nginx/modules/ngx_stream_module.so ]]
}

# nginx_usable: nginx and its stream module are installed; if not,
# STATUS[nginx] says which is missing.
nginx_usable() {
	command -v nginx >/dev/null || { STATUS[nginx]="n/a (nginx not installed)"; return 1; }
	have_stream_module || { STATUS[nginx]="n/a (nginx stream module not installed)"; return 1; }
}

# nginx_conf_prelude: the first lines of an nginx.conf: load the stream
# module unless it is built in, and run the workers as root when we are root.
nginx_conf_prelude() {
	if ! nginx -V 2>&1 | grep -qE -- '--with-stream( |$)'; then
		echo "load_module /usr/lib/nginx/modules/ngx_stream_module.so;"
	fi
	if ((EUID == 0)); then echo "user root;"; fi
}

# ensure_packages COMMAND=PACKAGE...: install (as root, with apt) the PACKAGE
# of every COMMAND that is missing, plus nginx and its stream module when
# nginx is a selected target.
ensure_packages() {
	local missing=() spec
	for spec in "$@"; do
		command -v "${spec%%=*}" >/dev/null || missing+=("${spec#*=}")
	done
	if selected nginx; then
		command -v nginx >/dev/null || missing+=(nginx)
		{ command -v nginx >/dev/null && have_stream_module; } || missing+=(libnginx-mod-stream)
	fi
	((${#missing[@]})) || return 0
	if ((EUID != 0)); then
		log "missing packages (${missing[*]}) and not root: not installing them"
		return 0
	fi
	log "installing missing packages: ${missing[*]}"
	# Keep apt from starting the system services (nginx, redis): they are not
	# ours to leave behind.
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

# not_started TARGET LOGFILE: mark TARGET n/a, keeping its log's last lines as a note.
not_started() {
	STATUS[$1]="n/a (did not start)"
	NOTE[$1]="$1 did not start: $(log_reason "$2" 3)"
	stop_named "$1"
}

# log_reason LOGFILE [N]: the last N (default 1) non-empty lines of a log, on
# one line, for an n/a reason. Prefers lines that look like errors.
log_reason() {
	local lines
	lines=$(grep -iE 'alert|emerg|error|fatal|panic|fail' "$1" 2>/dev/null) ||
		lines=$(grep -v '^[[:space:]]*$' "$1" 2>/dev/null) || lines="no log output"
	tail -n "${2:-1}" <<<"$lines" | tr -s '\n\t ' ' ' | tr '|' '/' | cut -c1-240 | sed 's/ *$//'
}

l4lb_sources_newer() {
	[[ -n $(find . \( -path ./.git -o -path ./bin \) -prune -o \
		\( -name '*.go' ! -name '*_test.go' -o -name go.mod -o -name go.sum \) -newer bin/l4lb -print -quit) ]]
}

# build_l4lb [SHOW]: $L4LB, from L4LB_BIN or bin/l4lb (rebuilt when a source
# is newer). On failure STATUS[l4lb] says why; with SHOW > 0 the first SHOW
# lines of the build log also go to stderr.
# shellcheck disable=SC2034 # L4LB is for the start_l4lb functions
build_l4lb() {
	local show=${1:-0}
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
	if ! go build -ldflags "-X main.version=$(git describe --tags --always --dirty 2>/dev/null || echo dev)" -o bin/l4lb ./cmd/l4lb >"$TMP/l4lb-build.log" 2>&1; then
		if ((show > 0)); then
			log "go build ./cmd/l4lb failed:"
			sed 's/^/    /' "$TMP/l4lb-build.log" | head -n "$show" >&2
		fi
		STATUS[l4lb]="n/a (build failed)"
		NOTE[l4lb]="l4lb build failed: $(log_reason "$TMP/l4lb-build.log" 2)"
		return 1
	fi
}

# -------------------------------------------------------------------- run ---

# start_targets: start_<target> for every selected target; each sets
# STATUS[target] ("ok" or "n/a (reason)") and must not fail the run. ACTIVE
# lists the targets that started.
start_targets() {
	local t
	for t in "${TARGET_LIST[@]}"; do
		"start_$t"
		[[ ${STATUS[$t]} == ok ]] || log "$t: ${NOTE[$t]:-${STATUS[$t]}}"
	done
	ACTIVE=()
	for t in "${TARGET_LIST[@]}"; do [[ ${STATUS[$t]} == ok ]] && ACTIVE+=("$t"); done
	return 0
}

# run_client SECONDS CMD...: run CMD with a time limit, output in $CLIENT_OUT
# and $CLIENT_ERR; a trapped signal interrupts the wait and cleanup stops it.
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

# run_rounds: ROUNDS interleaved rounds of every workload in WORKLOADS on
# every ACTIVE target; measure_workload TARGET WORKLOAD writes "metric value"
# lines to $RESULT (kept in SAMPLES) or fails (counted in FAILED).
run_rounds() {
	local r w wl i j k n=${#ACTIVE[@]} t metric value
	for ((r = 1; r <= ROUNDS; r++)); do
		for ((w = 0; w < ${#WORKLOADS[@]}; w++)); do
			wl=${WORKLOADS[w]}
			# Start each round and workload at another target, so that each
			# runs first once in n rounds, and walk the order backwards every
			# other round: a rotation alone keeps each target right after the
			# same neighbour.
			k=$((r - 1 + w))
			for ((i = 0; i < n; i++)); do
				if ((r % 2)); then j=$(((k + i) % n)); else j=$(((k - i + n) % n)); fi
				t=${ACTIVE[j]}
				: >"$RESULT"
				if measure_workload "$t" "$wl" && [[ -s $RESULT ]]; then
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
}

# ----------------------------------------------------------------- output ---

# cpu_busy_pct: percentage of all CPU time that was not idle over one second.
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

# mark_start: START, START_DATE and BUSY_START (how busy the CPUs already
# are: the benchmark wants the whole machine, so say so when something else
# is using it).
mark_start() {
	START=$SECONDS
	START_DATE=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
	BUSY_START=$(cpu_busy_pct)
	if ((BUSY_START >= 20)); then
		log "warning: the CPUs are already ${BUSY_START}% busy before the run: expect noisy results"
	fi
}

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) exit 1; if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# sample_median TARGET ROW: the median of the cell's samples.
sample_median() { median <<<"${SAMPLES[$1,$2]:-}"; }

# versions TOOL...: "tool version, ..." for the TOOLs (haproxy nginx iperf3
# redis go), "?" where one is missing.
versions() {
	local tool v out=
	for tool in "$@"; do
		case $tool in
		haproxy) v=$(haproxy -v 2>/dev/null | awk 'NR == 1 { print $3 }') || true ;;
		nginx) v=$(nginx -v 2>&1 | sed -n 's|.*nginx/||p' | head -n 1) || true ;;
		iperf3) v=$(iperf3 --version 2>/dev/null | awk 'NR == 1 { print $2 }') || true ;;
		redis) v=$(redis-server --version 2>/dev/null | sed -n 's/.* v=\([^ ]*\).*/\1/p') || true ;;
		go)
			v=$(go version 2>/dev/null | awk '{ print $3 }') || true
			out+="${out:+, }${v:-go ?}"
			continue
			;;
		*) v= ;;
		esac
		out+="${out:+, }$tool ${v:-?}"
	done
	printf '%s' "$out"
}

# print_table_head TITLE VERSION_TOOL...: the title and the lines about the
# run, host and versions; the script adds its workload lines after it.
print_table_head() {
	local title=$1 cpu kernel rev
	shift
	cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
	kernel=$(uname -r)
	rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "no commit")
	if [[ -n $(git -C "$ROOT" status --porcelain 2>/dev/null | head -n 1) ]]; then rev+=" (dirty)"; fi
	echo "### $title"
	echo
	echo "- date: $START_DATE (the run took $((SECONDS - START)) s)"
	echo "- command: \`$CMD_LINE\`"
	echo "- host: nproc $NCPU, ${cpu:-unknown CPU}, kernel $kernel;" \
		"CPU already ${BUSY_START}% busy before the run (1 s sample)"
	echo "- versions: $(versions "$@"); l4lb $rev, balance $L4LB_BALANCE"
}

# print_table_body: the Markdown table, one line per row of ROWS, then the
# notes. A cell is the median (row_median TARGET ROW when the script defines
# it, else sample_median) in ROW_FMT[row], with its ratio to direct's median
# unless ROW_COST[row] is set (a cost of the proxy: direct's cell is then
# ROW_COST[row] itself); then what cell_extra TARGET ROW WORKLOAD prints, if
# the script defines it, and the failed runs.
print_table_body() {
	local t row wl med dmed cell fmt fails median_fn=sample_median
	if declare -F row_median >/dev/null; then median_fn=row_median; fi
	printf '| workload |'
	for t in "${ALL_TARGETS[@]}"; do printf ' %s |' "${TARGET_LABEL[$t]:-$t}"; done
	printf '\n|---|'
	for t in "${ALL_TARGETS[@]}"; do printf -- '---:|'; done
	printf '\n'
	for row in "${ROWS[@]}"; do
		wl=${row%%.*} fmt=${ROW_FMT[$row]}
		dmed=$("$median_fn" direct "$row") || dmed=
		printf '| %s |' "${ROW_LABEL[$row]}"
		for t in "${ALL_TARGETS[@]}"; do
			if ! selected "$t"; then
				cell="n/a (not selected)"
			elif [[ ${STATUS[$t]:-} != ok ]]; then
				cell=${STATUS[$t]:-n/a}
			elif [[ $t == direct && -n ${ROW_COST[$row]:-} ]]; then
				# Nothing in between: no proxy descriptor, memory or CPU.
				cell=${ROW_COST[$row]}
			elif med=$("$median_fn" "$t" "$row"); then
				# shellcheck disable=SC2059
				cell=$(printf "$fmt" "$med")
				if [[ -z ${ROW_COST[$row]:-} && -n $dmed ]] && awk -v d="$dmed" 'BEGIN { exit !(d > 0) }'; then
					cell+=$(awk -v m="$med" -v d="$dmed" 'BEGIN { printf " (%.2f)", m / d }')
				fi
				if declare -F cell_extra >/dev/null; then cell+=$(cell_extra "$t" "$row" "$wl"); fi
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

# ensure_tw_reuse WHAT: tcp_tw_reuse on for the run (2, loopback only, is
# enough), put back on exit. A connection per request leaves a TIME_WAIT
# socket each, the proxy's to the backend too: without it the ephemeral
# ports run out. WHAT names the workload that would run out, for the
# warning where it cannot be set.
ensure_tw_reuse() {
	local tw
	tw=$(cat /proc/sys/net/ipv4/tcp_tw_reuse 2>/dev/null || echo 2)
	[[ $tw == 0 ]] || return 0
	if ((EUID == 0)) && sysctl -q -w net.ipv4.tcp_tw_reuse=1 >/dev/null 2>&1; then
		SYSCTL_RESTORE+=("net.ipv4.tcp_tw_reuse=0")
		log "net.ipv4.tcp_tw_reuse set to 1 for this run (restored on exit)"
	else
		log "warning: net.ipv4.tcp_tw_reuse=0 and cannot change it; $1 may run out of ports"
	fi
}
