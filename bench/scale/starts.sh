#!/usr/bin/env bash
# Interleaved starts of flyproxy binaries on one config directory of SCALE_APPS generated apps
# (as `make scale` generates them), to compare start times with less noise than one `make scale`
# run: the files are written once, before the first start (a start right after writing them
# competes with the kernel writing them back), then each binary starts in turn, RUNS rounds.
# Root; each start in a network namespace of its own, with the options and the timing of `make
# scale`'s start step (scale.Proxy, scale.first_connection). Per start it prints the seconds
# from spawn to the directory read (`config directory` line), to the `started` line and to the
# first line echoed through app 0, and the process's CPU then.
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
    source "$SCALE_DIR/netns.sh"
    "$echo_bin" 127.0.0.1:7001 127.0.0.1:7002 2>/dev/null &
    echo_pid=$!
    trap 'kill "$echo_pid" 2>/dev/null' EXIT
    # The proxy as `make scale` starts it, timed as its start step is (scale.first_connection).
    BIN=$bin CFG=$cfg MODE=$MODE python3 - <<'PY'
import datetime, os, sys, time, types
sys.path.insert(0, os.environ["SCALE_DIR"])
import scale
scale.BIN = os.environ["BIN"]
t0 = time.time()
proxy = scale.Proxy(os.environ["MODE"], types.SimpleNamespace(path=os.environ["CFG"]), "start")
try:
    first = scale.first_connection(proxy, ("127.16.0.0", 443), 600)
    st = open(f"/proc/{proxy.pid}/stat").read().rsplit(")", 1)[1].split()
    cpu = (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
    def at(word):
        for line in proxy.lines():
            if word in line:
                ts = datetime.datetime.strptime(line.split()[0], "%Y-%m-%dT%H:%M:%S.%fZ")
                return ts.replace(tzinfo=datetime.timezone.utc).timestamp() - t0
        return float("nan")
    print(f"first echo {first:.3f} s  directory read {at('config directory'):.3f} s  "
          f"started {at(' started '):.3f} s  CPU {cpu:.2f} s")
finally:
    proxy.stop()
PY
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
