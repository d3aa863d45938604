#!/usr/bin/env bash
# Interleaved starts of flyproxy binaries on one config directory of SCALE_APPS generated apps
# (as `make scale` generates them), to compare start times with less noise than one `make scale`
# run: the files are written once, before the first start (a start right after writing them
# competes with the kernel writing them back), then each binary starts in turn, RUNS rounds.
# Root; each start in a network namespace of its own. Per start it prints the seconds from spawn
# to the directory read (`config directory` line), to the `started` line and to the first line
# echoed through app 0, and the process's CPU then.
#
#   bench/scale/starts.sh BINARY...                  # simple mode, 3 rounds, 200,000 apps
#   MODE=bpf RUNS=2 SCALE_APPS=20000 bench/scale/starts.sh /tmp/a/flyproxy /tmp/b/flyproxy
set -euo pipefail

SCALE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCALE_DIR/../.." && pwd)
MODE=${MODE:-simple}
RUNS=${RUNS:-3}

if [[ "${1:-}" == "--one" ]]; then
    # One start, inside a fresh network namespace: --one BINARY CONFIG_DIR ECHO
    bin=$2 cfg=$3 echo_bin=$4
    ip link set lo up
    ip -6 route add local fd00::/8 dev lo
    ulimit -n 1048576 2>/dev/null || ulimit -n 524288 2>/dev/null || true
    "$echo_bin" 127.0.0.1:7001 127.0.0.1:7002 2>/dev/null &
    echo_pid=$!
    args=("$MODE")
    [[ "$MODE" == bpf ]] && args+=(-p 8000)
    log=$(mktemp)
    t0=$(date +%s.%N)
    "$bin" "${args[@]}" -c "$cfg" --reload-interval 200ms --access-log off >"$log" 2>&1 &
    pid=$!
    T0=$t0 PID=$pid LOG=$log SCALE_DIR=$SCALE_DIR python3 - <<'PY'
import datetime, os, sys, time
sys.path.insert(0, os.environ["SCALE_DIR"])
from probe import echo_once
t0, pid, log = float(os.environ["T0"]), os.environ["PID"], os.environ["LOG"]
deadline = time.time() + 600
while True:
    try:
        echo_once(("127.16.0.0", 443), timeout=1.0)
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("nothing echoed within 600 s")
        time.sleep(0.005)
first = time.time() - t0
st = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
cpu = (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
def at(word):
    for line in open(log):
        if word in line:
            ts = datetime.datetime.strptime(line.split()[0], "%Y-%m-%dT%H:%M:%S.%fZ")
            return ts.replace(tzinfo=datetime.timezone.utc).timestamp() - t0
    return float("nan")
print(f"first echo {first:.3f} s  directory read {at('config directory'):.3f} s  "
      f"started {at(' started '):.3f} s  CPU {cpu:.2f} s")
PY
    kill -INT "$pid"
    wait "$pid" || true
    kill "$echo_pid"
    rm -f "$log"
    exit 0
fi

[[ $# -ge 1 ]] || { echo "usage: $0 BINARY... (see the head of this file)" >&2; exit 2; }
[[ "$(id -u)" -eq 0 ]] || { echo "$0: run as root (network namespaces, eBPF)" >&2; exit 1; }
for b in "$@"; do [[ -x "$b" ]] || { echo "$0: $b is not an executable" >&2; exit 1; }; done
echo_bin=${CARGO_TARGET_DIR:-$REPO/target}/release/examples/echo
[[ -x "$echo_bin" ]] || (cd "$REPO" && cargo build --release --example echo)
WORK=$(mktemp -d /tmp/flyproxy-starts.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export WORK SCALE_DIR
echo "writing ${SCALE_APPS:-200000} apps' files into $WORK/cfg/apps.d" >&2
mkdir -p "$WORK/cfg"
python3 - <<'PY'
import os, sys
sys.path.insert(0, os.environ["SCALE_DIR"])
import scale
scale.Config("dir", scale.make_apps(scale.APPS), os.path.join(os.environ["WORK"], "cfg"))
PY
sync
for r in $(seq "$RUNS"); do
    for b in "$@"; do
        printf '%s round %s, %s: ' "$MODE" "$r" "$b"
        unshare --net -- "$BASH" "$0" --one "$b" "$WORK/cfg/apps.d" "$echo_bin"
    done
done
