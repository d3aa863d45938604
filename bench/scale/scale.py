#!/usr/bin/env python3
"""flyproxy at edge scale (issue 20), run by bench/scale/run.sh inside a network namespace of
its own (root; `make scale`). Generates configs like the issue's, runs the binary in $WORK/bin
in each mode on each form of config, and writes SCALE_OUT.json and SCALE_OUT.md.

The config: SCALE_APPS apps `app-NNNNNN`, each with its own IPv4 /32 (127.16.0.0 + i) and IPv6
/128 (fd00::1:0 + i) on 1-3 of ports 443/80/8080 (chosen by a seeded generator) and the same two
targets (echo servers on 127.0.0.1:7001 and :7002: a target is health-checked once however many
apps list it), plus one app `catchall` without Addresses on the three ports, so that simple mode
binds one wildcard listener per port instead of one socket per app address (the routing per
connection is the same: the longest prefix wins). Forms: `file`, one JSON file; `dir`, a
directory with one `{"Apps": [app]}` file per app (`DIR/<name>.json`).

Measured in each (mode, form), in this order, on one proxy process:
- start: from spawning the proxy to the first connection relayed (a line echoed through app 0);
- rss_start: VmRSS once settled (not grown for 2 s after the first connection), and per app;
- metrics: GET /metrics, its size and the proxy's CPU for it (and /metrics?app=NAME's);
- routing: the accepting threads' CPU per new connection (SCALE_CONNS connections, each to a
  random app's address and port, half over IPv6, a line echoed and closed): the relay threads
  (`relay-N`), which accept, route and relay each connection, and the main thread (the listener
  loop), from /proc/PID/task/TID/schedstat (ns precision) and stat;
- one_app: SCALE_CHANGES changes of one app (its targets' order swapped; dir: that app's file
  replaced by rename), each waited for in the log (`reload ok`): the CPU of the threads that
  apply it (the config plane and the listener loop, their schedstat: median and max), and the
  whole proxy's CPU (utime+stime from /proc/PID/stat) less what it uses idle over the same time
  (at 200,000 apps the idle rate, mostly health checks, is larger than a change); meanwhile a probe connects every 5 ms through an unchanged app
  (app 1) and echoes a line: its longest wait is the accept stall;
- full_rewrite: every app but the probe's changed at once (file rewritten; dir: every file
  replaced), the probe running from the first write until the proxy has been quiet (no reload
  line) for 2 s;
- rss_after: after SCALE_RELOADS reloads in all (one-app changes), settled VmRSS again.
Then, per mode, a SCALE_BASE-app (1,000) file config for the routing cost's ratio.

A step the binary cannot do (no directory mode in this binary: it exits at start) is reported as
"not supported by this binary" with its message, and the run goes on.
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

from probe import echo_once  # the probe's connect-and-echo, one for both

WORK = os.environ.get("WORK") or sys.exit("run through bench/scale/run.sh (WORK is not set)")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(WORK, "bin", "flyproxy")
ECHO = os.path.join(WORK, "bin", "echo")


def env_int(name, default):
    v = os.environ.get(name, "") or str(default)
    if not v.isdigit() or int(v) <= 0:
        sys.exit(f"{name} must be a whole number above 0, not {v!r}")
    return int(v)


APPS = env_int("SCALE_APPS", 200_000)
BASE = env_int("SCALE_BASE", 1000)
RELOADS = env_int("SCALE_RELOADS", 100)
CHANGES = env_int("SCALE_CHANGES", 10)
CONNS = env_int("SCALE_CONNS", 20_000)
MODES = os.environ.get("SCALE_MODES", "simple bpf").split()
FORMS = os.environ.get("SCALE_FORMS", "file dir").split()
# 1: the start figure alone (and RSS then): no base run, no later step (a quick start A/B),
# reported in the work directory unless SCALE_OUT says where (not over the full results).
START_ONLY = os.environ.get("SCALE_START_ONLY", "") == "1"
# 1: the start, then the rewrite of every app alone (a quick A/B of the probe's waits),
# reported like SCALE_START_ONLY.
REWRITE_ONLY = os.environ.get("SCALE_REWRITE_ONLY", "") == "1"
OUT = os.environ.get("SCALE_OUT") or (os.path.join(WORK, "scale-start") if START_ONLY or REWRITE_ONLY
                                      else os.path.join(REPO, "bench", "scale-results"))
for m in MODES:
    if m not in ("simple", "bpf"):
        sys.exit(f"SCALE_MODES: unknown mode {m!r} (simple, bpf)")
for f in FORMS:
    if f not in ("file", "dir"):
        sys.exit(f"SCALE_FORMS: unknown form {f!r} (file, dir)")
if APPS > 1 << 20:
    sys.exit("SCALE_APPS: at most 1048576 (127.16.0.0/12 holds the IPv4 addresses)")

TARGETS = ["127.0.0.1:7001", "127.0.0.1:7002"]
PORTS = [443, 80, 8080]
METRICS = ("127.0.0.1", 9089)
BPF_PORT = 8000
TICK = os.sysconf("SC_CLK_TCK")
# What a reload's outcome looks like in the log (`reload ok: ...`, `reload rejected: ...`).
RELOAD_LINE = re.compile(r"\breload (ok|rejected)\b")


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ the configs


def v4(i):
    n = (127 << 24) | (16 << 16) | i
    return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def v6(i):
    n = 0x10000 + i
    return f"fd00::{n >> 16:x}:{n & 0xFFFF:x}"


def make_apps(n):
    """The apps, as dicts, with each one's ports; seeded, so every run makes the same."""
    rng = random.Random(20)
    apps = []
    for i in range(n):
        ports = sorted(rng.sample(PORTS, rng.randint(1, 3)))
        apps.append({
            "Name": f"app-{i:06d}",
            "Ports": ports,
            "Addresses": [f"{v4(i)}/32", f"{v6(i)}/128"],
            "Targets": list(TARGETS),
        })
    return apps


CATCHALL = {"Name": "catchall", "Ports": PORTS, "Targets": list(TARGETS)}


def swapped(app):
    """`app` changed: its targets' order swapped (a change that keeps it serving)."""
    a = dict(app)
    a["Targets"] = list(reversed(app["Targets"]))
    return a


def write_atomically(path, text):
    # A dotfile in the same directory (ignored by the proxy's directory reading), then rename.
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


class Config:
    """A config on disk in one form, and the changes the bench makes to it."""

    def __init__(self, form, apps, root):
        self.form, self.apps = form, list(apps)
        if form == "file":
            self.path = os.path.join(root, "config.json")
            self.write_all()
        else:
            self.path = os.path.join(root, "apps.d")
            os.makedirs(self.path, exist_ok=True)
            self.write_app(CATCHALL)
            for a in self.apps:
                self.write_app(a)

    def text(self):
        return json.dumps({"Apps": self.apps + [CATCHALL]})

    def write_all(self):
        write_atomically(self.path, self.text())

    def write_app(self, app):
        write_atomically(os.path.join(self.path, app["Name"] + ".json"), json.dumps({"Apps": [app]}))

    def change(self, i):
        """Change app i alone."""
        self.apps[i] = swapped(self.apps[i])
        if self.form == "file":
            self.write_all()
        else:
            self.write_app(self.apps[i])

    def change_all_but(self, keep):
        self.apps = [a if i == keep else swapped(a) for i, a in enumerate(self.apps)]
        if self.form == "file":
            self.write_all()
        else:
            for i, a in enumerate(self.apps):
                if i != keep:
                    self.write_app(a)


# ------------------------------------------------------------------------------ /proc


def proc_cpu(pid):
    """utime+stime of the whole process (exited threads included), seconds; 1/TICK steps."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def sched_ns(pid, tid):
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def proc_sched(pid):
    """CPU time of the process's live threads, seconds (ns precision; a thread that exited
    since is not in it: `proc_cpu` is)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += sched_ns(pid, tid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e9


def thread_cpu(pid, tid):
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def settled_rss_kib(pid, quiet_s=2.0, deadline_s=60.0):
    """VmRSS once it has stopped growing for quiet_s (or at deadline_s): after the first
    connection the health checker still builds its lists on its own thread for a few seconds
    (~110 B/app at 200,000 apps), so a reading taken at once catches it part-way and varies with
    timing; the settled figure is what an operator sees in steady state."""
    t0 = time.monotonic()
    peak = rss_kib(pid)
    grew = t0
    while True:
        time.sleep(0.2)
        now = time.monotonic()
        r = rss_kib(pid)
        if r > peak + 64:  # a few pages of jitter is not growth
            peak, grew = r, now
        if now - grew >= quiet_s or now - t0 >= deadline_s:
            return r


# ------------------------------------------------------------------------------ processes


class Unsupported(Exception):
    """The binary cannot do this (it refused the config form)."""


class Proxy:
    def __init__(self, mode, cfg, label):
        self.mode = mode
        self.log_path = os.path.join(WORK, f"{label}.log")
        args = [BIN, mode]
        if mode == "bpf":
            args += ["-p", str(BPF_PORT)]
        # No access log: the probes' and the routing step's 10,000s of `conn` lines would cost
        # the proxy's log thread and this script's reading of the log, neither of them measured.
        args += ["-c", cfg.path, "--metrics", f"{METRICS[0]}:{METRICS[1]}",
                 "--reload-interval", "200ms", "--drain-timeout", "1s", "--access-log", "off"]
        self.logf = open(self.log_path, "wb")
        self.seen, self.read_to = [], 0
        self.t_spawn = time.monotonic()
        self.p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.logf, stderr=self.logf)
        self.pid = self.p.pid

    def lines(self):
        """The log's whole lines so far (read on from where the last call stopped)."""
        with open(self.log_path, "rb") as f:
            f.seek(self.read_to)
            new = f.read()
        end = new.rfind(b"\n") + 1
        self.read_to += end
        self.seen += new[:end].decode("utf-8", "replace").splitlines()
        return self.seen

    def mark(self):
        return len(self.lines())

    def wait_line(self, pred, since, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()
            for line in lines[since:]:
                if pred(line):
                    return line, len(lines)
            # The last lines that are not the probes' `conn` lines, for the error.
            said = " / ".join([x for x in lines if " conn " not in x][-3:])[:600]
            if self.p.poll() is not None:
                raise RuntimeError(f"the proxy exited ({self.p.returncode}) waiting for {what}; "
                                   f"its last lines: {said}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} within {timeout:.0f} s; its last lines: {said}")
            time.sleep(0.01)

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.logf.close()


def first_connection(proxy, addr, timeout):
    """Seconds from spawning the proxy to the first line echoed through it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            echo_once(addr, timeout=1.0)
            return time.monotonic() - proxy.t_spawn
        except OSError:
            pass
        if proxy.p.poll() is not None:
            # What it said, without the closing `exiting with status 1`.
            said = [x.split(" ", 1)[-1] for x in proxy.lines() if "exiting with status" not in x]
            raise Unsupported(f"the proxy exited ({proxy.p.returncode}) at start: "
                              + (" / ".join(said[-3:])[:400] if said else "no output"))
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing relayed within {timeout:.0f} s of the start")
        time.sleep(0.005)


class Probe:
    """Connects every 5 ms through one app and echoes a line, from a process of its own
    (probe.py: a thread here would share the interpreter lock with the writing of the
    config, and wait on it); `stop` gives its longest wait and how many waited over 10 ms.
    `netns`: a pid whose network namespace it probes from; `pid`: the proxy's, for its
    relay threads' run-queue wait."""

    def __init__(self, addr, pid=None, netns=None):
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe.py"),
               addr[0], str(addr[1])] + ([str(pid)] if pid else [])
        if netns:
            cmd = ["nsenter", f"--net=/proc/{netns}/ns/net"] + cmd
        self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        out, _ = self.p.communicate(timeout=60)
        return json.loads(out)


def http_get(path, timeout=120):
    """(status, body size, Content-Length) of GET path on the metrics endpoint."""
    with socket.create_connection(METRICS, timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            b = s.recv(65536)
            if not b:
                break
            buf += b
        head, _, body = buf.partition(b"\r\n\r\n")
        size = len(body)
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            size += len(b)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    clen = next((int(line.split(":", 1)[1]) for line in lines[1:]
                 if line.lower().startswith("content-length:")), None)
    return status, size, clen


# ------------------------------------------------------------------------------ the steps


def idle_rates(proxy, seconds=2.0):
    """The proxy's CPU use at rest (health checks, the reload tick), per second."""
    c0, s0, t0 = proc_cpu(proxy.pid), proc_sched(proxy.pid), time.monotonic()
    time.sleep(seconds)
    dt = time.monotonic() - t0
    return (proc_cpu(proxy.pid) - c0) / dt, (proc_sched(proxy.pid) - s0) / dt


def metrics_step(proxy, app_name):
    c0, s0, t0 = proc_cpu(proxy.pid), proc_sched(proxy.pid), time.monotonic()
    status, size, clen = http_get("/metrics")
    wall = time.monotonic() - t0
    out = {
        "status": status, "bytes": clen if clen is not None else size, "read_bytes": size,
        "cpu_s": round(proc_cpu(proxy.pid) - c0, 3),
        "cpu_sched_s": round(proc_sched(proxy.pid) - s0, 4), "wall_s": round(wall, 3),
    }
    st, size1, _ = http_get(f"/metrics?app={app_name}")
    out["one_app"] = {"status": st, "bytes": size1}
    return out


def tids_where(pid, wanted):
    """The main thread of `pid` (the listener loop) and its threads whose name `wanted` takes."""
    tids = [str(pid)]
    for tid in os.listdir(f"/proc/{pid}/task"):
        if tid == str(pid):
            continue
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if wanted(f.read().strip()):
                    tids.append(tid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return tids


def accepting_tids(pid):
    """The threads a new connection runs on: the relay threads (`relay-N`: they accept, route
    and relay) and the main thread (the listener loop)."""
    return tids_where(pid, lambda name: name.startswith("relay-"))


def routing_step(proxy, n_apps, apps, conns):
    """The accepting threads' CPU per new connection over `conns` connections to random apps."""
    rng = random.Random(7)
    addrs = []
    for _ in range(conns):
        i = rng.randrange(n_apps)
        port = rng.choice(apps[i]["Ports"])
        addrs.append((v6(i) if rng.random() < 0.5 else v4(i), port))
    pid = proxy.pid
    tids = accepting_tids(pid)
    l0 = sum(sched_ns(pid, t) for t in tids)
    lt0, t0 = sum(thread_cpu(pid, t) for t in tids), time.monotonic()
    failed = 0
    for a in addrs:
        try:
            echo_once(a, timeout=10)
        except OSError:
            failed += 1
    wall = time.monotonic() - t0
    loop_ns = sum(sched_ns(pid, t) for t in tids) - l0
    loop_ticks = sum(thread_cpu(pid, t) for t in tids) - lt0
    return {
        "conns": conns, "failed": failed, "conns_per_s": round(conns / wall),
        "threads": len(tids),
        "loop_us_per_conn": round(loop_ns / 1e3 / conns, 2),
        "loop_us_per_conn_stat": round(loop_ticks * 1e6 / conns, 2),
    }


# The threads that apply a change: the config plane reads the file and builds the change, the
# listener loop (the main thread) swaps it in and binds or unbinds. Their schedstat around one
# change is that change's cost without subtracting an idle rate (which at 200,000 apps is larger
# than the change, and noisy: the health checker's rounds). The health checker's share of a
# change (taking the changed targets) is not in it: its periodic checks cannot be told apart.
APPLY_THREADS = ("config-plane",)


def change_step(proxy, cfg, idle, i, timeout):
    """Change app i alone, wait for its reload; the CPU it took beyond idle, and the applying
    threads' own CPU."""
    mark = proxy.mark()
    tids = tids_where(proxy.pid, lambda name: name in APPLY_THREADS)
    a0 = sum(sched_ns(proxy.pid, t) for t in tids)
    c0, s0, t0 = proc_cpu(proxy.pid), proc_sched(proxy.pid), time.monotonic()
    cfg.change(i)
    line, _ = proxy.wait_line(RELOAD_LINE.search, mark, timeout, "reload line after a one-app change")
    dt = time.monotonic() - t0
    cpu = proc_cpu(proxy.pid) - c0 - idle[0] * dt
    sched = proc_sched(proxy.pid) - s0 - idle[1] * dt
    apply_s = (sum(sched_ns(proxy.pid, t) for t in tids) - a0) / 1e9
    if "reload ok" not in line:
        raise RuntimeError(f"a one-app change was not applied: {line}")
    return cpu, sched, dt, apply_s


def full_rewrite_step(proxy, cfg, keep, timeout):
    probe = Probe(probe_addr(cfg.apps, keep), proxy.pid)
    mark = proxy.mark()
    c0, t0 = proc_cpu(proxy.pid), time.monotonic()
    cfg.change_all_but(keep)
    wrote = time.monotonic() - t0
    # The change may be applied in one reload or several (a directory read as it is written):
    # wait for the first, then until no reload line came for 2 s.
    _, seen = proxy.wait_line(RELOAD_LINE.search, mark, timeout, "reload line after the full rewrite")
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 2.0:
        time.sleep(0.1)
        n = len([x for x in proxy.lines()[seen:] if RELOAD_LINE.search(x)])
        if n:
            seen, quiet_since = proxy.mark(), time.monotonic()
    lines = [x for x in proxy.lines()[mark:] if RELOAD_LINE.search(x)]
    stalls = probe.stop()
    return {
        "write_s": round(wrote, 2), "reloads": len(lines),
        "rejected": sum(1 for x in lines if "rejected" in x),
        "cpu_s": round(proc_cpu(proxy.pid) - c0, 2), "probe": stalls,
    }


def probe_addr(apps, i):
    return (v4(i), apps[i]["Ports"][0])


def run_one(mode, form, apps, label, full):
    """One proxy process: every step in order. `full`: all steps; else start and routing."""
    n = len(apps)
    root = os.path.join(WORK, label)
    os.makedirs(root, exist_ok=True)
    res = {"mode": mode, "form": form, "apps": n}
    t0 = time.monotonic()
    cfg = Config(form, apps, root)
    res["write_config_s"] = round(time.monotonic() - t0, 1)
    log(f"{label}: config written ({res['write_config_s']} s); starting the proxy")
    timeout = 120 + n / 500
    proxy = Proxy(mode, cfg, label)
    try:
        try:
            res["start_s"] = round(first_connection(proxy, probe_addr(apps, 0), timeout), 3)
        except Unsupported as e:
            res["supported"] = False
            res["error"] = f"not supported by this binary: {e}"
            log(f"{label}: {res['error']}")
            return res
        res["supported"] = True
        res["rss_start_kib"] = settled_rss_kib(proxy.pid)
        res["rss_start_per_app_b"] = round(res["rss_start_kib"] * 1024 / n)
        log(f"{label}: first connection after {res['start_s']} s, RSS {res['rss_start_kib']} KiB")
        if START_ONLY:
            return res
        if REWRITE_ONLY:
            res["full_rewrite"] = full_rewrite_step(proxy, cfg, 1, timeout)
            log(f"{label}: full rewrite probe max {res['full_rewrite']['probe']['max_ms']} ms, "
                f"relay threads' longest wait for a core {res['full_rewrite']['probe'].get('relay_run_queue_ms_max')} ms")
            return res
        idle = idle_rates(proxy)
        res["idle_cpu_pct"] = round(idle[0] * 100, 2)
        if full:
            res["metrics"] = metrics_step(proxy, apps[1]["Name"])
            log(f"{label}: /metrics {res['metrics']['bytes']} bytes, {res['metrics']['cpu_s']} CPU-s")
        res["routing"] = routing_step(proxy, n, apps, CONNS)
        log(f"{label}: routing {res['routing']['loop_us_per_conn']} us accepting threads' CPU per connection")
        if not full:
            return res
        probe = Probe(probe_addr(apps, 1), proxy.pid)
        cpus, scheds, waits, applies = [], [], [], []
        for k in range(CHANGES):
            c, s, dt, a = change_step(proxy, cfg, idle, n - 1, timeout)
            cpus.append(c), scheds.append(s), waits.append(dt), applies.append(a)
        applies.sort()
        res["one_app"] = {
            "changes": CHANGES,
            "apply_ms_median": round(applies[len(applies) // 2] * 1e3, 3),
            "apply_ms_max": round(applies[-1] * 1e3, 3),
            "cpu_ms": round(sum(cpus) / CHANGES * 1e3, 3),
            "cpu_sched_ms": round(sum(scheds) / CHANGES * 1e3, 3),
            "applied_after_s": round(sum(waits) / CHANGES, 3),
            "probe": probe.stop(),
        }
        log(f"{label}: one app's change {res['one_app']['apply_ms_median']} ms CPU on the plane and "
            f"loop threads (max {res['one_app']['apply_ms_max']}), {res['one_app']['cpu_ms']} ms of the process less idle, "
            f"probe max {res['one_app']['probe']['max_ms']} ms")
        res["full_rewrite"] = full_rewrite_step(proxy, cfg, 1, timeout)
        log(f"{label}: full rewrite probe max {res['full_rewrite']['probe']['max_ms']} ms")
        done = CHANGES + 1
        t_r = time.monotonic()
        while done < RELOADS:
            change_step(proxy, cfg, idle, (done * 7919) % n, timeout)
            done += 1
        res["reloads"] = done
        res["reloads_s"] = round(time.monotonic() - t_r, 1)
        res["rss_after_kib"] = settled_rss_kib(proxy.pid)
        res["rss_after_per_app_b"] = round(res["rss_after_kib"] * 1024 / n)
        log(f"{label}: RSS after {done} reloads {res['rss_after_kib']} KiB")
        return res
    except Exception as e:  # a failed step is reported, and the other runs go on
        res["error"] = f"{type(e).__name__}: {e}"
        log(f"{label}: FAILED: {res['error']}")
        return res
    finally:
        proxy.stop()


# ------------------------------------------------------------------------------ the report


def fmt(v, unit=""):
    return "n/a" if v is None else f"{v}{unit}"


def probe_cell(p):
    """A probe's longest wait, and how many of its connections waited over 10 ms."""
    if not p:
        return "n/a"
    return f"{fmt(p.get('max_ms'), ' ms')} ({p.get('over_10ms')} of {p.get('probes')} over 10 ms)"


def report(meta, runs, base):
    rows = []
    for r in runs:
        name = f"{r['mode']}, {r['form']}"
        if r.get("supported") is False or "start_s" not in r:
            rows.append(f"| {name} | {r.get('error', 'failed')} |" + " |" * 12)
            continue
        m, o, f = r.get("metrics", {}), r.get("one_app", {}), r.get("full_rewrite", {})
        ro = r.get("routing", {})
        b = base.get(r["mode"], {}).get("routing", {})
        ratio = (round(ro["loop_us_per_conn"] / b["loop_us_per_conn"], 2)
                 if ro.get("loop_us_per_conn") and b.get("loop_us_per_conn") else None)
        rows.append(
            f"| {name} | {r['start_s']} s | {r['rss_start_per_app_b']} B "
            f"| {fmt(r.get('rss_after_per_app_b'), ' B')} ({fmt(r.get('reloads'))} reloads) "
            f"| {fmt(o.get('apply_ms_median'), ' ms')} (max {fmt(o.get('apply_ms_max'), ' ms')}) "
            f"| {fmt(o.get('cpu_ms'), ' ms')} "
            f"| {probe_cell(o.get('probe'))} "
            f"| {probe_cell(f.get('probe'))}, {fmt(f.get('reloads'))} reloads "
            f"| {fmt(ro.get('loop_us_per_conn'), ' us')} | {fmt(b.get('loop_us_per_conn'), ' us')} "
            f"| {fmt(ratio, 'x')} | {fmt(m.get('bytes'))} | {fmt(m.get('cpu_s'), ' s')} "
            f"| {r.get('error', '')} |")
    md = [
        f"# flyproxy at {meta['apps']:,} apps",
        "",
        f"flyproxy {meta['flyproxy']}, {meta['date']}, {meta['cpus']} CPUs, load average at "
        f"the start {meta['loadavg']}. `make scale SCALE_APPS={meta['apps']}` (bench/scale/). "
        f"Routing ratio: the accepting threads' CPU (relay threads and listener loop) per new connection at {meta['apps']:,} apps over "
        f"{meta['base']:,} apps, same mode.",
        "",
        "| mode, config | start to first connection | RSS per app at start | RSS per app after reloads "
        "| one-app change: CPU of the plane and loop threads, median | the process's CPU less its idle rate "
        "| probe max wait, one-app changes "
        "| probe max wait, full rewrite | accepting threads' CPU per new connection | at "
        f"{meta['base']:,} apps | ratio | /metrics bytes | /metrics scrape CPU | notes |",
        "|---" * 14 + "|",
        *rows,
        "",
        "Every figure is one run's; the raw records, with more (probe counts, p99, connections "
        "that failed, idle CPU), are in the .json beside this file.",
        "",
    ]
    with open(OUT + ".md", "w") as f:
        f.write("\n".join(md))
    with open(OUT + ".json", "w") as f:
        json.dump({"meta": meta, "runs": runs, "base": base}, f, indent=1)
        f.write("\n")


def main():
    echo = subprocess.Popen([ECHO] + TARGETS, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        for t in TARGETS:
            host, port = t.rsplit(":", 1)
            while True:
                try:
                    socket.create_connection((host, int(port)), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        sys.exit(f"the echo targets did not start ({t})")
                    time.sleep(0.05)
        with open("/proc/loadavg") as f:
            loadavg = " ".join(f.read().split()[:3])
        meta = {
            "apps": APPS, "base": BASE, "reloads": RELOADS, "changes": CHANGES, "conns": CONNS,
            "flyproxy": os.environ.get("FLYPROXY_REV", "?"),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpus": os.cpu_count(), "loadavg": loadavg,
        }
        log(f"generating {APPS:,} apps")
        apps = make_apps(APPS)
        runs, base = [], {}
        for mode in MODES:
            if not START_ONLY and not REWRITE_ONLY:
                base[mode] = run_one(mode, "file", apps[:BASE], f"{mode}-base", full=False)
            for form in FORMS:
                runs.append(run_one(mode, form, apps, f"{mode}-{form}", full=True))
                report(meta, runs, base)
        report(meta, runs, base)
        log(f"results: {OUT}.md and {OUT}.json")
        print(open(OUT + ".md").read())
        failed = [r for r in runs + list(base.values())
                  if r.get("error") and r.get("supported") is not False]
        return 1 if failed else 0
    finally:
        echo.terminate()
        echo.wait()


if __name__ == "__main__":
    # Stopped (Ctrl-C, TERM): unwind, so that every process started here is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
