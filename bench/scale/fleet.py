#!/usr/bin/env python3
"""The fleet scenario of issue 20 (`make scale-fleet`), run by bench/scale/run.sh --fleet inside
a network namespace of its own (root). Writes FLEET_OUT.json and .md.

- A real etcd (Debian's etcd-server) on 127.0.0.1:23790, with a data directory of the run's
  own, auto-compaction by revision (keep 1,000) and an 8 GiB quota: the settings the README
  gives a fleet.
- FLEET_APPS (200,000) app keys under /flyproxy/apps/ (one key per app, its JSON as value;
  written in transactions of 128 puts through etcd's JSON gateway), apps as `make scale`'s,
  its `catchall` app included.
- FLEET_NODES (3) nodes on loopback: each a network namespace of its own (held by its echo
  targets) with its proxy (`flyproxy simple -c DIR`), and its follower in the bench's namespace
  (beside etcd): `flyproxy-etcd-sync --prefix /flyproxy/apps/ --dir DIR`, etcd's address in
  `ETCDCTL_ENDPOINTS` (and `--endpoints URL` too where the follower lists that option), with
  `--status-file` where it has one.
  The measures then, each node's as seen from inside its namespace:
  - sync: followers started on empty directories: time until each directory holds every app;
    then each proxy's start to its first connection through the last app;
  - one put: a new app's key put; time until each node relays a connection through it (a probe
    per node tries every 5 ms); FLEET_PUT_TRIES times;
  - churn: FLEET_PUTS puts per second (one app changed each) for FLEET_SECONDS s: each node's
    proxy + follower CPU (% of a core, utime+stime from /proc), and a probe per node through
    an unchanged app every 5 ms (its longest wait, and how many over 10 ms);
  - a bad put (an app's value with `Tragets` for `Targets`): after 5 s, whether each node's
    file of that app is unchanged, its follower's log and status file name the app, and it still relays
    through that app; then a node's proxy restarted: whether it serves that app.
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
    CATCHALL, TARGETS, WORK, echo_once, env_int, log, make_apps, proc_cpu, swapped, v4,
)

BIN = os.path.join(WORK, "bin", "flyproxy")
SYNC = os.path.join(WORK, "bin", "flyproxy-etcd-sync")
ECHO = os.path.join(WORK, "bin", "echo")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
APPS = env_int("FLEET_APPS", 200_000)
NODES = env_int("FLEET_NODES", 3)
PUTS = env_int("FLEET_PUTS", 10)
SECONDS = env_int("FLEET_SECONDS", 60)
PUT_TRIES = env_int("FLEET_PUT_TRIES", 5)
OUT = os.environ.get("FLEET_OUT") or os.path.join(REPO, "bench", "scale-fleet-results")
PREFIX = "/flyproxy/apps/"
ETCD = "http://127.0.0.1:23790"
CLONE_NEWNET = 0x40000000
libc = ctypes.CDLL("libc.so.6", use_errno=True)


def b64(s):
    return base64.b64encode(s.encode()).decode()


def etcd_call(path, body, timeout=30):
    req = urllib.request.Request(ETCD + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def put(app):
    etcd_call("/v3/kv/put", {"key": b64(PREFIX + app["Name"]), "value": b64(json.dumps(app))})


def put_all(apps):
    for i in range(0, len(apps), 128):
        ops = [{"requestPut": {"key": b64(PREFIX + a["Name"]), "value": b64(json.dumps(a))}}
               for a in apps[i:i + 128]]
        etcd_call("/v3/kv/txn", {"success": ops})


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


class Node:
    def __init__(self, k):
        self.k = k
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
        args = [SYNC, "--prefix", PREFIX, "--dir", self.dir]
        if "--endpoints" in help_text:
            args += ["--endpoints", ETCD]
        if "--status-file" in help_text:
            args += ["--status-file", self.status_path]
        self.sync = subprocess.Popen(args, stdout=self.sync_log, stderr=self.sync_log,
                                     env=dict(os.environ, ETCDCTL_ENDPOINTS=ETCD))

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

    def serving(self, i):
        """Whether a line comes back through app i; an exited proxy is an error, with its words."""
        if self.proxy.poll() is not None:
            with open(self.proxy_log_path, "rb") as f:
                said = [x.split(" ", 1)[-1] for x in f.read().decode("utf-8", "replace").splitlines()
                        if "exiting with status" not in x]
            raise RuntimeError(f"node {self.k}'s proxy exited ({self.proxy.returncode}) at start "
                               f"on -c DIR: " + " / ".join(said[-3:])[:400])
        return self.echo_through(i) >= 0

    def cpu(self):
        return proc_cpu(self.proxy.pid) + proc_cpu(self.sync.pid)

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


def each_node(nodes, what, timeout, ok, since):
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
            raise RuntimeError(f"nodes {[k for k, d in enumerate(done) if d is None]}: "
                               f"not {what} within {timeout:.0f} s")
        time.sleep(0.005)
    return done


class NodeProbe:
    """Every 5 ms, a connection through app i of a node, from inside its namespace."""

    def __init__(self, node, i):
        self.waits, self.failed, self.stopping = [], 0, threading.Event()
        self.t = threading.Thread(target=self.run, args=(node, i), daemon=True)
        self.t.start()

    def run(self, node, i):
        fd = os.open(f"/proc/{node.echo.pid}/ns/net", os.O_RDONLY)
        libc.setns(fd, CLONE_NEWNET)
        os.close(fd)
        while not self.stopping.is_set():
            try:
                self.waits.append(echo_once((v4(i), PORT_OF[i]), timeout=30))
            except OSError:
                self.failed += 1
            time.sleep(0.005)

    def stop(self):
        self.stopping.set()
        self.t.join()
        w = sorted(self.waits)
        return {"probes": len(w), "max_ms": round(w[-1] * 1e3, 2) if w else None,
                "over_10ms": sum(1 for x in w if x > 0.010), "failed": self.failed}


def report(res):
    with open(OUT + ".json", "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    md = [f"# flyproxy fleet: {res['apps']:,} app keys, {res['nodes']} nodes", "",
          f"flyproxy {res.get('flyproxy')}, {res.get('date')}. `make scale-fleet` "
          "(bench/scale/fleet.py).", ""]
    if "skipped" in res:
        md += [f"Skipped: {res['skipped']}", ""]
    if "error" in res:
        md += [f"**Failed**: {res['error']}", ""]
    churn = res.get("churn", {})
    rows = [
        ("synced from empty (s)", res.get("sync_s")),
        ("proxy start to the last app served (s)", res.get("proxy_start_s")),
        (f"proxy + follower CPU, {churn.get('puts')} puts in {churn.get('seconds')} s (% of a core)",
         churn.get("cpu_pct")),
        ("probe's longest wait during the puts (ms)",
         [p.get("max_ms") for p in churn.get("probe", [])] or None),
        ("probe connections over 10 ms / made",
         [f"{p.get('over_10ms')} / {p.get('probes')}" for p in churn.get("probe", [])] or None),
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
                      ("restart_after_bad_put_serves", "node 0 restarted after the bad put serves the app")]:
        if key in res:
            md.append(f"- {what}: {res[key]}")
    md.append("")
    with open(OUT + ".md", "w") as f:
        f.write("\n".join(md))


def main():
    res = {"apps": APPS, "nodes": NODES, "flyproxy": os.environ.get("FLYPROXY_REV", "?"),
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
    data = os.path.join(WORK, "etcd")
    etcd = subprocess.Popen(
        ["etcd", "--name", "fleet", "--data-dir", data,
         "--listen-client-urls", ETCD, "--advertise-client-urls", ETCD,
         "--listen-peer-urls", "http://127.0.0.1:23800",
         "--initial-advertise-peer-urls", "http://127.0.0.1:23800",
         "--initial-cluster", "fleet=http://127.0.0.1:23800",
         "--auto-compaction-mode", "revision", "--auto-compaction-retention", "1000",
         "--quota-backend-bytes", str(8 << 30)],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(WORK, "etcd.log"), "wb"))
    nodes = []
    try:
        wait_until("etcd answering", 30, lambda: etcd_call("/v3/kv/range", {"key": b64("x")}) or True,
                   every=0.1)
        apps = make_apps(APPS)
        for i, a in enumerate(apps):
            PORT_OF[i] = a["Ports"][0]
        t0 = time.monotonic()
        put_all(apps + [CATCHALL])
        res["put_all_s"] = round(time.monotonic() - t0, 1)
        log(f"fleet: {APPS:,} keys put in {res['put_all_s']} s")
        nodes = [Node(k) for k in range(NODES)]
        t0 = time.monotonic()
        for n in nodes:
            n.start_sync(help_text)
        res["sync_s"] = [round(x, 1) for x in each_node(
            nodes, "synced from empty", 600 + APPS / 100, lambda n: n.count() >= APPS + 1, [t0] * NODES)]
        log(f"fleet: synced from empty: {res['sync_s']} s")
        for n in nodes:
            n.start_proxy()
        res["proxy_start_s"] = [round(x, 2) for x in each_node(
            nodes, "serving the last app", 300 + APPS / 500,
            lambda n: n.serving(APPS - 1), [n.t_proxy for n in nodes])]
        log(f"fleet: proxies serving after {res['proxy_start_s']} s")
        # One put, served by every node.
        served = []
        for t in range(PUT_TRIES):
            i = APPS + t
            app = make_apps(APPS + t + 1)[i]
            PORT_OF[i] = app["Ports"][0]
            t0 = time.monotonic()
            put(app)
            times = each_node(nodes, "serving a new app", 30,
                              lambda n: n.echo_through(i, 1.0) >= 0, [t0] * NODES)
            served.append(round(max(times) * 1e3, 1))
        res["one_put_served_by_all_ms"] = served
        log(f"fleet: one put served by all nodes within {served} ms")
        # Churn.
        probes = [NodeProbe(n, 1) for n in nodes]
        c0, t0 = [n.cpu() for n in nodes], time.monotonic()
        k = 0
        while time.monotonic() - t0 < SECONDS:
            i = 2 + (k * 7919) % (APPS - 2)
            apps[i] = swapped(apps[i])
            put(apps[i])
            k += 1
            time.sleep(max(0.0, t0 + k / PUTS - time.monotonic()))
        dt = time.monotonic() - t0
        res["churn"] = {
            "puts": k, "seconds": round(dt, 1),
            "cpu_pct": [round((n.cpu() - c) / dt * 100, 2) for n, c in zip(nodes, c0)],
            "probe": [p.stop() for p in probes],
        }
        log(f"fleet: churn {res['churn']}")
        # A bad put.
        victim = apps[3]
        before = [open(os.path.join(n.dir, victim["Name"] + ".json"), "rb").read() for n in nodes]
        logged_before = [os.path.getsize(n.sync_log.name) for n in nodes]
        bad = dict(victim)
        bad["Tragets"] = bad.pop("Targets")
        etcd_call("/v3/kv/put", {"key": b64(PREFIX + victim["Name"]), "value": b64(json.dumps(bad))})
        time.sleep(5)
        res["bad_put"] = []
        for n, b, at in zip(nodes, before, logged_before):
            after = open(os.path.join(n.dir, victim["Name"] + ".json"), "rb").read()
            with open(n.sync_log.name, "rb") as f:
                f.seek(at)
                said = f.read().decode("utf-8", "replace")
            try:
                serving = n.echo_through(3) >= 0
            except OSError:
                serving = False
            status = ""
            if os.path.exists(n.status_path):
                with open(n.status_path) as f:
                    status = f.read()
            res["bad_put"].append({"file_unchanged": after == b,
                                   "follower_logged": victim["Name"] in said,
                                   "in_status_file": victim["Name"] in status,
                                   "still_serving": serving})
        n = nodes[0]
        n.proxy.send_signal(signal.SIGTERM)
        n.proxy.wait(30)
        n.start_proxy()
        try:
            wait_until("restarted node serving", 300 + APPS / 500, lambda: n.echo_through(3) >= 0)
            res["restart_after_bad_put_serves"] = True
        except RuntimeError:
            res["restart_after_bad_put_serves"] = False
        log(f"fleet: bad put {res['bad_put']}, restart serves: {res['restart_after_bad_put_serves']}")
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
        etcd.terminate()
        etcd.wait()


if __name__ == "__main__":
    # Stopped (Ctrl-C, TERM): unwind, so that every process started here is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
