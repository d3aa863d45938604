#!/usr/bin/env bash
# flyproxy benchmark: flyproxy (simple and bpf) against HAProxy (with and without splice), nginx
# stream and a direct connection, all on loopback inside a network namespace of its own.
# See bench/README.md. Usage (as root; `make bench` runs it):
#
#   bench/run.sh                      # ROUNDS=3 DURATION=5: about 10 minutes
#   QUICK=1 bench/run.sh              # smoke test: 1 round of 2 s runs, to bench/quick-results.*
#   ROUNDS=5 DURATION=10 bench/run.sh
#
# Environment (all optional):
#   ROUNDS=3          rounds; each figure is the median over them
#   DURATION=5        seconds of each iperf3 and wrk run
#   QUICK=1           ROUNDS=1 DURATION=2 unless set, and OUT=bench/quick-results
#   OUT=bench/results path prefix of the report: OUT.md, OUT.svg, OUT.json
#   CONFIGS="direct flyproxy-simple flyproxy-bpf haproxy haproxy-splice nginx"  what to measure
#   IDLE_CONNS=9000   idle connections held for the memory figure
#   WRK_CONNS=50      wrk connections (both wrk figures); wrk runs 2 threads
#   BACKEND_WORKERS=2 worker processes of the backend nginx that answers the wrk requests
#   QUIET_IDLE=90 QUIET_WAIT=30  before each configuration, wait up to QUIET_WAIT s for the
#                     machine to be QUIET_IDLE % idle (others' builds and tests skew figures)
#   REV=HEAD          benchmark this commit (exported and built apart) instead of the working tree
#   REDO_OVER=20 REDO_MAX=6 BUDGET=900  then measure again (at most REDO_MAX, quick: 0, and
#                     only while the run stays within BUDGET s) the turns during which other
#                     processes used more than REDO_OVER % of a core
#   NICE=-10          run the bench at this niceness (wins the CPU from others' work, at their cost)
#   KEEP=1            keep the work directory (configs, logs, raw tool output) after a success
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$BENCH_DIR")

if [[ "${QUICK:-0}" != 0 && -n "${QUICK:-}" ]]; then
    QUICK=1
    ROUNDS=${ROUNDS:-1}
    DURATION=${DURATION:-2}
    OUT=${OUT:-$BENCH_DIR/quick-results}
else
    QUICK=0
fi
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
OUT=${OUT:-$BENCH_DIR/results}
CONFIGS=${CONFIGS:-direct flyproxy-simple flyproxy-bpf haproxy haproxy-splice nginx}
IDLE_CONNS=${IDLE_CONNS:-9000}
WRK_CONNS=${WRK_CONNS:-50}
WRK_THREADS=2
BACKEND_WORKERS=${BACKEND_WORKERS:-2}
# Before each configuration, wait (at most QUIET_WAIT s) until the machine is QUIET_IDLE % idle.
QUIET_IDLE=${QUIET_IDLE:-90}
QUIET_WAIT=${QUIET_WAIT:-30}
# After the rounds, measure again (at most REDO_MAX times, and only while the whole run stays
# within BUDGET seconds) the turns during which processes outside the bench used more than
# REDO_OVER % of a core.
REDO_OVER=${REDO_OVER:-20}
REDO_MAX=${REDO_MAX:-$(( QUICK == 1 ? 0 : 6 ))}
BUDGET=${BUDGET:-900}
# Niceness of everything the bench runs (e.g. NICE=-10 to win the CPU from others' builds and
# tests on a shared machine, at their expense); unset: inherited.
NICE=${NICE:-}
# Client connections each proxy may hold; the same for all: room for the 9,000 idle connections
# of the memory figure within the 20,000-fd limit (two descriptors per connection). HAProxy with
# splice also keeps pipes (2 fds each): MAXPIPES of them fit beside.
MAXCONN=9500
MAXPIPES=400
# The fairness case: flyproxy with this many relay threads carries FAIR_STREAMS bulk streams.
FAIR_THREADS=8
FAIR_STREAMS=64
export QUICK ROUNDS DURATION OUT CONFIGS IDLE_CONNS WRK_CONNS BACKEND_WORKERS QUIET_IDLE QUIET_WAIT REDO_OVER REDO_MAX BUDGET NICE

# Backend ports; each proxy listens on BASE+1 (iperf3), BASE+2 (http), BASE+3 (echo).
IPERF_BACKEND=5201
HTTP_BACKEND=8080
ECHO_BACKEND=7000
BPF_LISTEN_PORT=8000
declare -A BASE=([direct]=0 [flyproxy-simple]=10000 [flyproxy-bpf]=11000 [haproxy]=12000
                 [haproxy-splice]=13000 [nginx]=14000)

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

is_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
is_int "$ROUNDS" || die "ROUNDS must be a whole number above 0, not '$ROUNDS'"
is_int "$DURATION" || die "DURATION must be a whole number of seconds above 0, not '$DURATION'"
is_int "$IDLE_CONNS" || die "IDLE_CONNS must be a whole number above 0"
[[ "$REDO_MAX" =~ ^[0-9]+$ ]] || die "REDO_MAX must be a whole number"
is_int "$BUDGET" || die "BUDGET must be a whole number of seconds above 0"
[[ -z "$NICE" || "$NICE" =~ ^-?[0-9]+$ ]] || die "NICE must be a niceness like -10"
for c in $CONFIGS; do [[ -n "${BASE[$c]+x}" ]] || die "unknown config '$c' in CONFIGS"; done

# ============================================================== outside the namespace

if [[ "${1:-}" != "--inside" ]]; then
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null || die "the bench needs root (network namespace, eBPF)"
        exec sudo --preserve-env=REV,QUICK,ROUNDS,DURATION,OUT,CONFIGS,IDLE_CONNS,WRK_CONNS,BACKEND_WORKERS,QUIET_IDLE,QUIET_WAIT,REDO_OVER,REDO_MAX,BUDGET,NICE,KEEP,CARGO_TARGET_DIR,PATH "$0" "$@"
    fi
    START=$EPOCHREALTIME
    export START

    # Install what is missing, only that (like the Makefile's deps target).
    DEPS="haproxy nginx-light libnginx-mod-stream iperf3 wrk python3 iproute2 util-linux
          clang libelf-dev zlib1g-dev pkg-config linux-libc-dev"
    missing=""
    for p in $DEPS; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
    done
    if [[ -n "$missing" ]]; then
        log "installing:$missing"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    fi
    for tool in haproxy nginx iperf3 wrk ss ip unshare timeout cargo; do
        command -v "$tool" >/dev/null || die "$tool is not installed"
    done
    PYTHON=$(command -v /usr/bin/python3 || command -v python3) || die "python3 is not installed"
    export PYTHON

    if [[ -n "${REV:-}" ]]; then
        # Build a commit, exported clean, whatever state the working tree is in. Its own target
        # directory is kept between runs for the dependencies; the sources are touched so that
        # flyproxy itself is always rebuilt.
        commit=$(git -C "$REPO" rev-parse --verify --quiet "$REV^{commit}") \
            || die "REV=$REV is not a commit of $REPO"
        build=${TMPDIR:-/tmp}/flyproxy-bench-build
        rm -rf "$build/src"; mkdir -p "$build/src"
        git -C "$REPO" archive "$commit" | tar -x -m -C "$build/src" || die "git archive $REV failed"
        log "building flyproxy $REV (${commit:0:12}) in $build (release)"
        (cd "$build/src" && CARGO_TARGET_DIR=$build/target cargo build --release --bin flyproxy --example echo) \
            || die "cargo build --release of $REV failed"
        TARGET=$build/target
        FLYPROXY_REV="${commit:0:12} (REV=$REV, built from a clean export of the commit)"
    else
        log "building flyproxy (release)"
        (cd "$REPO" && cargo build --release --bin flyproxy --example echo) \
            || die "cargo build --release failed (to benchmark a commit instead of the working tree: REV=HEAD)"
        TARGET=${CARGO_TARGET_DIR:-$REPO/target}
        [[ "$TARGET" = /* ]] || TARGET=$REPO/$TARGET
        FLYPROXY_REV=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo "?")
        dirty=$(git -C "$REPO" status --porcelain -- src Cargo.toml Cargo.lock build.rs examples 2>/dev/null | wc -l)
        [[ "$dirty" != 0 ]] && FLYPROXY_REV="$FLYPROXY_REV + uncommitted changes in $dirty files (working tree)"
    fi
    export FLYPROXY_REV

    WORK=$(mktemp -d /tmp/flyproxy-bench.XXXXXX)
    export WORK
    mkdir -p "$WORK/bin" "$WORK/log" "$WORK/raw" "$WORK/conf"
    # Run copies: a rebuild by someone else during the run must not swap the binary mid-way.
    cp "$TARGET/release/flyproxy" "$TARGET/release/examples/echo" "$WORK/bin/"
    log "work directory: $WORK"
    # Same PID, new network namespace with only loopback: nothing the bench does reaches the host.
    if [[ -n "$NICE" ]]; then
        exec nice -n "$NICE" unshare --net -- "$BASH" "$0" --inside
    fi
    exec unshare --net -- "$BASH" "$0" --inside
fi

# ============================================================== inside the namespace

DATA=$WORK/data.jsonl
META=$WORK/meta.tsv
FAILURES=$WORK/failures.txt
: >"$DATA"
: >"$META"
: >"$FAILURES"
export BENCH_DATA=$DATA
TOOL=("$PYTHON" "$BENCH_DIR/tool.py")
ip link set lo up

declare -A PIDS=()   # name -> pid of every long-running process started here

# Whether PID has exited (gone, or a zombie waiting to be reaped).
exited() {
    local s
    read -r s 2>/dev/null <"/proc/$1/stat" || return 0
    s=${s##*) }
    [[ ${s:0:1} == Z ]]
}

# Wait up to SECONDS for PID to exit; false if it has not.
wait_exit() {
    local pid=$1 end=$(( EPOCHSECONDS + $2 ))
    until exited "$pid"; do
        (( EPOCHSECONDS < end )) || return 1
        sleep 0.05
    done
}

# Stop one started process: TERM, then KILL if it has not exited within 5 s.
stop() {
    local name=$1 pid=${PIDS[$1]:-}
    [[ -n "$pid" ]] || return 0
    unset "PIDS[$name]"
    if kill -TERM "$pid" 2>/dev/null && ! wait_exit "$pid" 5; then
        log "$name ($pid) still running 5 s after SIGTERM: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for name in "${!PIDS[@]}"; do stop "$name"; done
    # Safety net: anything else still in this namespace was started by this script (the
    # namespace is its own), e.g. a tool cut off by a signal. Kill it by pid.
    local p
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [[ "$p" == "$$" || "$p" == "$BASHPID" ]] && continue
        if [[ /proc/$p/ns/net -ef /proc/$$/ns/net ]]; then kill -KILL "$p" 2>/dev/null || true; fi
    done
    if (( rc != 0 )); then
        log "failed (exit $rc); logs and raw output kept in $WORK"
    elif [[ "${KEEP:-0}" != 0 ]]; then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# Start a long-running process in the background, output to log/NAME.log.
start() {
    local name=$1; shift
    "$@" >"$WORK/log/$name.log" 2>&1 &
    PIDS[$name]=$!
}

show_log() {
    log "--- last lines of $WORK/log/$1.log:"
    tail -n 20 "$WORK/log/$1.log" >&2 || true
}

# Wait until PORT has a listening socket, failing if NAME died or after DEADLINE seconds.
wait_listen() {
    local name=$1 port=$2 deadline=${3:-10}
    local end=$(( EPOCHSECONDS + deadline ))
    while [[ -z "$(ss -Hltn "sport = :$port")" ]]; do
        if [[ -n "$name" ]] && ! kill -0 "${PIDS[$name]}" 2>/dev/null; then
            show_log "$name"; die "$name exited before listening on port $port"
        fi
        (( EPOCHSECONDS < end )) || { show_log "$name"; die "$name: port $port not listening after ${deadline}s"; }
        sleep 0.02
    done
}

fill() { # fill TEMPLATE OUT KEY=VALUE...
    local tmpl=$1 out=$2; shift 2
    local args=() kv
    for kv in "$@"; do args+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
    sed "${args[@]}" "$tmpl" >"$out"
    if grep -q '@[A-Z_]*@' "$out"; then die "$out: unfilled template field $(grep -o '@[A-Z_]*@' "$out" | head -1)"; fi
}

NGINX_MODULES=/usr/lib/nginx/modules
[[ -f $NGINX_MODULES/ngx_stream_module.so ]] || die "nginx stream module not found in $NGINX_MODULES"

# ---------------------------------------------------------------- configs

for cfg in $CONFIGS; do
    b=${BASE[$cfg]}
    ports=(IPERF_PORT=$((b + 1)) HTTP_PORT=$((b + 2)) ECHO_PORT=$((b + 3))
           "IPERF_BACKEND=$IPERF_BACKEND" "HTTP_BACKEND=$HTTP_BACKEND" "ECHO_BACKEND=$ECHO_BACKEND")
    case $cfg in
        flyproxy-*)
            fill "$BENCH_DIR/conf/flyproxy.json.in" "$WORK/conf/$cfg.json" "${ports[@]}" ;;
        haproxy)
            fill "$BENCH_DIR/conf/haproxy.cfg.in" "$WORK/conf/$cfg.cfg" "${ports[@]}" \
                MAXCONN=$MAXCONN MAXPIPES=$MAXPIPES SPLICE="# no splice"
            haproxy -c -q -f "$WORK/conf/$cfg.cfg" || die "haproxy rejects $WORK/conf/$cfg.cfg" ;;
        haproxy-splice)
            fill "$BENCH_DIR/conf/haproxy.cfg.in" "$WORK/conf/$cfg.cfg" "${ports[@]}" \
                MAXCONN=$MAXCONN MAXPIPES=$MAXPIPES SPLICE="option splice-auto"
            haproxy -c -q -f "$WORK/conf/$cfg.cfg" || die "haproxy rejects $WORK/conf/$cfg.cfg" ;;
        nginx)
            mkdir -p "$WORK/nginx-stream"
            fill "$BENCH_DIR/conf/nginx-stream.conf.in" "$WORK/conf/$cfg.conf" "${ports[@]}" \
                NGINX_MODULES=$NGINX_MODULES DIR="$WORK/nginx-stream" \
                NGINX_WORKER_CONNECTIONS=$((2 * MAXCONN)) MAXCONN=$MAXCONN
            nginx -q -t -e "$WORK/nginx-stream/error.log" -p "$WORK/nginx-stream" \
                -c "$WORK/conf/$cfg.conf" || die "nginx rejects $WORK/conf/$cfg.conf" ;;
    esac
done
mkdir -p "$WORK/nginx-backend"
fill "$BENCH_DIR/conf/nginx-http-backend.conf.in" "$WORK/conf/nginx-http-backend.conf" \
    HTTP_BACKEND=$HTTP_BACKEND BACKEND_WORKERS="$BACKEND_WORKERS" DIR="$WORK/nginx-backend"

# ---------------------------------------------------------------- backends

start backend-http nginx -e "$WORK/nginx-backend/error.log" -p "$WORK/nginx-backend" \
    -c "$WORK/conf/nginx-http-backend.conf"
start backend-echo "$WORK/bin/echo" "127.0.0.1:$ECHO_BACKEND"
wait_listen backend-http "$HTTP_BACKEND"
wait_listen backend-echo "$ECHO_BACKEND"
# One iperf3 server for the whole run (restarted if a run fails): it also has to survive stray
# connections, such as flyproxy's health checks, which would end a one-off (-s -1) server.
start_iperf_server() {
    start iperf-server iperf3 -s -p $IPERF_BACKEND
    wait_listen iperf-server $IPERF_BACKEND
}
start_iperf_server
"${TOOL[@]}" wait-ready --http "$HTTP_BACKEND" --echo "$ECHO_BACKEND" --deadline 10 \
    || die "backends not answering"

# ---------------------------------------------------------------- proxies

# Start CFG's proxy (none for direct) and wait until it relays, or die. Further arguments go to
# flyproxy only.
start_proxy() {
    local cfg=$1 b=${BASE[$1]}
    shift
    case $cfg in
        direct) return 0 ;;
        flyproxy-simple)
            start proxy "$WORK/bin/flyproxy" simple -c "$WORK/conf/$cfg.json" --log-level warn \
                --max-connections $MAXCONN --connect-timeout 5s --idle-timeout 1h --drain-timeout 1s "$@" ;;
        flyproxy-bpf)
            start proxy "$WORK/bin/flyproxy" bpf -p $BPF_LISTEN_PORT --bind 127.0.0.1 \
                -c "$WORK/conf/$cfg.json" --log-level warn \
                --max-connections $MAXCONN --connect-timeout 5s --idle-timeout 1h --drain-timeout 1s "$@" ;;
        haproxy|haproxy-splice)
            start proxy haproxy -db -f "$WORK/conf/$cfg.cfg" ;;
        nginx)
            start proxy nginx -e "$WORK/nginx-stream/error.log" -p "$WORK/nginx-stream" \
                -c "$WORK/conf/$cfg.conf" ;;
    esac
    if [[ $cfg == flyproxy-bpf ]]; then
        wait_listen proxy $BPF_LISTEN_PORT
    else
        wait_listen proxy $((b + 1)); wait_listen proxy $((b + 2)); wait_listen proxy $((b + 3))
    fi
    if ! "${TOOL[@]}" wait-ready --http $((b + 2)) --echo $((b + 3)) --pid "${PIDS[proxy]}" \
            --deadline 10; then
        show_log proxy; die "$cfg does not relay"
    fi
}

port_of() { # port_of CFG iperf|http|echo
    local b=${BASE[$1]} off
    case $2 in iperf) off=1 ;; http) off=2 ;; echo) off=3 ;; esac
    if [[ $1 == direct ]]; then
        case $2 in iperf) echo $IPERF_BACKEND ;; http) echo $HTTP_BACKEND ;; echo) echo $ECHO_BACKEND ;; esac
    else
        echo $((b + off))
    fi
}

failed() { # a measurement failed: say so loudly, keep going, exit non-zero at the end
    log "ERROR: $*"
    echo "round $BENCH_ROUND, $BENCH_CONFIG: $*" >>"$FAILURES"
}

# /proc/stat: total and idle jiffies of the whole machine.
machine_jiffies() {
    local _cpu user nice system idle iowait irq softirq steal _rest
    read -r _cpu user nice system idle iowait irq softirq steal _rest </proc/stat
    echo "$((user + nice + system + idle + iowait + irq + softirq + steal)) $((idle + iowait))"
}

# iperf3 through CFG with STREAMS parallel streams; sets IPERF_BYTES to the bytes received.
# NAME (default iperfSTREAMS) names the figures; with a NAME, the fairness across the streams
# is recorded too.
run_iperf() {
    local cfg=$1 streams=$2 name=${3:-iperf$2} raw
    local fair=()
    [[ $name != "iperf$streams" ]] && fair=(--fairness)
    raw=$WORK/raw/r$BENCH_ROUND-$cfg-$name.json
    exited "${PIDS[iperf-server]}" && { log "iperf3 server had exited: restarting it"; stop iperf-server; start_iperf_server; }
    local rc=0
    timeout $((DURATION + 30)) iperf3 -c 127.0.0.1 -p "$(port_of "$cfg" iperf)" -t "$DURATION" \
        -P "$streams" -J --connect-timeout 5000 >"$raw" 2>&1 || rc=$?
    if (( rc != 0 )); then
        failed "iperf3 -P $streams exited $rc: $(head -c 300 "$raw")"
        # a run cut short may leave the server busy: start a fresh one for the next run
        stop iperf-server; start_iperf_server
        return 1
    fi
    IPERF_BYTES=$("${TOOL[@]}" iperf "$raw" --name "$name" "${fair[@]}") \
        || { failed "iperf3 -P $streams: bad output"; return 1; }
}

# wrk through CFG; NAME is close (a new connection per request) or keepalive.
run_wrk() {
    local cfg=$1 name=$2 raw rc=0
    raw=$WORK/raw/r$BENCH_ROUND-$cfg-wrk-$name.txt
    local hdr=()
    [[ $name == close ]] && hdr=(-H "Connection: close")
    local j0 j1 p0 p1 b0 b1 s0 s1
    j0=$(machine_jiffies)
    b0=$("${TOOL[@]}" cpu --pid "${PIDS[backend-http]}")
    [[ $cfg != direct ]] && p0=$("${TOOL[@]}" cpu --pid "${PIDS[proxy]}")
    [[ $cfg != direct ]] && s0=$("${TOOL[@]}" ctxsw --pid "${PIDS[proxy]}")
    timeout $((DURATION + 20)) wrk -t $WRK_THREADS -c "$WRK_CONNS" -d "${DURATION}s" --latency \
        "${hdr[@]}" "http://127.0.0.1:$(port_of "$cfg" http)/" >"$raw" 2>&1 || rc=$?
    j1=$(machine_jiffies)
    b1=$("${TOOL[@]}" cpu --pid "${PIDS[backend-http]}")
    [[ $cfg != direct ]] && p1=$("${TOOL[@]}" cpu --pid "${PIDS[proxy]}")
    [[ $cfg != direct ]] && s1=$("${TOOL[@]}" ctxsw --pid "${PIDS[proxy]}")
    if (( rc != 0 )); then failed "wrk $name exited $rc: $(tail -c 300 "$raw")"; return 1; fi
    "${TOOL[@]}" wrk "$raw" --name "$name" || { failed "wrk $name: bad output"; return 1; }
    # CPU split over the run, in % of one core (wall time from the machine's jiffies).
    local tot idle wall
    read -r tot idle <<<"$(awk -v a="$j0" -v b="$j1" 'BEGIN{split(a,x," ");split(b,y," ");print y[1]-x[1], y[2]-x[2]}')"
    wall=$(awk -v t="$tot" -v n="$(nproc)" -v hz="$(getconf CLK_TCK)" 'BEGIN{print t/n/hz}')
    "${TOOL[@]}" record --quiet "${name}_cpu_idle_pct" "$(awk -v i="$idle" -v t="$tot" -v n="$(nproc)" 'BEGIN{print 100*n*i/t}')"
    "${TOOL[@]}" record --quiet "${name}_cpu_backend_pct" "$(awk -v a="$b0" -v b="$b1" -v w="$wall" 'BEGIN{print 100*(b-a)/w}')"
    if [[ $cfg != direct ]]; then
        "${TOOL[@]}" record --quiet "${name}_cpu_proxy_pct" "$(awk -v a="$p0" -v b="$p1" -v w="$wall" 'BEGIN{print 100*(b-a)/w}')"
        # The proxy's context switches (all its threads, from /proc) per request wrk completed:
        # in all, voluntary (its own sleeps and hand-offs) and involuntary (preemption).
        local reqs v0 i0 v1 i1
        reqs=$(sed -n 's/^ *\([0-9][0-9]*\) requests in.*/\1/p' "$raw")
        read -r v0 i0 <<<"$s0"
        read -r v1 i1 <<<"$s1"
        if [[ -n $reqs && $reqs -gt 0 ]]; then
            "${TOOL[@]}" record "${name}_ctxsw_per_req" "$(awk -v a="$((v0 + i0))" -v b="$((v1 + i1))" -v n="$reqs" 'BEGIN{print (b-a)/n}')"
            "${TOOL[@]}" record "${name}_vcsw_per_req" "$(awk -v a="$v0" -v b="$v1" -v n="$reqs" 'BEGIN{print (b-a)/n}')"
            "${TOOL[@]}" record "${name}_ivcsw_per_req" "$(awk -v a="$i0" -v b="$i1" -v n="$reqs" 'BEGIN{print (b-a)/n}')"
        fi
    fi
}

# How long to wait for a quiet machine before a turn, with TURNS_LEFT turns to go (this one
# included): QUIET_WAIT, less if waiting that long would take the run past BUDGET.
quiet_wait() {
    local left=${1:-1} slack
    slack=$(( BUDGET - (EPOCHSECONDS - ${START%.*}) - left * per ))
    (( slack < 0 )) && slack=0
    echo $(( slack / left < QUIET_WAIT ? slack / left : QUIET_WAIT ))
}

measure() { # measure CFG [TURNS_LEFT]
    local cfg=$1
    export BENCH_CONFIG=$cfg
    log "round $BENCH_ROUND/$ROUNDS: $cfg$( [[ ${BENCH_ATTEMPT:-1} == 1 ]] || echo " (attempt $BENCH_ATTEMPT)")"
    "${TOOL[@]}" wait-quiet --idle "$QUIET_IDLE" --max-wait "$(quiet_wait "${2:-1}")"
    rm -f "$WORK/foreign.json"
    start foreign-sampler "${TOOL[@]}" foreign-sampler "$WORK/foreign.json"
    start_proxy "$cfg"
    # 4. memory, first, on the freshly started proxy (direct: the system memory the client
    # and the backend alone take)
    local pid=()
    [[ $cfg != direct ]] && pid=(--pid "${PIDS[proxy]}")
    timeout 120 "${TOOL[@]}" idle --port "$(port_of "$cfg" echo)" --conns "$IDLE_CONNS" \
        "${pid[@]}" --deadline 90 || failed "idle connections (memory) failed"
    # 1 and 5. bulk throughput, and the proxy's CPU over both iperf3 runs
    local c0 c1 bytes1 bytes4
    [[ $cfg != direct ]] && c0=$("${TOOL[@]}" cpu --pid "${PIDS[proxy]}")
    bytes1="" bytes4=""
    if run_iperf "$cfg" 1; then bytes1=$IPERF_BYTES; fi
    if run_iperf "$cfg" 4; then bytes4=$IPERF_BYTES; fi
    if [[ $cfg != direct && -n "$bytes1" && -n "$bytes4" ]]; then
        c1=$("${TOOL[@]}" cpu --pid "${PIDS[proxy]}")
        "${TOOL[@]}" record cpu_s_per_gb "$(awk -v a="$c0" -v b="$c1" -v n=$((bytes1 + bytes4)) 'BEGIN{print (b-a)/(n/1e9)}')"
    fi
    # 2. new connections per second; 3. kept-alive requests per second and latency
    run_wrk "$cfg" close || true
    run_wrk "$cfg" keepalive || true
    # 6. fairness: many bulk streams at once; flyproxy with fewer relay threads than streams
    if [[ $cfg == flyproxy-* ]]; then
        stop proxy
        if "$WORK/bin/flyproxy" simple --help 2>&1 | grep -q -- --max-threads; then
            start_proxy "$cfg" --max-threads $FAIR_THREADS
        else
            # A build from before --max-threads (REV=...): one thread per connection.
            start_proxy "$cfg"
        fi
    fi
    run_iperf "$cfg" $FAIR_STREAMS fair$FAIR_STREAMS || true
    if [[ $cfg != direct ]]; then
        kill -0 "${PIDS[proxy]}" 2>/dev/null || { show_log proxy; die "$cfg died during the run"; }
        stop proxy
        if [[ -s "$WORK/log/proxy.log" ]]; then
            cp "$WORK/log/proxy.log" "$WORK/log/r$BENCH_ROUND-$cfg.log"
        fi
    fi
    stop foreign-sampler
    if [[ -s "$WORK/foreign.json" ]]; then "${TOOL[@]}" foreign-record "$WORK/foreign.json"; fi
}

read -r -a CFG_LIST <<<"$CONFIGS"
n=${#CFG_LIST[@]}
# Seconds one turn (one configuration in one round) takes on a quiet machine.
per=$(( 3 * (DURATION + 1) + 2 * DURATION + 12 ))
log "$ROUNDS rounds x $n configs, runs of ${DURATION}s: about $(( (ROUNDS * n * per + 59) / 60 )) minutes on a quiet machine"
for (( r = 1; r <= ROUNDS; r++ )); do
    export BENCH_ROUND=$r
    # Interleaved: every config once per round; the order rotates so none is always first.
    for (( i = 0; i < n; i++ )); do
        measure "${CFG_LIST[$(( (i + r - 1) % n ))]}" $(( (ROUNDS - r) * n + n - i ))
    done
done
# Turns that other processes disturbed (more than REDO_OVER % of a core) are measured again,
# the worst first, at most REDO_MAX of them; the last attempt of a turn is the one reported.
for (( redo = 0; redo < REDO_MAX; redo++ )); do
    worst=$("${TOOL[@]}" worst-turn --data "$DATA" --over "$REDO_OVER")
    [[ -n "$worst" ]] || break
    if (( EPOCHSECONDS - ${START%.*} + per + QUIET_WAIT > BUDGET )); then
        log "not measuring disturbed turns again: that would take the run past BUDGET=${BUDGET}s"
        break
    fi
    read -r BENCH_ROUND cfg BENCH_ATTEMPT pct <<<"$worst"
    export BENCH_ROUND BENCH_ATTEMPT
    log "measuring round $BENCH_ROUND of $cfg again: other processes used ${pct}% of a core meanwhile"
    measure "$cfg"
done
export BENCH_ATTEMPT=1

# ---------------------------------------------------------------- report

elapsed=$(awk -v a="$START" -v b="$EPOCHREALTIME" 'BEGIN{s=b-a; printf "%dm%02ds", s/60, s%60}')
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
{
    printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
    printf 'rounds\t%s\n' "$ROUNDS"
    printf 'quick\t%s\n' "$QUICK"
    printf 'nproc\t%s\n' "$(nproc)"
    printf 'kernel\t%s\n' "$(uname -r)"
    printf 'elapsed\t%s\n' "$elapsed"
    printf 'backend_workers\t%s\n' "$BACKEND_WORKERS"
    printf 'quiet_wait\t%s\n' "$QUIET_WAIT"
    printf 'm:date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
    printf 'm:cores (nproc)\t%s\n' "$(nproc)"
    printf 'm:CPU\t%s\n' "${cpu_model:-?}"
    printf 'm:memory\t%s\n' "$(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    printf 'm:kernel (uname -r)\t%s\n' "$(uname -r)"
    printf 'm:OS\t%s\n' "$(. /etc/os-release && echo "$PRETTY_NAME")"
    printf 'm:flyproxy\t%s (%s)\n' "$("$WORK/bin/flyproxy" --version 2>&1 | head -1)" "$FLYPROXY_REV"
    printf 'm:HAProxy\t%s\n' "$(haproxy -v | head -1 | sed 's/ - https.*//')"
    printf 'm:nginx\t%s\n' "$(nginx -v 2>&1 | head -1)"
    printf 'm:iperf3\t%s\n' "$(iperf3 --version | head -1)"
    printf 'm:wrk\t%s\n' "$(wrk -v 2>&1 | head -1 | sed 's/ Copyright.*//')"
    printf 'm:rustc\t%s\n' "$(rustc --version 2>/dev/null || echo ?)"
    printf 's:rounds × run length\t%s × %ss (iperf3 -t and wrk -d); configs interleaved per round, order rotated\n' "$ROUNDS" "$DURATION"
    printf 's:network\tloopback inside a network namespace created for the run (unshare --net)\n'
    printf 's:threads / workers\tHAProxy nbthread 2; nginx worker_processes 2; flyproxy: one relay thread per core, accepting and relaying from one epoll set that holds the listeners and every connection (every thread with nothing to run waits on it, and one wakes per event; a connection that would block waits there without a thread), --max-threads at its default (= --max-connections) except in the %s-stream case (--max-threads %s)\n' "$FAIR_STREAMS" "$FAIR_THREADS"
    printf 's:logging\tnone per connection: flyproxy --log-level warn, HAProxy without any log line, nginx stream without access_log\n'
    printf 's:timeouts\tconnect 5s, idle 1h for all (flyproxy --connect-timeout 5s --idle-timeout 1h; HAProxy timeout connect/client/server; nginx proxy_connect_timeout/proxy_timeout)\n'
    printf 's:connection bound\t%s client connections for all (flyproxy --max-connections, HAProxy maxconn, nginx worker_connections %s per worker counting both sides)\n' "$MAXCONN" "$((2 * MAXCONN))"
    printf 's:HAProxy splice\t"HAProxy splice" adds option splice-auto; "HAProxy" has no splice option\n'
    printf 's:iperf3\tserver iperf3 -s as the backend; client iperf3 -c 127.0.0.1 -p PORT -t %s [-P 4]; Gbit/s received by the server\n' "$DURATION"
    printf 's:wrk\twrk -t %s -c %s -d %ss --latency [-H "Connection: close"] against nginx (%s workers, return 200 "ok", no log, keepalive_requests 1000000)\n' "$WRK_THREADS" "$WRK_CONNS" "$DURATION" "$BACKEND_WORKERS"
    printf 's:memory\t%s connections opened one by one through the proxy to the echo backend (target/release/examples/echo), one 5-byte message echoed on each, then held idle; RSS = VmRSS summed over the proxy'"'"'s processes, sampled 1 s later (max of 3 samples); per connection = (RSS with - RSS before) / %s, in KiB; system memory per connection = drop of MemAvailable over the same span / %s (client, backend and proxy, kernel included); threads = the proxy'"'"'s, summed over its processes, with the connections held\n' "$IDLE_CONNS" "$IDLE_CONNS" "$IDLE_CONNS"
    printf 's:fairness\tiperf3 -P %s through each proxy (flyproxy restarted with --max-threads %s); the slowest stream'"'"'s rate over the mean of all, as the iperf3 server received them\n' "$FAIR_STREAMS" "$FAIR_THREADS"
    printf 's:CPU per GB\tutime+stime of all the proxy'"'"'s processes over both iperf3 runs, divided by the GB (10^9 bytes) the iperf3 server received\n'
    printf 's:fd limit\t%s (soft and hard) per process\n' "$(ulimit -Hn)"
    printf 's:niceness\t%s\n' "$(nice)"
} >"$META"

"${TOOL[@]}" report --data "$DATA" --meta "$META" --failures "$FAILURES" --out "$OUT"
log "done in $elapsed: $OUT.md $OUT.svg"
if [[ -s "$FAILURES" ]]; then
    log "some measurements failed:"; cat "$FAILURES" >&2
    exit 1
fi
