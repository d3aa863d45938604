#!/usr/bin/env python3
"""Helpers for bench/run.sh: readiness probes, the idle-connection memory client, /proc
accounting, parsing iperf3 and wrk output into records, and the report (Markdown + SVG).

Standard library only. Records are JSON lines appended to $BENCH_DATA, each with the round and
config from $BENCH_ROUND and $BENCH_CONFIG:
    {"round": 1, "config": "haproxy", "metric": "iperf1_gbps", "value": 12.3}
"""

import argparse
import html
import json
import os
import re
import resource
import socket
import statistics
import sys
import time

# Display order and labels of the configurations.
CONFIGS = [
    ("direct", "direct (no proxy)"),
    ("flyproxy-simple", "flyproxy simple"),
    ("flyproxy-bpf", "flyproxy bpf"),
    ("haproxy", "HAProxy"),
    ("haproxy-splice", "HAProxy splice"),
    ("nginx", "nginx stream"),
]
LABEL = dict(CONFIGS)
HAPROXY = ("haproxy", "haproxy-splice")
COLOR = {
    "direct": "#9e9e9e",
    "flyproxy-simple": "#d62728",
    "flyproxy-bpf": "#ff7f0e",
    "haproxy": "#1f77b4",
    "haproxy-splice": "#17becf",
    "nginx": "#2ca02c",
}

# The headline figures: metric, label, unit, higher is better, digits.
FIGURES = [
    ("iperf1_gbps", "bulk throughput, 1 stream", "Gbit/s", True, 1),
    ("iperf4_gbps", "bulk throughput, 4 streams", "Gbit/s", True, 1),
    ("close_rps", "new connections per second", "conn/s", True, 0),
    ("keepalive_rps", "requests/s, kept-alive, 50 conns", "req/s", True, 0),
    ("keepalive_p50_ms", "latency p50, kept-alive", "ms", False, 3),
    ("keepalive_p99_ms", "latency p99, kept-alive", "ms", False, 3),
    ("close_ctxsw_per_req", "context switches per new connection", "switches", False, 3),
    ("close_vcsw_per_req", "… voluntary (the proxy's sleeps, hand-offs) per new connection",
     "switches", False, 3),
    ("close_ivcsw_per_req", "… involuntary (preempted) per new connection", "switches", False, 3),
    ("keepalive_ctxsw_per_req", "context switches per kept-alive request", "switches", False, 3),
    ("keepalive_vcsw_per_req", "… voluntary (the proxy's sleeps, hand-offs) per kept-alive request",
     "switches", False, 3),
    ("keepalive_ivcsw_per_req", "… involuntary (preempted) per kept-alive request", "switches",
     False, 3),
    ("rss_with_mib", "RSS with the idle connections", "MiB", False, 1),
    ("per_conn_kib", "memory per idle connection", "KiB", False, 2),
    ("sysmem_per_conn_kib", "system memory per idle connection (MemAvailable)", "KiB", False, 2),
    ("kernmem_per_conn_kib", "kernel memory per idle connection (slab, stacks, TCP buffers)", "KiB",
     False, 2),
    ("threads_idle", "threads with the idle connections", "threads", False, 0),
    ("fair64_gbps", "bulk throughput, 64 streams", "Gbit/s", True, 1),
    ("fair64_min_over_mean", "slowest of 64 streams / mean", "ratio", True, 2),
    ("cpu_s_per_gb", "CPU per GB relayed", "CPU s/GB", False, 3),
]


def fail(msg):
    print(f"tool.py: {msg}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------- records


def record(metric, value, quiet=False):
    path = os.environ.get("BENCH_DATA")
    if not path:
        fail("BENCH_DATA is not set")
    rec = {
        "round": int(os.environ.get("BENCH_ROUND", "0")),
        "attempt": int(os.environ.get("BENCH_ATTEMPT", "1")),
        "config": os.environ.get("BENCH_CONFIG", "?"),
        "metric": metric,
        "value": value,
    }
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    if not quiet:
        v = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"    {metric} = {v}", file=sys.stderr)


def load_records(path):
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


# ---------------------------------------------------------------- /proc


def tree_pids(root):
    """root and every descendant (nginx: master and workers)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    pids, todo = [], [root]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(children.get(p, []))
    return pids


def threads_of(root):
    total = 0
    for p in tree_pids(root):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("Threads:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def kernel_mem_kib():
    """The kernel's own memory, which other processes' ordinary allocations (the noise in
    MemAvailable on a shared machine) leave alone: slab objects (sockets, epoll entries, files),
    kernel stacks (one per thread), page tables, and the pages holding TCP buffers."""
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            fields[name] = int(rest.split()[0])
    total = fields.get("Slab", 0) + fields.get("KernelStack", 0) + fields.get("PageTables", 0)
    page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
    for path in ("/proc/net/sockstat",):
        with open(path) as f:
            for line in f:
                if line.startswith("TCP:"):
                    parts = line.split()
                    if "mem" in parts:
                        total += int(parts[parts.index("mem") + 1]) * page_kib
    return total


def mem_available_kib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    fail("no MemAvailable in /proc/meminfo")


def rss_kib(root):
    total = 0
    pids = tree_pids(root)
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    if not os.path.exists(f"/proc/{root}"):
        fail(f"process {root} is gone")
    return total


def cpu_seconds(root):
    """utime+stime of the process tree (each process counts its threads, live and exited)."""
    tck = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in tree_pids(root):
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return total / tck


def cmd_cpu(a):
    print(f"{cpu_seconds(a.pid):.2f}")


def context_switches(root):
    """Voluntary and involuntary context switches of every live thread of the process tree
    (/proc/PID/task/TID/status), apart: voluntary ones are the proxy's own sleeps and
    hand-offs, involuntary ones the scheduler preempting it (on a machine whose cores the
    client and backend share, mostly the scheduler's doing)."""
    counts = {"voluntary_ctxt_switches:": 0, "nonvoluntary_ctxt_switches:": 0}
    for p in tree_pids(root):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            try:
                with open(f"/proc/{p}/task/{t}/status") as f:
                    for line in f:
                        key = line.split(maxsplit=1)[0] if line.strip() else ""
                        if key in counts:
                            counts[key] += int(line.split()[1])
            except OSError:
                pass
    return counts["voluntary_ctxt_switches:"], counts["nonvoluntary_ctxt_switches:"]


def cmd_ctxsw(a):
    """Prints the voluntary and the involuntary count, space apart."""
    print(*context_switches(a.pid))


def cmd_rss(a):
    print(rss_kib(a.pid))


# ---------------------------------------------------------------- the rest of the machine
#
# The bench shares the machine with whatever else runs on it (other people's builds and tests).
# It waits for a quiet machine before each measurement (bounded) and records the CPU that
# processes outside its network namespace used meanwhile, so a disturbed figure can be told.

PF_KTHREAD = 0x00200000


def outside_times():
    """pid -> (start time, utime+stime) of user processes outside this network namespace."""
    me = os.stat("/proc/self/ns/net").st_ino
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.stat(f"/proc/{d}/ns/net").st_ino == me:
                continue
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fl = stat[stat.rindex(")") + 2:].split()
        if int(fl[6]) & PF_KTHREAD:
            continue
        out[d] = (int(fl[19]), int(fl[11]) + int(fl[12]))
    return out


def machine_idle_pct(window):
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return sum(v), v[3] + v[4]
    t0, i0 = sample()
    time.sleep(window)
    t1, i1 = sample()
    return 100.0 * (i1 - i0) / max(1, t1 - t0)


def cmd_wait_quiet(a):
    """Wait (at most --max-wait s) until the machine is at least --idle % idle over 1 s."""
    deadline = time.monotonic() + a.max_wait
    said = False
    while True:
        idle = machine_idle_pct(1.0)
        if idle >= a.idle:
            return
        if time.monotonic() >= deadline:
            print(f"    machine still busy (idle {idle:.0f}%) after {a.max_wait:.0f}s: measuring "
                  "anyway; see foreign_cpu_pct", file=sys.stderr)
            return
        if not said:
            print(f"    machine busy (idle {idle:.0f}%): waiting up to {a.max_wait:.0f}s for "
                  "it to calm down", file=sys.stderr)
            said = True


class Stop(Exception):
    pass


def cmd_foreign_sampler(a):
    """Until SIGTERM: every --interval s, add up the CPU that processes outside this network
    namespace used since the last look (a process first seen counts whole; one that lives less
    than an interval between two looks is missed), then write the total to FILE."""
    import signal

    def stop(*_):
        raise Stop()

    signal.signal(signal.SIGTERM, stop)
    t0 = time.monotonic()
    ticks = 0
    prev = outside_times()
    try:
        while True:
            time.sleep(a.interval)
            now = outside_times()
            for pid, (start, total) in now.items():
                old = prev.get(pid)
                ticks += total - old[1] if old and old[0] == start else total
            prev = now
    except Stop:
        pass
    with open(a.file, "w") as f:
        json.dump({"seconds": ticks / os.sysconf("SC_CLK_TCK"), "wall": time.monotonic() - t0}, f)


def cmd_foreign_record(a):
    with open(a.file) as f:
        j = json.load(f)
    pct = 100.0 * j["seconds"] / max(j["wall"], 1e-3)
    record("foreign_cpu_pct", pct, quiet=pct < 10)


# ---------------------------------------------------------------- probes


def http_get(port, timeout):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data


def echo_once(port, timeout):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"ready?\n")
        data = b""
        while len(data) < 7:
            chunk = s.recv(64)
            if not chunk:
                break
            data += chunk
    return data


def alive(pid):
    if not pid:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def cmd_wait_ready(a):
    """Until the HTTP port answers 200 "ok" and the echo port echoes, through the proxy."""
    deadline = time.monotonic() + a.deadline
    last = "no attempt"
    while time.monotonic() < deadline:
        if not alive(a.pid):
            fail(f"process {a.pid} exited while starting")
        try:
            if a.http:
                r = http_get(a.http, 1.0)
                if not (r.startswith(b"HTTP/1.1 200") and r.endswith(b"ok")):
                    raise OSError(f"http port {a.http} answered {r[:60]!r}")
            if a.echo:
                r = echo_once(a.echo, 1.0)
                if r != b"ready?\n":
                    raise OSError(f"echo port {a.echo} answered {r!r}")
            return
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    fail(f"not ready after {a.deadline}s: {last}")


# ---------------------------------------------------------------- memory


def cmd_idle(a):
    """Open N connections through the proxy to the echo backend, one short message each, hold
    them idle, and sample the proxy's RSS before and with them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < a.conns + 100:
        fail(f"fd limit {hard} is too low for {a.conns} connections")
    time.sleep(a.settle)
    before = rss_kib(a.pid) if a.pid else 0
    avail_before = mem_available_kib()
    kern_before = kernel_mem_kib()
    deadline = time.monotonic() + a.deadline
    socks = []
    msg = b"ping\n"
    t0 = time.monotonic()
    try:
        for i in range(a.conns):
            if time.monotonic() > deadline:
                fail(f"only {len(socks)} of {a.conns} connections after {a.deadline}s")
            s = socket.create_connection(("127.0.0.1", a.port), timeout=5)
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = s.recv(64)
                if not chunk:
                    fail(f"connection {i + 1} closed before its reply (after {len(socks)} held)")
                got += chunk
            if got != msg:
                fail(f"connection {i + 1}: bad echo {got!r}")
            socks.append(s)
        opened = time.monotonic() - t0
        time.sleep(a.settle)
        samples, avail, kern = [], [], []
        for _ in range(3):
            samples.append(rss_kib(a.pid) if a.pid else 0)
            avail.append(mem_available_kib())
            kern.append(kernel_mem_kib())
            time.sleep(0.2)
        with_ = max(samples)
        avail_with = min(avail)
        threads = threads_of(a.pid) if a.pid else 0
        # Every connection must still be open: a proxy that dropped idle ones is not measured.
        for s in socks:
            s.setblocking(False)
            try:
                if s.recv(1) == b"":
                    fail("a held connection was closed by the proxy while idle")
            except BlockingIOError:
                pass
    except OSError as e:
        fail(f"after {len(socks)} connections: {e}")
    finally:
        for s in socks:
            s.close()
    # The whole machine's view, kernel memory included: every socket of the proxy, the client
    # and the backend. The direct run (no proxy) gives what the client and backend alone take.
    record("sysmem_per_conn_kib", (avail_before - avail_with) / a.conns)
    record("kernmem_per_conn_kib", (max(kern) - kern_before) / a.conns)
    if a.pid:
        record("rss_before_mib", before / 1024)
        record("rss_with_mib", with_ / 1024)
        record("per_conn_kib", (with_ - before) / a.conns)
        record("threads_idle", threads)
    record("idle_open_s", opened, quiet=True)


# ---------------------------------------------------------------- parsers


def cmd_iperf(a):
    with open(a.file) as f:
        text = f.read()
    try:
        j = json.loads(text)
    except ValueError:
        fail(f"{a.file}: not iperf3 JSON: {text[:200]!r}")
    if j.get("error"):
        fail(f"{a.file}: iperf3 error: {j['error']}")
    recv = j["end"]["sum_received"]
    record(f"{a.name}_gbps", recv["bits_per_second"] / 1e9)
    record(f"{a.name}_bytes", recv["bytes"], quiet=True)
    streams = [s["receiver"]["bits_per_second"] for s in j["end"].get("streams", [])
               if "receiver" in s]
    if a.fairness and streams:
        mean = sum(streams) / len(streams)
        record(f"{a.name}_min_over_mean", min(streams) / mean if mean else 0.0)
        record(f"{a.name}_streams", len(streams), quiet=True)
    retrans = j["end"].get("sum_sent", {}).get("retransmits")
    if retrans is not None:
        record(f"{a.name}_retransmits", retrans, quiet=True)
    print(recv["bytes"])


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def to_ms(v):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", v)
    if not m:
        fail(f"bad wrk duration {v!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def cmd_wrk(a):
    with open(a.file) as f:
        text = f.read()
    m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if not m:
        fail(f"{a.file}: no Requests/sec line: {text[-400:]!r}")
    record(f"{a.name}_rps", float(m.group(1)))
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", text, re.M)
        if not m:
            fail(f"{a.file}: no {pct}% latency line (run wrk with --latency)")
        record(f"{a.name}_p{pct}_ms", to_ms(m.group(1)), quiet=a.name == "close")
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        errors += int(m.group(1))
    m = re.search(r"(\d+) requests in", text)
    record(f"{a.name}_requests", int(m.group(1)) if m else 0, quiet=True)
    record(f"{a.name}_errors", errors, quiet=errors == 0)


def latest_attempts(records):
    """Only the records of the last attempt of each (config, round): a turn measured again
    because others loaded the machine replaces the disturbed one."""
    last = {}
    for r in records:
        k = (r["config"], r["round"])
        last[k] = max(last.get(k, 0), r.get("attempt", 1))
    return [r for r in records if r.get("attempt", 1) == last[(r["config"], r["round"])]]


def cmd_worst_turn(a):
    """Print "ROUND CONFIG NEXT_ATTEMPT FOREIGN" of the turn measured under the most foreign load
    above --over %, among the last attempts; nothing if none."""
    recs = [r for r in latest_attempts(load_records(a.data)) if r["metric"] == "foreign_cpu_pct"]
    bad = [r for r in recs if r["value"] > a.over]
    if bad:
        r = max(bad, key=lambda r: r["value"])
        print(r["round"], r["config"], r.get("attempt", 1) + 1, f"{r['value']:.0f}")


def cmd_record(a):
    record(a.metric, float(a.value), quiet=a.quiet)


# ---------------------------------------------------------------- report


def fmt(v, digits):
    if v is None:
        return "—"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def fmt_ratio(r):
    if r is None:
        return "—"
    return f"{r:.2f}×"


def medians(records):
    by = {}
    for r in records:
        by.setdefault((r["config"], r["metric"]), []).append((r["round"], r["value"]))
    med = {k: statistics.median(v for _, v in vals) for k, vals in by.items()}
    return by, med


def best_haproxy(med, metric, higher):
    vals = [(med[(c, metric)], c) for c in HAPROXY if (c, metric) in med]
    if not vals:
        return None, None
    v, c = (max if higher else min)(vals)
    return v, c


def ratio(v, ref):
    if v is None or ref is None or ref == 0:
        return None
    return v / ref


def read_meta(path):
    meta = []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if "\t" in line:
                k, v = line.split("\t", 1)
                meta.append((k, v))
    return meta


def cmd_report(a):
    all_records = load_records(a.data)
    records = latest_attempts(all_records)
    meta = read_meta(a.meta)
    m = dict(meta)
    failures = []
    if os.path.exists(a.failures):
        with open(a.failures) as f:
            failures = [line.strip() for line in f if line.strip()]
    by, med = medians(records)
    present = [c for c, _ in CONFIGS if any(k[0] == c for k in med)]
    # Compared with the references: every proxy but HAProxy, whose best variant is the reference.
    others = [c for c in present if c not in HAPROXY and c != "direct"]
    has_hap = any(c in present for c in HAPROXY)

    out = []
    w = out.append
    w("# flyproxy benchmark results\n")
    w(f"Written by `bench/run.sh` on {m.get('date', '?')}; how to run it and what each figure "
      "means: [README.md](README.md). Each figure is the **median of "
      f"{m.get('rounds', '?')} rounds**, interleaved (round 1 of every configuration, then "
      "round 2, ...), with the order rotated each round.\n")
    if m.get("quick") == "1":
        w("> **Quick mode (smoke test): one short round; do not quote these figures.**\n")
    w("## Machine and versions\n")
    w("| | |\n|---|---|")
    for k, v in meta:
        if k.startswith("m:"):
            w(f"| {k[2:]} | {v} |")
    w("")
    w("## Figures (median)\n")
    w("| figure | unit | " + " | ".join(LABEL[c] for c in present) + " |")
    w("|---|---|" + "---:|" * len(present))
    for metric, label, unit, higher, digits in FIGURES:
        arrow = "↑" if higher else "↓"
        cells = [fmt(med.get((c, metric)), digits) for c in present]
        w(f"| {label} {arrow} | {unit} | " + " | ".join(cells) + " |")
    w("\n↑: higher is better; ↓: lower is better. Memory and CPU figures are the proxy's own "
      "(there is no proxy in *direct*), except the system memory per idle connection, which is the "
      "drop in MemAvailable (kernel memory included) for the client, the backend and the proxy "
      "together: *direct* gives what the client and backend alone take. flyproxy relays on pooled "
      "threads, one per core, that all wait on one epoll set (a connection that would block "
      "waits there without a thread); the 64-stream figures run it with `--max-threads 8`. HAProxy runs 2 threads and nginx 2 workers.\n")

    w("## Ratios\n")
    w("A proxy's median divided by the reference's median: ×1.00 is a tie; for a ↓ figure a "
      "ratio below 1 is better. *Best HAProxy* is, for each figure, the better of the two "
      "HAProxy configurations (without and with splice); the second column names it.\n")
    hap_cols = others
    dir_cols = [c for c in others] + (["haproxy-best"] if has_hap else [])
    lab = dict(LABEL, **{"haproxy-best": "best HAProxy"})
    w("| figure | best HAProxy | " + " | ".join(f"{lab[c]} ÷ best HAProxy" for c in hap_cols)
      + " | " + " | ".join(f"{lab[c]} ÷ direct" for c in dir_cols) + " |")
    w("|---|---|" + "---:|" * (len(hap_cols) + len(dir_cols)))
    chart_hap, chart_dir = [], []
    for metric, label, unit, higher, digits in FIGURES:
        arrow = "↑" if higher else "↓"
        ref, which = best_haproxy(med, metric, higher)
        direct = med.get(("direct", metric))
        val = {c: med.get((c, metric)) for c in others}
        val["haproxy-best"] = ref
        rh = [ratio(val[c], ref) for c in hap_cols]
        rd = [ratio(val[c], direct) for c in dir_cols]
        which_s = f"{LABEL[which]}: {fmt(ref, digits)} {unit}" if which else "—"
        w(f"| {label} {arrow} | {which_s} | " + " | ".join(fmt_ratio(r) for r in rh) + " | "
          + " | ".join(fmt_ratio(r) for r in rd) + " |")
        note = "higher is better" if higher else "lower is better"
        if ref is not None:
            bars = [(c, r) for c, r in zip(hap_cols, rh) if r is not None]
            if direct is not None:
                bars.insert(0, ("direct", direct / ref))
            chart_hap.append((label, f"{note}; vs {LABEL[which]}", higher, bars))
        if direct is not None:
            bars = [(c, r) for c, r in zip(dir_cols, rd) if r is not None]
            chart_dir.append((label, note, higher, bars))
    w("")

    # Caveats computed from this run.
    w("## Caveats\n")
    cav = []
    best_close = max((med.get((c, "close_rps"), 0) for c in present if c != "direct"), default=0)
    best_ka = max((med.get((c, "keepalive_rps"), 0) for c in present if c != "direct"), default=0)
    d_close, d_ka = med.get(("direct", "close_rps")), med.get(("direct", "keepalive_rps"))
    if d_close and d_ka and best_close and best_ka:
        cav.append(
            f"**Backend bound.** The HTTP backend (nginx, {m.get('backend_workers', '?')} workers) "
            f"served {fmt(d_close, 0)} new connections/s and {fmt(d_ka, 0)} kept-alive req/s "
            f"with no proxy in front, {d_close / best_close:.1f}× and {d_ka / best_ka:.1f}× the "
            "best proxy, so it is not what bounds the proxied figures.")
    cav.append(
        f"**Shared cores.** Client (wrk, iperf3), proxy and backend share the machine's "
        f"{m.get('nproc', '?')} cores, and every run saturates them (see the CPU table below): "
        "a proxy that spends less CPU leaves more to the client and backend, so the figures "
        "measure the whole system's cost of one proxy hop, not the proxy's ceiling on a machine "
        "of its own.")
    cav.append(
        "**Latency** is wrk's, from a client that keeps 50 requests in flight on a saturated "
        "2-core machine: p99 depends on scheduling more than on the proxy and moves more from "
        "run to run than the other figures (see every round below).")
    cav.append(
        "**flyproxy** relays on pooled threads, one per core, that accept, connect and relay "
        "on one epoll set (every thread with nothing to run waits on it; "
        "names are looked up on resolver threads of their own; no worker count to set, "
        "`--max-threads` left at its default except in the 64-stream case); a connection whose "
        "reads and writes would block waits in an epoll set without a thread, buffer or pipe, so "
        "the memory figure is its two sockets and its parked state. HAProxy runs 2 threads and nginx 2 "
        "worker processes. The system memory figure is the drop in MemAvailable for the whole "
        "machine, which other processes' allocations move by as much as the figure itself on a "
        "shared machine: compare it with *direct* in the same run, and across rounds. The kernel "
        "memory figure counts only the kernel's own memory (slab objects such as sockets, epoll "
        "entries and files; kernel stacks, one per thread; page tables; pages holding TCP "
        "buffers), which other processes' ordinary allocations leave alone: it ranks what idle "
        "connections cost the kernel (client and backend included, as *direct* shows).")
    fg = [(r["value"], r["round"], r["config"]) for r in records
          if r["metric"] == "foreign_cpu_pct"]
    if fg:
        vals = sorted(v for v, _, _ in fg)
        busy = [(v, rd, c) for v, rd, c in fg if v >= 10]
        text = (f"**Other load on the machine.** Processes outside the bench (other people's "
                f"builds and tests on this machine) used a median {statistics.median(vals):.0f}% "
                f"and at most {vals[-1]:.0f}% of one core while a configuration was measured "
                f"(the bench waits up to {m.get('quiet_wait', '?')} s for a quiet machine before "
                "each one).")
        if busy:
            text += " Measured under more than 10%: " + ", ".join(
                f"round {rd} {LABEL.get(c, c)} ({v:.0f}%)" for v, rd, c in sorted(
                    busy, key=lambda t: (t[1], t[2]))) + "; their figures may be low."
        cav.append(text)
    for c in cav:
        w(f"- {c}")
    w("")

    # CPU split during the wrk runs: shows whether the backend was the bound.
    aux = [("close", "new connections (Connection: close)"), ("keepalive", "kept-alive requests")]
    if any((c, "close_cpu_backend_pct") in med for c in present):
        ncore = int(m.get("nproc", "1"))
        w(f"## Where the CPU went during the wrk runs\n")
        w(f"Median, in % of one core (the machine has {ncore} cores = {100 * ncore}%).\n")
        w("| run | " + " | ".join(LABEL[c] for c in present) + " |")
        w("|---|" + "---:|" * len(present))
        for key, label in aux:
            for part, plabel in (("proxy", "proxy"), ("backend", "backend nginx"),
                                 ("idle", "machine idle")):
                cells = [fmt(med.get((c, f"{key}_cpu_{part}_pct")), 0) for c in present]
                w(f"| {label}: {plabel} | " + " | ".join(cells) + " |")
        w("\nThe rest is wrk itself and kernel work not charged to the proxy or the backend.\n")

    w("## Settings\n")
    for k, v in meta:
        if k.startswith("s:"):
            w(f"- **{k[2:]}**: {v}")
    w("")
    errs = [(c, metric, v) for (c, metric), v in med.items() if metric.endswith("_errors") and v]
    if failures or errs:
        w("## Problems in this run\n")
        for f_ in failures:
            w(f"- FAILED: {f_}")
        for c, metric, v in errs:
            w(f"- {LABEL.get(c, c)}: median {v:.0f} wrk errors in the `{metric[:-7]}` run "
              "(socket errors + non-2xx responses)")
        w("")

    w("## Every round\n")
    w("Values of rounds 1, 2, ... in order; the medians above are taken over these.\n")
    w("| figure | " + " | ".join(LABEL[c] for c in present) + " |")
    w("|---|" + "---|" * len(present))
    for metric, label, unit, higher, digits in FIGURES:
        cells = []
        for c in present:
            vals = sorted(by.get((c, metric), []))
            cells.append(" / ".join(fmt(v, digits) for _, v in vals) or "—")
        w(f"| {label} ({unit}) | " + " | ".join(cells) + " |")
    cells = []
    for c in present:
        vals = sorted(by.get((c, "foreign_cpu_pct"), []))
        cells.append(" / ".join(fmt(v, 0) for _, v in vals) or "—")
    w("| *other processes' CPU meanwhile (% of one core)* | " + " | ".join(cells) + " |")
    w("")
    redone = sorted({(r["round"], r["config"], r.get("attempt", 1)) for r in all_records
                     if r["metric"] == "foreign_cpu_pct" and r not in records})
    if redone:
        w("Turns measured again because other processes loaded the machine (the last attempt "
          "counts): " + ", ".join(
              f"round {rd} {LABEL.get(c, c)} (attempt {at}: others used "
              f"{next(r['value'] for r in all_records if (r['round'], r['config'], r.get('attempt', 1), r['metric']) == (rd, c, at, 'foreign_cpu_pct')):.0f}%)"
              for rd, c, at in redone) + ".\n")
    w(f"Whole run, build included: {m.get('elapsed', '?')}.\n")
    w(f"![ratios to the best HAProxy and to direct]({os.path.basename(a.out)}.svg)\n")

    with open(a.out + ".md", "w") as f:
        f.write("\n".join(out))
    title = f"flyproxy benchmark: ratios of medians ({m.get('rounds', '?')} rounds)"
    sub = (f"{m.get('date', '')} · {m.get('nproc', '?')} cores · kernel "
           f"{m.get('kernel', '?')} · loopback · log scale, bars start at ×1")
    with open(a.out + ".svg", "w") as f:
        f.write(svg_chart(title, sub, [("Ratio to the best HAProxy configuration", chart_hap),
                                       ("Ratio to direct (no proxy)", chart_dir)]))
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": dict(meta), "records": all_records, "failures": failures}, f,
                  indent=1)
    print(f"wrote {a.out}.md, {a.out}.svg, {a.out}.json", file=sys.stderr)


# ---------------------------------------------------------------- SVG


def svg_chart(title, subtitle, panels):
    """Horizontal bars on a log2 axis starting at ×1, one group per figure, hand-written SVG."""
    import math

    width, label_w, right_pad = 980, 300, 70
    x0, x1 = label_w, width - right_pad
    bar_h, bar_gap, group_gap = 13, 2, 14
    ratios = [r for _, groups in panels for g in groups for _, r in g[3] if r and r > 0]
    # The axis spans the data, at least ×1/2..×2 and at most ×1/8..×8; beyond, bars are clipped
    # (their label still gives the true ratio).
    lo_e = max(-3, min(-1, math.floor(math.log2(min(ratios, default=1)))))
    hi_e = min(3, max(1, math.ceil(math.log2(max(ratios, default=1)))))

    def x(r):
        e = min(max(math.log2(r), lo_e), hi_e)
        return x0 + (e - lo_e) / (hi_e - lo_e) * (x1 - x0)

    def tick(e):
        return f"×{2 ** e}" if e >= 0 else f"×1/{2 ** -e}"

    colors = dict(COLOR, **{"haproxy-best": COLOR["haproxy"]})
    labels = dict(LABEL, **{"haproxy-best": "best HAProxy"})
    esc = html.escape
    parts = []
    y = 30
    parts.append(f'<text x="{width / 2}" y="{y}" text-anchor="middle" font-size="17" '
                 f'font-weight="bold">{esc(title)}</text>')
    y += 20
    parts.append(f'<text x="{width / 2}" y="{y}" text-anchor="middle" font-size="12" '
                 f'fill="#555">{esc(subtitle)}</text>')
    y += 24
    used = []
    for _, groups in panels:
        for g in groups:
            for c, _ in g[3]:
                if c not in used:
                    used.append(c)
    order = [c for c, _ in CONFIGS] + ["haproxy-best"]
    used = [c for c in order if c in used and not (c == "haproxy" and "haproxy-best" in used)]
    lx = 40
    for c in used:
        parts.append(f'<rect x="{lx}" y="{y - 10}" width="12" height="12" fill="{colors[c]}"/>')
        parts.append(f'<text x="{lx + 17}" y="{y}" font-size="12">{esc(labels[c])}</text>')
        lx += 34 + 7.0 * len(labels[c])
    lx += 10
    parts.append(f'<rect x="{lx}" y="{y - 10}" width="14" height="12" fill="#e8f5e9" '
                 'stroke="#cde5cf"/>')
    parts.append(f'<text x="{lx + 19}" y="{y}" font-size="12" fill="#555">better side of ×1'
                 '</text>')
    y += 6
    for ptitle, groups in panels:
        if not groups:
            continue
        y += 26
        parts.append(f'<text x="20" y="{y}" font-size="15" font-weight="bold">{esc(ptitle)}'
                     '</text>')
        y += 8
        for e in range(lo_e, hi_e + 1):
            parts.append(f'<text x="{x(2.0 ** e):.1f}" y="{y + 10}" text-anchor="middle" '
                         f'font-size="11" fill="#555">{tick(e)}</text>')
        y += 18
        grid_top = y
        shade, bars_svg = [], []
        for label, note, higher, bars in groups:
            gh = len(bars) * (bar_h + bar_gap)
            sx, sw = (x(1), x1 - x(1)) if higher else (x0, x(1) - x0)
            shade.append(f'<rect x="{sx:.1f}" y="{y - 2}" width="{sw:.1f}" height="{gh + 2}" '
                         'fill="#e8f5e9"/>')
            bars_svg.append(f'<text x="{label_w - 10}" y="{y + gh / 2}" text-anchor="end" '
                            f'font-size="12">{esc(label)}</text>')
            bars_svg.append(f'<text x="{label_w - 10}" y="{y + gh / 2 + 13}" '
                            f'text-anchor="end" font-size="10" fill="#777">{esc(note)}</text>')
            for c, r in bars:
                xa, xb = sorted((x(1), x(r)))
                clipped = not (2.0 ** lo_e <= r <= 2.0 ** hi_e)
                bars_svg.append(f'<rect x="{xa:.1f}" y="{y}" width="{max(xb - xa, 1):.1f}" '
                                f'height="{bar_h}" fill="{colors[c]}"><title>{esc(labels[c])}: '
                                f'{r:.3f}×</title></rect>')
                text = f"{r:.2f}×" + (" (off the axis)" if clipped else "")
                if r >= 1:
                    tx, anchor = (xb + 4, "start") if xb < x1 - 40 else (xb - 4, "end")
                else:
                    tx, anchor = (xa - 4, "end") if xa > x0 + 40 else (xa + 4, "start")
                inside = (r >= 1 and anchor == "end") or (r < 1 and anchor == "start")
                fill = ' fill="white" font-weight="bold"' if inside else ""
                bars_svg.append(f'<text x="{tx:.1f}" y="{y + bar_h - 2}" '
                                f'text-anchor="{anchor}" font-size="10"{fill}>{text}</text>')
                y += bar_h + bar_gap
            y += group_gap
        grid = []
        for e in range(lo_e, hi_e + 1):
            xe = x(2.0 ** e)
            style = ('stroke="#333" stroke-width="1.2"' if e == 0
                     else 'stroke="#bbb" stroke-width="0.6" stroke-dasharray="3,3"')
            grid.append(f'<line x1="{xe:.1f}" y1="{grid_top - 4}" x2="{xe:.1f}" '
                        f'y2="{y - group_gap + 2}" {style}/>')
        parts.extend(shade + grid + bars_svg)
    height = y + 16
    body = "\n".join(parts)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Arial, sans-serif">\n'
            f'<rect width="{width}" height="{height}" fill="white"/>\n{body}\n</svg>\n')


# ---------------------------------------------------------------- main


def main():
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("wait-ready")
    s.add_argument("--http", type=int)
    s.add_argument("--echo", type=int)
    s.add_argument("--pid", type=int)
    s.add_argument("--deadline", type=float, default=10)
    s.set_defaults(fn=cmd_wait_ready)

    s = sub.add_parser("idle")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--conns", type=int, default=4000)
    s.add_argument("--pid", type=int)
    s.add_argument("--settle", type=float, default=1.0)
    s.add_argument("--deadline", type=float, default=60)
    s.set_defaults(fn=cmd_idle)

    s = sub.add_parser("wait-quiet")
    s.add_argument("--idle", type=float, default=90)
    s.add_argument("--max-wait", type=float, default=30)
    s.set_defaults(fn=cmd_wait_quiet)

    s = sub.add_parser("foreign-sampler")
    s.add_argument("file")
    s.add_argument("--interval", type=float, default=1.0)
    s.set_defaults(fn=cmd_foreign_sampler)

    s = sub.add_parser("foreign-record")
    s.add_argument("file")
    s.set_defaults(fn=cmd_foreign_record)

    s = sub.add_parser("cpu")
    s.add_argument("--pid", type=int, required=True)
    s.set_defaults(fn=cmd_cpu)
    s = sub.add_parser("ctxsw")
    s.add_argument("--pid", type=int, required=True)
    s.set_defaults(fn=cmd_ctxsw)

    s = sub.add_parser("rss")
    s.add_argument("--pid", type=int, required=True)
    s.set_defaults(fn=cmd_rss)

    s = sub.add_parser("iperf")
    s.add_argument("file")
    s.add_argument("--name", required=True)
    s.add_argument("--fairness", action="store_true",
                   help="also record the slowest stream's rate over the mean")
    s.set_defaults(fn=cmd_iperf)

    s = sub.add_parser("wrk")
    s.add_argument("file")
    s.add_argument("--name", required=True)
    s.set_defaults(fn=cmd_wrk)

    s = sub.add_parser("worst-turn")
    s.add_argument("--data", required=True)
    s.add_argument("--over", type=float, required=True)
    s.set_defaults(fn=cmd_worst_turn)

    s = sub.add_parser("record")
    s.add_argument("metric")
    s.add_argument("value")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_record)

    s = sub.add_parser("report")
    s.add_argument("--data", required=True)
    s.add_argument("--meta", required=True)
    s.add_argument("--failures", required=True)
    s.add_argument("--out", required=True, help="path prefix: writes PREFIX.md/.svg/.json")
    s.set_defaults(fn=cmd_report)

    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
