#!/usr/bin/env python3
"""The fleet scenario of issue 20 (`make scale-fleet`), run by bench/scale/run.sh --fleet inside
a network namespace of its own (root). Writes FLEET_OUT.json and .md.

- A real etcd cluster (Debian's etcd-server) of FLEET_MEMBERS (3) members on loopback (client
  ports 23790, 23791, ...), data directories of the run's own, auto-compaction by revision (keep
  1,000) and an 8 GiB quota: the settings the README gives a fleet.
- FLEET_APPS (200,000) app keys under /flyproxy/apps/ (one key per app, its JSON as value;
  written in transactions of 128 puts through etcd's JSON gateway, FLEET_LOADERS (4) at once),
  apps as `make scale`'s, its `catchall` app included, and one app `zz-last` on a port of its
  own (listed last, so a node serving it has every file).
- FLEET_NODES (3) nodes on loopback: each a network namespace of its own (held by its echo
  targets) with its proxy (`flyproxy simple -c DIR`), and its follower in the bench's namespace
  (beside etcd): `flyproxy-etcd-sync --prefix /flyproxy/apps/ --dir DIR --status-file FILE`,
  node k's etcd member (k modulo the members) in `ETCDCTL_ENDPOINTS`.
  The measures then, each node's as seen from inside its namespace:
  - sync from empty: every node's follower and proxy started together on an empty directory:
    time until its directory holds every app, and until its proxy serves `zz-last`;
  - one put: a new app's key put (an address and a port no other app has, so that no other
    app, the catchall included, can answer for it); time until each node relays a connection
    through it (a probe per node tries every 5 ms); FLEET_PUT_TRIES times;
  - at rest: FLEET_REST (30) s with no put, first without the probe, then with it (as in
    churn): each node's proxy CPU and follower CPU as in churn. Without the probe: what the
    apps cost a node that nothing changes (mostly the health checks of the targets every app
    lists); with it: that and the probe's own connections (some 200 a second);
  - churn: FLEET_PUTS puts per second (one app changed each) for FLEET_SECONDS s without the
    probe: each node's proxy CPU and follower CPU (% of a core, utime+stime from /proc; the
    follower's with its etcdctl children's, also given apart), so that churn less rest is what
    the puts cost; then as many puts again with a probe per node through an unchanged app every
    5 ms, from a process of its own (its longest wait, how many over 10 ms, and the relay
    threads' longest wait for a CPU during one probe);
  - a bad put (the first one-put app's value with `Tragets` for `Targets`): once each node's
    status file names it (or after 10 s), whether each node's file of that app is unchanged,
    its follower's log and status file name the app, and it still relays through that app;
    then node 0's proxy restarted: the seconds until it serves that app again;
  - etcd gone: the last node's etcd member stopped; a new app put through another member:
    seconds until the other nodes serve it; the cut-off node's probe through an unchanged app
    for FLEET_OUTAGE (10) s (failures, longest wait); the member started again: seconds until
    the cut-off node serves the new app.
If the follower binary lacks `--prefix` (the one-key-per-app mode), the scenario is skipped
with a message saying so, and the run exits 0.
"""

import base64
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import (  # noqa: E402  (the same apps, addresses and /proc readers)
    CATCHALL, TARGETS, TICK, WORK, Probe, echo_once, env_int, log, make_apps, proc_cpu, swapped, v4,
)

BIN = os.path.join(WORK, "bin", "flyproxy")
SYNC = os.path.join(WORK, "bin", "flyproxy-etcd-sync")
ECHO = os.path.join(WORK, "bin", "echo")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
APPS = env_int("FLEET_APPS", 200_000)
NODES = env_int("FLEET_NODES", 3)
MEMBERS = env_int("FLEET_MEMBERS", 3)
LOADERS = env_int("FLEET_LOADERS", 4)
PUTS = env_int("FLEET_PUTS", 10)
SECONDS = env_int("FLEET_SECONDS", 60)
PUT_TRIES = env_int("FLEET_PUT_TRIES", 5)
OUTAGE = env_int("FLEET_OUTAGE", 10)
REST = env_int("FLEET_REST", 30)
OUT = os.environ.get("FLEET_OUT") or os.path.join(REPO, "bench", "scale-fleet-results")
PREFIX = "/flyproxy/apps/"
CLONE_NEWNET = 0x40000000
libc = ctypes.CDLL("libc.so.6", use_errno=True)
# Ports no generated app (nor the catchall) has: an app on one is served only once it is there.
LAST_PORT, PUT_PORT, GONE_PORT = 9099, 9100, 9200


def client_url(m):
    return f"http://127.0.0.1:{23790 + m}"


def b64(s):
    return base64.b64encode(s.encode()).decode()


def etcd_call(path, body, timeout=30, member=0):
    req = urllib.request.Request(client_url(member) + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def put(app, member=0):
    return etcd_call("/v3/kv/put", {"key": b64(PREFIX + app["Name"]), "value": b64(json.dumps(app))},
                     member=member)


def put_all(apps):
    """Every app, in transactions of 128 puts (etcd's --max-txn-ops), LOADERS at once."""
    chunks = [apps[i:i + 128] for i in range(0, len(apps), 128)]
    errors = []

    def load(part):
        try:
            for chunk in part:
                ops = [{"requestPut": {"key": b64(PREFIX + a["Name"]), "value": b64(json.dumps(a))}}
                       for a in chunk]
                etcd_call("/v3/kv/txn", {"success": ops}, timeout=120)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=load, args=(chunks[k::LOADERS],)) for k in range(LOADERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def own_app(i, port):
    """App i on `port`, a port of its own: nothing else answers there."""
    return {"Name": f"own-{i:06d}", "Ports": [port], "Addresses": [f"{v4(i)}/32"],
            "Targets": list(TARGETS)}


class Member:
    """One etcd member, started again on the same data directory after a stop."""

    def __init__(self, m):
        self.m = m
        self.data = os.path.join(WORK, f"etcd{m}")
        self.proc = None

    def start(self):
        peers = ",".join(f"m{k}=http://127.0.0.1:{23800 + k}" for k in range(MEMBERS))
        self.proc = subprocess.Popen(
            ["etcd", "--name", f"m{self.m}", "--data-dir", self.data,
             "--listen-client-urls", client_url(self.m), "--advertise-client-urls", client_url(self.m),
             "--listen-peer-urls", f"http://127.0.0.1:{23800 + self.m}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{23800 + self.m}",
             "--initial-cluster", peers, "--initial-cluster-token", "flyproxy-fleet",
             "--initial-cluster-state", "new",
             # A loaded 2-core machine: no elections for a slow heartbeat.
             "--heartbeat-interval", "250", "--election-timeout", "2500",
             "--auto-compaction-mode", "revision", "--auto-compaction-retention", "1000",
             "--quota-backend-bytes", str(8 << 30)],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(WORK, f"etcd{self.m}.log"), "ab"))

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def in_netns(holder_pid, fn):
    """Run fn() on a thread of its own moved into the network namespace of `holder_pid`."""
    out = {}

    def run():
        fd = os.open(f"/proc/{holder_pid}/ns/net", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        try:
            out["value"] = fn()
        except Exception as e:  # reported by the caller
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def children(pid):
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:"))


def tree_cpu(pid):
    """CPU-seconds of `pid` and every descendant, live or reaped (utime+stime+cutime+cstime)."""
    try:
        f = stat_fields(pid)
    except OSError:
        return 0.0
    own = sum(int(x) for x in f[11:15]) / TICK
    return own + sum(tree_cpu(k) for k in children(pid))


class Node:
    def __init__(self, k):
        self.k = k
        self.member = k % MEMBERS
        self.dir = os.path.join(WORK, f"node{k}", "apps.d")
        os.makedirs(self.dir, exist_ok=True)
        # The namespace's holder: its echo targets, started in a fresh network namespace.
        setup = ("ip link set lo up && ip -6 route add local fd00::/8 dev lo && "
                 f"exec {ECHO} {' '.join(TARGETS)}")
        self.echo = subprocess.Popen(["unshare", "--net", "sh", "-c", setup],
                                     stderr=subprocess.DEVNULL)
        self.sync_log = open(os.path.join(WORK, f"node{k}-sync.log"), "wb")
        self.proxy_log_path = os.path.join(WORK, f"node{k}-proxy.log")
        self.status_path = os.path.join(WORK, f"node{k}-sync-status.json")
        self.sync = self.proxy = None

    def start_sync(self, help_text):
        # The endpoints as an option where the follower has one, and in etcdctl's own variable
        # (which a follower driving etcdctl reads) in any case.
        url = client_url(self.member)
        args = [SYNC, "--prefix", PREFIX, "--dir", self.dir]
        if "--endpoints" in help_text:
            args += ["--endpoints", url]
        if "--status-file" in help_text:
            args += ["--status-file", self.status_path]
        self.sync = subprocess.Popen(args, stdout=self.sync_log, stderr=self.sync_log,
                                     env=dict(os.environ, ETCDCTL_ENDPOINTS=url))

    def start_proxy(self):
        log_f = open(self.proxy_log_path, "ab")
        self.proxy = subprocess.Popen(
            ["nsenter", f"--net=/proc/{self.echo.pid}/ns/net", BIN, "simple", "-c", self.dir,
             "--reload-interval", "200ms", "--drain-timeout", "1s", "--access-log", "off"],
            stdout=log_f, stderr=log_f)
        self.t_proxy = time.monotonic()

    def count(self):
        return sum(1 for n in os.listdir(self.dir) if n.endswith(".json") and not n.startswith("."))

    def echo_through(self, i, timeout=2.0):
        return in_netns(self.echo.pid, lambda: echo_once((v4(i), PORT_OF[i]), timeout))

    def serving(self, i, timeout=2.0):
        """Whether a line comes back through app i; an exited proxy is an error, with its words."""
        if self.proxy.poll() is not None:
            with open(self.proxy_log_path, "rb") as f:
                said = [x.split(" ", 1)[-1] for x in f.read().decode("utf-8", "replace").splitlines()
                        if "exiting with status" not in x]
            raise RuntimeError(f"node {self.k}'s proxy exited ({self.proxy.returncode}) "
                               f"on -c DIR: " + " / ".join(said[-3:])[:400])
        return self.echo_through(i, timeout) >= 0

    def status(self):
        try:
            with open(self.status_path) as f:
                return f.read()
        except OSError:
            return ""

    def cpu(self):
        """(proxy, follower alone, its etcdctl children) CPU-seconds so far."""
        f = stat_fields(self.sync.pid)
        follower = (int(f[11]) + int(f[12])) / TICK
        etcdctl = (int(f[13]) + int(f[14])) / TICK + sum(tree_cpu(k) for k in children(self.sync.pid))
        return proc_cpu(self.proxy.pid), follower, etcdctl

    def stop(self):
        for p in (self.proxy, self.sync, self.echo):
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


PORT_OF = {}


def wait_until(what, timeout, ok, every=0.005):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if ok():
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(every)
    raise RuntimeError(f"{what}: not within {timeout} s")


def each_node(nodes, what, timeout, ok, since, every=0.005):
    """Seconds from since[k] until ok(node k) held, for every node (polled in turn)."""
    done = [None] * len(nodes)
    deadline = time.monotonic() + timeout
    while None in done:
        for k, n in enumerate(nodes):
            if done[k] is None:
                try:
                    if ok(n):
                        done[k] = time.monotonic() - since[k]
                except OSError:
                    pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nodes {[nodes[k].k for k, d in enumerate(done) if d is None]}: "
                               f"not {what} within {timeout:.0f} s")
        time.sleep(every)
    return done


def node_probe(node, i):
    """Every 5 ms, a connection through app i of a node, from inside its namespace (a process
    of its own: see scale.Probe)."""
    return Probe((v4(i), PORT_OF[i]), node.proxy.pid, netns=node.echo.pid)


def report(res):
    with open(OUT + ".json", "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    md = [f"# flyproxy fleet: {res['apps']:,} app keys, {res['nodes']} nodes, "
          f"{res.get('members')} etcd members", "",
          f"flyproxy {res.get('flyproxy')}, {res.get('date')}. `make scale-fleet` "
          "(bench/scale/fleet.py).", ""]
    if "skipped" in res:
        md += [f"Skipped: {res['skipped']}", ""]
    if "error" in res:
        md += [f"**Failed**: {res['error']}", ""]
    churn = res.get("churn", {})
    churn_probed = res.get("churn_probed", {})
    rest = res.get("rest", {})
    probed = res.get("rest_probed", {})
    gone = res.get("etcd_gone", {})
    rows = [
        (f"proxy CPU at rest, no put for {rest.get('seconds')} s (% of a core)",
         rest.get("proxy_cpu_pct")),
        ("proxy + follower + etcdctl at rest (% of a core)", rest.get("cpu_pct")),
        ("proxy CPU at rest with the probe running (% of a core)", probed.get("proxy_cpu_pct")),
        ("proxy + follower + etcdctl at rest with the probe (% of a core)",
         probed.get("cpu_pct")),
        ("synced from empty: follower wrote every file (s)", res.get("sync_s")),
        ("synced from empty: proxy serves the last file's app (s)", res.get("sync_served_s")),
        ("follower's peak RSS (MB)", res.get("follower_peak_rss_mb")),
        (f"proxy CPU, {churn.get('puts')} puts in {churn.get('seconds')} s (% of a core)",
         churn.get("proxy_cpu_pct")),
        ("follower CPU, itself (% of a core)", churn.get("follower_cpu_pct")),
        ("follower's etcdctl CPU (% of a core)", churn.get("etcdctl_cpu_pct")),
        ("proxy + follower + etcdctl (% of a core)", churn.get("cpu_pct")),
        ("proxy + follower + etcdctl, the same with the probe running (% of a core)",
         churn_probed.get("cpu_pct")),
        ("probe's longest wait during the puts (ms)",
         [p.get("max_ms") for p in churn_probed.get("probe", [])] or None),
        ("probe connections over 10 ms / made",
         [f"{p.get('over_10ms')} / {p.get('probes')}" for p in churn_probed.get("probe", [])]
         or None),
        ("relay threads' longest wait for a CPU during one probe (ms)",
         [p.get("relay_run_queue_ms_max") for p in churn_probed.get("probe", [])] or None),
        ("bad put: file unchanged", [b["file_unchanged"] for b in res.get("bad_put", [])] or None),
        ("bad put: in the follower's log", [b["follower_logged"] for b in res.get("bad_put", [])] or None),
        ("bad put: in its status file", [b["in_status_file"] for b in res.get("bad_put", [])] or None),
        ("bad put: the app still served", [b["still_serving"] for b in res.get("bad_put", [])] or None),
    ]
    if any(v is not None for _, v in rows):
        md += ["| per node | " + " | ".join(f"node {k}" for k in range(res["nodes"])) + " |",
               "|---" * (res["nodes"] + 1) + "|"]
        md += [f"| {name} | " + " | ".join(str(x) for x in v) + " |" for name, v in rows if v]
        md.append("")
    for key, what in [("put_all_s", "seconds to put every key"),
                      ("one_put_served_by_all_ms", "one put served by every node (ms), each try"),
                      ("one_put_written_by_all_ms",
                       "the same puts' files written by every node's follower (ms)"),
                      ("restart_after_bad_put_serves_s",
                       "node 0's proxy restarted after the bad put: seconds until it serves that app")]:
        if key in res:
            md.append(f"- {what}: {res[key]}")
    if gone:
        md.append(f"- etcd gone (node {gone.get('node')}'s member stopped {OUTAGE} s): "
                  f"the other nodes served a put after {gone.get('others_served_s')} s; "
                  f"the cut-off node's probe meanwhile: {gone.get('probe')}; "
                  f"it served the put {gone.get('caught_up_s')} s after its member was started again "
                  f"(member ready after {gone.get('member_back_s')} s)")
    md.append("")
    with open(OUT + ".md", "w") as f:
        f.write("\n".join(md))


def cpu_since(nodes, c0, t0, probes):
    """Each node's CPU since `c0` (per node: proxy, follower, etcdctl) and monotonic `t0`, in %
    of a core, and what each of `probes` saw (stopped here): at rest and under churn alike."""
    dt = time.monotonic() - t0
    used = [[(b - a) / dt * 100 for a, b in zip(c, n.cpu())] for n, c in zip(nodes, c0)]
    return {
        "seconds": round(dt, 1),
        "proxy_cpu_pct": [round(u[0], 2) for u in used],
        "follower_cpu_pct": [round(u[1], 2) for u in used],
        "etcdctl_cpu_pct": [round(u[2], 2) for u in used],
        "cpu_pct": [round(sum(u), 2) for u in used],
        "probe": [p.stop() for p in probes],
    }

def main():
    res = {"apps": APPS, "nodes": NODES, "members": MEMBERS,
           "flyproxy": os.environ.get("FLYPROXY_REV", "?"),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    help_text = ""
    if os.path.exists(SYNC):
        help_text = subprocess.run([SYNC, "--help"], capture_output=True, text=True).stdout
    if "--prefix" not in help_text:
        res["skipped"] = ("this flyproxy-etcd-sync has no --prefix (one key per app, issue 20): "
                          "the fleet scenario needs it")
        log(f"fleet: skipped: {res['skipped']}")
        report(res)
        return 0
    if not shutil.which("etcd"):
        sys.exit("fleet: etcd is not installed (Debian etcd-server; `make scale-fleet` installs it)")
    members = [Member(m) for m in range(MEMBERS)]
    nodes = []
    try:
        for m in members:
            m.start()
        for m in members:
            wait_until(f"etcd member {m.m} answering", 60,
                       lambda: etcd_call("/v3/kv/range", {"key": b64("x")}, member=m.m) or True,
                       every=0.1)
        apps = make_apps(APPS)
        for i, a in enumerate(apps):
            PORT_OF[i] = a["Ports"][0]
        last_i = APPS + 1000
        last = dict(own_app(last_i, LAST_PORT), Name="zz-last")
        PORT_OF[last_i] = LAST_PORT
        t0 = time.monotonic()
        put_all(apps + [CATCHALL, last])
        res["put_all_s"] = round(time.monotonic() - t0, 1)
        log(f"fleet: {APPS:,} keys put in {res['put_all_s']} s")
        files = APPS + 2
        nodes = [Node(k) for k in range(NODES)]
        # Sync from empty: each node's follower and proxy started together on an empty DIR.
        t0 = time.monotonic()
        for n in nodes:
            n.start_proxy()
            n.start_sync(help_text)
        res["sync_s"] = [round(x, 1) for x in each_node(
            nodes, "synced from empty", 600 + APPS / 100, lambda n: n.count() >= files, [t0] * NODES)]
        log(f"fleet: followers synced from empty: {res['sync_s']} s")
        res["sync_served_s"] = [round(x, 1) for x in each_node(
            nodes, "serving the last app", 600 + APPS / 100,
            lambda n: n.serving(last_i, 1.0), [t0] * NODES)]
        log(f"fleet: proxies serving the last app: {res['sync_served_s']} s")
        res["follower_peak_rss_mb"] = [round(peak_rss_kib(n.sync.pid) / 1024, 1) for n in nodes]
        # One put, served by every node.
        served, written, own = [], [], []
        for t in range(PUT_TRIES):
            i = APPS + t
            app = own_app(i, PUT_PORT + t)
            PORT_OF[i] = app["Ports"][0]
            own.append((i, app))
            # The follower's part apart: until each node's file is there (polled every 1 ms).
            files_at = {}
            t0 = time.monotonic()
            put(app)
            watcher = threading.Thread(target=lambda: files_at.update(times=each_node(
                nodes, "writing a new app's file", 30,
                lambda n: os.path.exists(os.path.join(n.dir, app["Name"] + ".json")),
                [t0] * NODES, every=0.001)))
            watcher.start()
            times = each_node(nodes, "serving a new app", 30,
                              lambda n: n.echo_through(i, 1.0) >= 0, [t0] * NODES)
            watcher.join()
            served.append(round(max(times) * 1e3, 1))
            written.append(round(max(files_at["times"]) * 1e3, 1))
        res["one_put_served_by_all_ms"] = served
        res["one_put_written_by_all_ms"] = written
        log(f"fleet: one put served by all nodes within {served} ms (files written within {written} ms)")
        # At rest: the same nodes with no put, without the probe and with it, for the churn's
        # figures to be set against.
        for key, probing in (("rest", False), ("rest_probed", True)):
            probes = [node_probe(n, 1) for n in nodes] if probing else []
            c0, t0 = [n.cpu() for n in nodes], time.monotonic()
            time.sleep(REST)
            res[key] = cpu_since(nodes, c0, t0, probes)
            log(f"fleet: at rest{' with the probe' if probing else ''} {res[key]}")
        # Churn: first without the probe (what the puts cost a node: the probe's own
        # connections, some 200 a second, are not part of it), then the same with the probe,
        # for its waits.
        k = 0
        for key, probing in (("churn", False), ("churn_probed", True)):
            probes = [node_probe(n, 1) for n in nodes] if probing else []
            c0, t0, k0 = [n.cpu() for n in nodes], time.monotonic(), k
            while time.monotonic() - t0 < SECONDS:
                i = 2 + (k * 7919) % (APPS - 2)
                apps[i] = swapped(apps[i])
                put(apps[i])
                k += 1
                time.sleep(max(0.0, t0 + (k - k0) / PUTS - time.monotonic()))
            res[key] = {"puts": k - k0, **cpu_since(nodes, c0, t0, probes)}
            log(f"fleet: {key} {res[key]}")
        # A bad put, of an app on a port of its own (so that no other app answers for it).
        victim_i, victim = own[0]
        path = lambda n: os.path.join(n.dir, victim["Name"] + ".json")  # noqa: E731
        before = [open(path(n), "rb").read() for n in nodes]
        logged_before = [os.path.getsize(n.sync_log.name) for n in nodes]
        bad = dict(victim)
        bad["Tragets"] = bad.pop("Targets")
        put(bad)
        try:
            each_node(nodes, "reporting the bad put", 10, lambda n: victim["Name"] in n.status(),
                      [time.monotonic()] * NODES)
        except RuntimeError as e:
            log(f"fleet: {e}")
        res["bad_put"] = []
        for n, b, at in zip(nodes, before, logged_before):
            after = open(path(n), "rb").read()
            with open(n.sync_log.name, "rb") as f:
                f.seek(at)
                said = f.read().decode("utf-8", "replace")
            try:
                serving = n.echo_through(victim_i) >= 0
            except OSError:
                serving = False
            res["bad_put"].append({"file_unchanged": after == b,
                                   "follower_logged": victim["Name"] in said,
                                   "in_status_file": victim["Name"] in n.status(),
                                   "still_serving": serving})
        n = nodes[0]
        n.proxy.send_signal(signal.SIGTERM)
        n.proxy.wait(30)
        n.start_proxy()
        try:
            res["restart_after_bad_put_serves_s"] = round(wait_until(
                "restarted node serving", 300 + APPS / 500, lambda: n.serving(victim_i, 1.0)), 2)
        except RuntimeError:
            res["restart_after_bad_put_serves_s"] = None
        log(f"fleet: bad put {res['bad_put']}, restart serves after: "
            f"{res['restart_after_bad_put_serves_s']} s")
        if MEMBERS > 1 and NODES > 1:
            res["etcd_gone"] = etcd_gone(nodes, members)
            log(f"fleet: etcd gone: {res['etcd_gone']}")
        report(res)
        return 0
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
        log(f"fleet: FAILED: {res['error']}")
        report(res)
        return 1
    finally:
        for n in nodes:
            n.stop()
        for m in members:
            m.stop()


def etcd_gone(nodes, members):
    """The last node's member stopped for OUTAGE s while a new app is put through another; then
    started again: how the cut-off node and the others fare."""
    cut = nodes[-1]
    others = [n for n in nodes if n.member != cut.member]
    via = next(m for m in members if m.m != cut.member)
    out = {"node": cut.k}
    probe = node_probe(cut, 1)
    members[cut.member].stop()
    t_stop = time.monotonic()
    i = APPS + 500
    PORT_OF[i] = GONE_PORT
    t0 = time.monotonic()
    put(own_app(i, GONE_PORT), member=via.m)
    out["others_served_s"] = [round(x, 2) for x in each_node(
        others, "serving a put made while a member was gone", 60,
        lambda n: n.echo_through(i, 1.0) >= 0, [t0] * len(others))]
    time.sleep(max(0.0, t_stop + OUTAGE - time.monotonic()))
    try:
        out["cut_off_served_it_meanwhile"] = cut.echo_through(i, 1.0) >= 0
    except OSError:
        out["cut_off_served_it_meanwhile"] = False
    out["probe"] = probe.stop()
    members[cut.member].start()
    t0 = time.monotonic()
    out["member_back_s"] = round(wait_until(
        "the member answering again", 60,
        lambda: etcd_call("/v3/kv/range", {"key": b64("x")}, member=cut.member, timeout=1) or True,
        every=0.1), 2)
    out["caught_up_s"] = round(wait_until(
        "the cut-off node serving the put", 120, lambda: cut.echo_through(i, 1.0) >= 0), 2)
    return out


if __name__ == "__main__":
    # Stopped (Ctrl-C, TERM): unwind, so that every process started here is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
