#!/usr/bin/env python3
"""The probe of `make scale` and `make scale-fleet`, in a process of its own: every 5 ms it
connects to HOST:PORT, sends a line, reads it back and closes, recording how long that took.
Stopped by SIGTERM, it prints a JSON summary on stdout.

A process of its own, not a thread of the bench's: a thread shares Python's interpreter lock
with the bench's own work (writing 200,000 files for a full rewrite, putting keys), and each of
its socket calls then waits for that lock too. The in-process probe's longest wait during a
full rewrite was 206 ms where this one's, in the same run, was 15 ms.

    probe.py HOST PORT [PID]

With PID (the proxy's), the summary also gives the relay threads' (`relay-N`) longest time
waiting for a CPU during one probe (their schedstat's run-queue wait): how much of a long wait
was the proxy's accepting threads kept off the CPU rather than the probe's own process.
"""

import json
import os
import signal
import socket
import sys
import time

EVERY = 0.005


def relay_tids(pid):
    tids = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                if f.read().startswith("relay-"):
                    tids.append(t)
        except OSError:
            pass
    return tids


def run_queue_ns(pid, tids):
    """Each thread's time spent waiting for a CPU so far (0 for a thread gone)."""
    out = []
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                out.append(int(f.read().split()[1]))
        except OSError:
            out.append(0)
    return out


def echo_once(addr, timeout=5.0):
    """Connect, send a line, read it back, close: the seconds it took. (Also the bench's own
    connect-and-echo: scale.py and fleet.py import it from here.)"""
    t0 = time.monotonic()
    fam = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(addr)
        s.sendall(b"x\n")
        got = b""
        while not got.endswith(b"\n"):
            b = s.recv(64)
            if not b:
                raise ConnectionError("closed before the echo")
            got += b
    return time.monotonic() - t0


def main():
    addr = (sys.argv[1], int(sys.argv[2]))
    pid = int(sys.argv[3]) if len(sys.argv) > 3 else None
    tids = relay_tids(pid) if pid else []
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    waits, failures, relay_wait = [], 0, 0
    nxt = time.monotonic()
    while not stopping:
        q0 = run_queue_ns(pid, tids)
        try:
            waits.append(echo_once(addr, 30))
        except OSError:
            failures += 1
        q1 = run_queue_ns(pid, tids)
        relay_wait = max([relay_wait] + [b - a for a, b in zip(q0, q1)])
        nxt += EVERY
        time.sleep(max(0.0, nxt - time.monotonic()))
        nxt = max(nxt, time.monotonic() - EVERY)
    w = sorted(waits)
    out = {
        "probes": len(w),
        "max_ms": round(w[-1] * 1e3, 2) if w else None,
        "p99_ms": round(w[int(len(w) * 0.99)] * 1e3, 2) if w else None,
        "over_10ms": sum(1 for x in w if x > 0.010),
        "failed": failures,
    }
    if pid:
        out["relay_run_queue_ms_max"] = round(relay_wait / 1e6, 2)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
