#!/usr/bin/env python3
"""A short A/B of the wrk figures only (new connections/s and kept-alive requests/s), for
trying a change to the relay against main and HAProxy's best configuration without the whole
`make bench` (memory, iperf3, fairness). See bench/README.md, "Where the time goes".

    bench/ab.py [--rounds 3] [--duration 5] [--conns 50] LABEL=KIND[:BINARY] ...

KIND is `simple` or `bpf` (flyproxy, BINARY its path), `haproxy` or `haproxy-splice` (no
BINARY; the ratios are to the first configuration whose label starts with `haproxy`). Example, a
variant against the build of main and HAProxy:

    bench/ab.py main-s=simple:/tmp/ab/main main-b=bpf:/tmp/ab/main \
                var-s=simple:/tmp/ab/var var-b=bpf:/tmp/ab/var haproxy=haproxy

Run as root: it re-executes itself in a new network namespace (as bench/run.sh does), starts
the nginx backend (2 workers, bench/conf/nginx-http-backend.conf.in), then for every round runs
every configuration in turn (the order rotated each round), each proxy started fresh for its
turn: `wrk -t2 -cCONNS -dDURATION --latency` with `Connection: close`, then kept alive (and,
with `--modes`, iperf3 -P 1 or 4 through the proxy to an iperf3 server: Gbit/s). Per wrk run
it prints requests/s, p99, the proxy's CPU per request (utime+stime of every thread, /proc), its
voluntary and involuntary context switches per request, the machine's idle CPU (/proc/stat), and
for flyproxy how the CPU split over its busiest two threads; then the medians and each round's
ratio to HAProxy's run of the same round. Raw records go to --out (JSON lines).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tool  # noqa: E402  (bench/tool.py: /proc accounting, readiness, wrk parsing)

BENCH = os.path.dirname(os.path.abspath(__file__))
HTTP_BACKEND = 8080
BPF_PORT = 8000
MAXCONN = 9500
SYSCALLS = ["epoll_ctl", "epoll_wait", "recvfrom", "sendto", "read", "write", "accept4", "close",
            "shutdown", "getsockname", "getpeername", "getsockopt", "setsockopt", "socket",
            "connect", "futex", "splice", "pipe2", "fcntl", "ioctl"]


def fill(template, out, **fields):
    with open(template) as f:
        text = f.read()
    for k, v in fields.items():
        text = text.replace(f"@{k}@", str(v))
    if re.search(r"@[A-Z_]+@", text):
        sys.exit(f"{out}: unfilled field {re.search(r'@[A-Z_]+@', text).group(0)}")
    with open(out, "w") as f:
        f.write(text)


def machine_jiffies():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v), v[3] + v[4]


def thread_ticks(pid):
    """{thread name + tid: utime+stime ticks} of every live thread of pid."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                s = f.read()
        except OSError:
            continue
        name = s[s.index("(") + 1:s.rindex(")")]
        fields = s[s.rindex(")") + 2:].split()
        out[f"{name}/{t}"] = int(fields[11]) + int(fields[12])
    return out


class Config:
    def __init__(self, spec, index, work):
        label, _, rest = spec.partition("=")
        kind, _, binary = rest.partition(":")
        if kind not in ("simple", "bpf", "haproxy", "haproxy-splice") or not label:
            sys.exit(f"bad config {spec!r}: LABEL=simple:BIN, LABEL=bpf:BIN, LABEL=haproxy or "
                     "LABEL=haproxy-splice")
        if not kind.startswith("haproxy") and not os.access(binary, os.X_OK):
            sys.exit(f"{spec}: {binary!r} is not an executable")
        self.label, self.kind, self.work = label, kind, work
        base = 20000 + 100 * index
        self.port = base + 2
        if kind.startswith("haproxy"):
            self.conf = f"{work}/{label}.cfg"
            fill(f"{BENCH}/conf/haproxy.cfg.in", self.conf, IPERF_PORT=base + 1,
                 HTTP_PORT=base + 2, ECHO_PORT=base + 3, IPERF_BACKEND=5201,
                 HTTP_BACKEND=HTTP_BACKEND, ECHO_BACKEND=7000, MAXCONN=MAXCONN,
                 MAXPIPES=400,
                 SPLICE="option splice-auto" if kind == "haproxy-splice" else "# no splice")
        else:
            # A private copy: a rebuild during the run must not swap the binary.
            self.binary = f"{work}/{label}.bin"
            shutil.copy(binary, self.binary)
            self.conf = f"{work}/{label}.json"
            fill(f"{BENCH}/conf/flyproxy.json.in", self.conf, IPERF_PORT=base + 1,
                 HTTP_PORT=base + 2, ECHO_PORT=base + 3, IPERF_BACKEND=5201,
                 HTTP_BACKEND=HTTP_BACKEND, ECHO_BACKEND=7000)

    def start(self):
        log = open(f"{self.work}/{self.label}.log", "a")
        if self.kind.startswith("haproxy"):
            cmd = ["haproxy", "-db", "-f", self.conf]
        else:
            cmd = [self.binary, self.kind, "-c", self.conf, "--log-level", "warn",
                   "--max-connections", str(MAXCONN), "--connect-timeout", "5s",
                   "--idle-timeout", "1h", "--drain-timeout", "1s"]
            if self.kind == "bpf":
                cmd[2:2] = ["-p", str(BPF_PORT), "--bind", "127.0.0.1"]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"{self.label} exited at start: see {self.work}/{self.label}.log")
            try:
                r = tool.http_get(self.port, 1.0)
                if r.startswith(b"HTTP/1.1 200") and r.endswith(b"ok"):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"{self.label} does not relay after 10 s")
            time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_iperf(cfg, mode, a, rnd):
    """Bulk throughput, as bench/run.sh measures it: Gbit/s the iperf3 server received."""
    pid = cfg.proc.pid
    c0 = tool.cpu_seconds(pid)
    v0, _ = tool.context_switches(pid)
    perf = count_syscalls(pid, a) if cfg.kind != "haproxy-splice" else None
    streams = mode[len("iperf"):]
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(cfg.port - 1), "-t",
                          str(a.duration), "-P", streams, "-J", "--connect-timeout", "5000"],
                         capture_output=True, text=True, timeout=a.duration + 30).stdout
    c1 = tool.cpu_seconds(pid)
    v1, _ = tool.context_switches(pid)
    end = json.loads(out)["end"]["sum_received"]
    gb = end["bytes"] / 1e9
    rec = {"round": rnd, "config": cfg.label, "mode": mode, "gbps": end["bits_per_second"] / 1e9,
           "cpu_s_per_gb": (c1 - c0) / gb, "vcsw_per_gb": (v1 - v0) / gb}
    if perf:
        rec["syscalls_per_gb"] = syscalls_counted(perf, gb)
    return rec


def count_syscalls(pid, a):
    """With --syscalls, count the system calls of `pid` by name for the run's duration."""
    if not a.syscalls:
        return None
    # Counting only (no sampling).
    events = ",".join(f"syscalls:sys_enter_{c}" for c in SYSCALLS)
    return subprocess.Popen(["perf", "stat", "-x", ",", "-e", events, "-p", str(pid), "--",
                             "sleep", str(a.duration)], stderr=subprocess.PIPE, text=True)


def syscalls_counted(perf, per):
    """What `count_syscalls` counted, by name, per `per` (requests, or GB)."""
    _, err = perf.communicate(timeout=30)
    calls = {}
    for line in err.splitlines():
        f = line.split(",")
        if len(f) > 2 and f[0].replace(".", "").isdigit() and "sys_enter_" in f[2]:
            calls[f[2].split("sys_enter_")[1]] = round(float(f[0]) / max(per, 1e-9), 2)
    return {k: v for k, v in calls.items() if v}


def run_wrk(cfg, mode, a, rnd):
    if mode.startswith("iperf"):
        return run_iperf(cfg, mode, a, rnd)
    pid = cfg.proc.pid
    j0, i0 = machine_jiffies()
    c0 = tool.cpu_seconds(pid)
    v0, n0 = tool.context_switches(pid)
    t0 = thread_ticks(pid)
    perf = count_syscalls(pid, a) if cfg.kind != "haproxy-splice" else None
    cmd = ["wrk", "-t", "2", "-c", str(a.conns), "-d", f"{a.duration}s", "--latency"]
    if mode == "close":
        cmd += ["-H", "Connection: close"]
    out = subprocess.run(cmd + [f"http://127.0.0.1:{cfg.port}/"], capture_output=True,
                         text=True, timeout=a.duration + 20).stdout
    j1, i1 = machine_jiffies()
    c1 = tool.cpu_seconds(pid)
    v1, n1 = tool.context_switches(pid)
    t1 = thread_ticks(pid)
    m = re.search(r"(\d+) requests in", out)
    reqs = int(m.group(1)) if m else 0
    rps = float(re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M).group(1))
    p99 = tool.to_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    errs = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    ncpu = os.cpu_count()
    wall = (j1 - j0) / ncpu / os.sysconf("SC_CLK_TCK")
    busiest = sorted((t1[k] - t0.get(k, 0) for k in t1), reverse=True)[:2]
    hz = os.sysconf("SC_CLK_TCK")
    rec = {
        "round": rnd, "config": cfg.label, "mode": mode, "rps": rps, "p99_ms": p99,
        "errors": errs, "cpu_us_per_req": 1e6 * (c1 - c0) / max(reqs, 1),
        "proxy_cpu_pct": 100 * (c1 - c0) / wall,
        "vcsw_per_req": (v1 - v0) / max(reqs, 1), "ivcsw_per_req": (n1 - n0) / max(reqs, 1),
        "idle_pct": 100 * ncpu * (i1 - i0) / max(j1 - j0, 1),
        "top2_thread_pct": [round(100 * b / hz / wall) for b in busiest],
    }
    if perf:
        rec["syscalls_per_req"] = syscalls_counted(perf, reqs)
    return rec


def fmt(r):
    if "gbps" in r:
        return (f"r{r['round']} {r['config']:>10} {r['mode']:>9}: {r['gbps']:6.2f} Gbit/s  "
                f"{r['cpu_s_per_gb']:.3f} CPU s/GB  vcsw {r['vcsw_per_gb']:.0f}/GB"
                + (f"\n    system calls per GB: {r['syscalls_per_gb']}"
                   if "syscalls_per_gb" in r else ""))
    return (f"r{r['round']} {r['config']:>10} {r['mode']:>9}: {r['rps']:9.0f} req/s  "
            f"p99 {r['p99_ms']:6.2f} ms  cpu {r['cpu_us_per_req']:5.1f} us/req "
            f"({r['proxy_cpu_pct']:3.0f}%, threads {r['top2_thread_pct']})  "
            f"vcsw {r['vcsw_per_req']:.3f} ivcsw {r['ivcsw_per_req']:.3f}  "
            f"idle {r['idle_pct']:4.1f}%" + (f"  ERRORS {r['errors']}" if r["errors"] else "")
            + (f"\n    system calls per request: {r['syscalls_per_req']}"
               if "syscalls_per_req" in r else ""))


def summary(recs, labels):
    print("\nmedians (and per round: ratio to the haproxy run of the same round)")
    ref = next((lbl for lbl in labels if lbl.startswith("haproxy")), None)
    for mode in ("iperf1", "iperf4"):
        for lbl in labels:
            rs = [r for r in recs if r["config"] == lbl and r["mode"] == mode]
            if rs:
                print(f"{mode:>9} {lbl:>10}: "
                      f"{statistics.median(r['gbps'] for r in rs):6.2f} Gbit/s  rounds: "
                      + ", ".join(f"{r['gbps']:.2f}" for r in rs))
    for mode in ("close", "keepalive"):
        for lbl in labels:
            rs = [r for r in recs if r["config"] == lbl and r["mode"] == mode]
            if not rs:
                continue
            med = {k: statistics.median(r[k] for r in rs)
                   for k in ("rps", "p99_ms", "cpu_us_per_req", "vcsw_per_req", "idle_pct")}
            line = (f"{mode:>9} {lbl:>10}: {med['rps']:9.0f} req/s  p99 {med['p99_ms']:6.2f}  "
                    f"cpu {med['cpu_us_per_req']:5.1f} us  vcsw {med['vcsw_per_req']:.3f}  "
                    f"idle {med['idle_pct']:4.1f}%")
            if ref and lbl != ref:
                ratios = []
                for r in rs:
                    h = [x for x in recs if x["config"] == ref and x["mode"] == mode
                         and x["round"] == r["round"]]
                    if h:
                        ratios.append(f"{r['rps'] / h[0]['rps']:.2f}x/p99 "
                                      f"{r['p99_ms'] / h[0]['p99_ms']:.2f}x")
                line += "  rounds: " + ", ".join(ratios)
            print(line)


def inside(a):
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    work = tempfile.mkdtemp(prefix="flyproxy-ab.")
    cfgs = [Config(s, i, work) for i, s in enumerate(a.configs)]
    fill(f"{BENCH}/conf/nginx-http-backend.conf.in", f"{work}/backend.conf",
         HTTP_BACKEND=HTTP_BACKEND, BACKEND_WORKERS=2, DIR=work)
    backend = subprocess.Popen(["nginx", "-e", f"{work}/error.log", "-p", work, "-c",
                                f"{work}/backend.conf"])
    iperf = subprocess.Popen(["iperf3", "-s", "-p", "5201"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    recs = []
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                tool.http_get(HTTP_BACKEND, 1.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("backend nginx not answering")
                time.sleep(0.05)
        with open("/proc/loadavg") as f:
            print("load average at start:", f.read().strip(), flush=True)
        for rnd in range(1, a.rounds + 1):
            n = len(cfgs)
            for i in range(n):
                cfg = cfgs[(i + rnd - 1) % n]
                cfg.start()
                try:
                    for mode in a.modes.split(","):
                        rec = run_wrk(cfg, mode, a, rnd)
                        recs.append(rec)
                        print(fmt(rec), flush=True)
                finally:
                    cfg.stop()
        with open("/proc/loadavg") as f:
            print("load average at end:", f.read().strip())
        summary(recs, [c.label for c in cfgs])
        if a.out:
            with open(a.out, "a") as f:
                for r in recs:
                    f.write(json.dumps(r) + "\n")
    finally:
        for p in (backend, iperf):
            p.terminate()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--modes", default="close,keepalive",
                   help="any of close, keepalive (wrk), iperf1, iperf4 (iperf3 -P 1 or 4)")
    p.add_argument("--syscalls", action="store_true",
                   help="count the proxy's system calls per request (perf stat), by name")
    p.add_argument("--out", help="append every run's record to this file (JSON lines)")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("configs", nargs="+", metavar="LABEL=KIND[:BINARY]")
    a = p.parse_args()
    if a.inside:
        inside(a)
        return
    if os.geteuid() != 0:
        sys.exit("run as root (network namespace, eBPF)")
    if a.out:
        a.out = os.path.abspath(a.out)
    args = [sys.executable, os.path.abspath(__file__), "--inside", "--rounds", str(a.rounds),
            "--duration", str(a.duration), "--conns", str(a.conns), "--modes", a.modes]
    if a.syscalls:
        args.append("--syscalls")
    if a.out:
        args += ["--out", a.out]
    os.execvp("unshare", ["unshare", "--net", "--"] + args + a.configs)


if __name__ == "__main__":
    main()
