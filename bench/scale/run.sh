#!/usr/bin/env bash
# flyproxy at edge scale (issue 20): generated configs of SCALE_APPS apps, as one file and as a
# directory of per-app files, served by the release binary in both modes inside a network
# namespace of the run's own. See bench/README.md ("make scale"). Usage (as root; `make scale`
# runs it):
#
#   bench/scale/run.sh                          # SCALE_APPS=200000
#   SCALE_APPS=20000 bench/scale/run.sh         # a quick run
#   bench/scale/run.sh --fleet                  # the fleet scenario instead (`make scale-fleet`)
#
# Environment (all optional; defaults in bench/scale/scale.py and fleet.py):
#   SCALE_APPS=200000   apps in the generated configs
#   SCALE_BASE=1000     apps of the comparison run for the routing cost (N apps vs this many)
#   SCALE_MODES="simple bpf"  SCALE_FORMS="file dir"   what to run
#   SCALE_RELOADS=100   reloads before the second RSS figure
#   SCALE_CHANGES=10    one-app changes the apply CPU is averaged over
#   SCALE_CONNS=20000   new connections the routing cost is measured over
#   SCALE_OUT=bench/scale-results   path prefix of the results: .json and .md
#   SCALE_START_ONLY=1  the start figure alone (no base run, no later step; the report is
#                       printed, and written in the work directory unless SCALE_OUT is set)
#   SCALE_REWRITE_ONLY=1  the start, then the rewrite of every app alone (the probe's waits;
#                       reported as SCALE_START_ONLY's)
#   SCALE_BIN=PATH      measure this flyproxy binary instead of building the working tree's
#   NICE=-10            run everything at this niceness
#   KEEP=1              keep the work directory (configs, logs) after the run
set -euo pipefail

SCALE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCALE_DIR/../.." && pwd)
log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

if [[ "${1:-}" != "--inside" ]]; then
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null || die "the scale bench needs root (network namespace, eBPF)"
        exec sudo --preserve-env=SCALE_APPS,SCALE_BASE,SCALE_START_ONLY,SCALE_REWRITE_ONLY,SCALE_MODES,SCALE_FORMS,SCALE_RELOADS,SCALE_CHANGES,SCALE_CONNS,SCALE_OUT,SCALE_BIN,FLEET_APPS,FLEET_NODES,FLEET_MEMBERS,FLEET_LOADERS,FLEET_PUTS,FLEET_SECONDS,FLEET_PUT_TRIES,FLEET_OUTAGE,FLEET_REST,FLEET_OUT,NICE,KEEP,CARGO_TARGET_DIR,PATH "$0" "$@"
    fi
    for tool in ip unshare python3; do
        command -v "$tool" >/dev/null || die "$tool is not installed (iproute2, util-linux, python3)"
    done
    WORK=$(mktemp -d /tmp/flyproxy-scale.XXXXXX)
    export WORK
    mkdir -p "$WORK/bin"
    if [[ -n "${SCALE_BIN:-}" ]]; then
        [[ -x "$SCALE_BIN" ]] || die "SCALE_BIN=$SCALE_BIN is not an executable"
        cp "$SCALE_BIN" "$WORK/bin/flyproxy"
        sync_bin=$(dirname "$SCALE_BIN")/flyproxy-etcd-sync
        FLYPROXY_REV="$SCALE_BIN"
        TARGET=$(dirname "$(dirname "$SCALE_BIN")")
    else
        log "building flyproxy (release)"
        (cd "$REPO" && cargo build --release --bins --example echo) || die "cargo build --release failed"
        TARGET=${CARGO_TARGET_DIR:-$REPO/target}
        [[ "$TARGET" = /* ]] || TARGET=$REPO/$TARGET
        cp "$TARGET/release/flyproxy" "$WORK/bin/"
        sync_bin=$TARGET/release/flyproxy-etcd-sync
        FLYPROXY_REV=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo "?")
        dirty=$(git -C "$REPO" status --porcelain -- src Cargo.toml Cargo.lock build.rs 2>/dev/null | wc -l)
        [[ "$dirty" != 0 ]] && FLYPROXY_REV="$FLYPROXY_REV + uncommitted changes in $dirty files"
    fi
    # The echo example serves as the targets; built above (or taken beside SCALE_BIN's tree).
    echo_bin=$TARGET/release/examples/echo
    if [[ ! -x "$echo_bin" ]]; then
        (cd "$REPO" && cargo build --release --example echo) || die "cannot build the echo example"
        echo_bin=${CARGO_TARGET_DIR:-$REPO/target}/release/examples/echo
    fi
    cp "$echo_bin" "$WORK/bin/echo"
    [[ -x "$sync_bin" ]] && cp "$sync_bin" "$WORK/bin/flyproxy-etcd-sync"
    export FLYPROXY_REV
    log "work directory: $WORK"
    # Same PID, a new network namespace with only loopback: nothing binds or steers a port of
    # the host, and bpf mode's sk_lookup program is attached to the namespace only.
    if [[ -n "${NICE:-}" ]]; then
        exec nice -n "$NICE" unshare --net -- "$BASH" "$0" --inside "$@"
    fi
    exec unshare --net -- "$BASH" "$0" --inside "$@"
fi
shift

source "$SCALE_DIR/netns.sh"

status=0
if [[ "${1:-}" == "--fleet" ]]; then
    python3 "$SCALE_DIR/fleet.py" || status=$?
else
    python3 "$SCALE_DIR/scale.py" || status=$?
fi
if [[ "$status" == 0 && "${KEEP:-}" != 1 ]]; then
    rm -rf "$WORK"
else
    log "work directory kept: $WORK"
fi
exit "$status"
