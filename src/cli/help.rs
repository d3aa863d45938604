//! The help texts, one per command; the options both modes share are one literal that each
//! mode's text `concat!`s, so that they cannot drift apart.

pub const HELP: &str = "\
flyproxy - a layer-4 TCP proxy and load balancer

Usage:
  flyproxy simple [OPTIONS]           one listener per configured port
  flyproxy bpf [-p PORT] [OPTIONS]    one listener; eBPF sk_lookup steers every port to it
  flyproxy check [-c PATH]            validate a config file and exit
  flyproxy upgrade --pid-file PATH    replace the running binary without refusing a connection
  flyproxy status [--metrics ADDR]    show apps, targets, health and open connections of a
                                      proxy running with --metrics (default 127.0.0.1:9089)
  flyproxy ctl [-s PATH] COMMAND...   steer a running proxy through its --admin-socket
                                      (drain a target, disable an app, list connections...)

Run 'flyproxy <command> --help' for the options of each command.

  -h, --help       print this help
  -V, --version    print the version
";

/// The options both modes share, as one literal so that each help text can `concat!` it.
macro_rules! run_options {
    () => {
        "  -c, --config PATH          config file, or a directory of *.json files (default ./config.json)
      --max-connections N    open client connections at most; beyond it new ones wait
                             in the kernel backlog (default 4096)
      --max-threads N        relay threads at most; idle connections hold none, and
                             busy ones take turns beyond it (default: --max-connections)
      --max-connections-per-client N
                             open connections one client address (IPv6: one /64) may
                             have; past it new ones are closed at once (default 0: no
                             limit)
      --connect-timeout DUR  time to look up and connect to one target (default 5s)
      --dns-ttl DUR          how long a target name's addresses are kept once looked
                             up (default 10s; 0: look up at every connect); failed
                             lookups are kept 1s
      --idle-timeout DUR     close a connection that moved no byte for this long
                             (default 1h; 0 disables)
      --drain-timeout DUR    how long open connections may finish after their port is
                             removed or on SIGTERM (default 30s)
      --preread-timeout DUR  on a port where apps have Hostnames, how long a client may
                             take to send its whole TLS ClientHello (default 5s)
      --reload-interval DUR  how often the config file's mtime is checked (default 1s)
      --log-level LEVEL      error, warn, info or debug (default info)
      --log-format FORMAT    text or json (default text)
      --log-file PATH        write the log to PATH instead of stderr; SIGUSR1 reopens it
      --access-log WHERE     where the per-connection 'conn' lines go: off, stderr or a
                             file PATH (default: with the log, as --log-level allows;
                             elsewhere, whatever the level); SIGUSR1 reopens a file
      --metrics ADDR         serve Prometheus /metrics and a /status page on ADDR,
                             e.g. 127.0.0.1:9089 (default: off)
      --metrics-target-series N
                             serve per-target series in /metrics while the config has
                             at most N targets (default 10000); past it, per-app
                             series only, and /metrics?app=NAME for one app's all
      --metrics-app-series N
                             serve per-app series in /metrics while the config has at
                             most N apps (default 10000); past it, each per-app family
                             is one series of every app's sum
      --pid-file PATH        write the pid here once serving; an upgrade rewrites it
      --admin-socket PATH    serve the admin socket (flyproxy ctl) at PATH, mode 0660,
                             owned by --user and --group (default: off)
      --state-file PATH      keep what was set through the admin socket (target states
                             and weights, disabled apps) in PATH across restarts
      --user USER            once set up, run as USER (a name or uid; needs root)
      --group GROUP          with --user: run as GROUP (default: USER's primary group)
  -h, --help                 print this help
  -V, --version              print the version

DUR is a number with a unit: 250ms, 30s, 5m, 1h.
"
    };
}

pub const SIMPLE_HELP: &str = concat!(
    "flyproxy simple - one listener per configured port\n\n",
    "Usage: flyproxy simple [OPTIONS]\n\nOptions:\n",
    run_options!(),
    "Signals: SIGHUP reloads the config now; SIGTERM, SIGINT or SIGQUIT drains and exits\n",
    "(a second one exits at once); SIGUSR1 reopens the log files; SIGUSR2 upgrades to the\n",
    "binary now at the same path. SIGWINCH, SIGPIPE and SIGALRM are ignored.\n",
);

pub const BPF_HELP: &str = concat!(
    "flyproxy bpf - one listener; an eBPF sk_lookup program steers every configured port to it\n\n",
    "Usage: flyproxy bpf [-p PORT] [--bind ADDR] [OPTIONS]\n\n",
    "Needs CAP_BPF and CAP_NET_ADMIN (root) and Linux 5.9 or later.\n\nOptions:\n",
    "  -p, --port PORT            port of the listener itself (default 8000)\n",
    "      --bind ADDR            address of the listener (default: all, IPv4 and IPv6)\n",
    run_options!(),
    "Signals: SIGHUP reloads the config now; SIGTERM, SIGINT or SIGQUIT stops steering,\n",
    "drains and exits (a second one exits at once); SIGUSR1 reopens the log files; SIGUSR2\n",
    "upgrades to the binary now at the same path. SIGWINCH, SIGPIPE and SIGALRM are ignored.\n",
);

pub const UPGRADE_HELP: &str = "\
flyproxy upgrade - replace a running proxy with the binary now at its path, without
refusing a connection

Usage: flyproxy upgrade --pid-file PATH

Sends SIGUSR2 to the proxy whose pid is in PATH (started with --pid-file PATH). It starts the
binary anew with its listening sockets; once the new process serves, the old one stops
accepting and lets its open connections finish (up to its --drain-timeout). If the new
process fails to start, the old one carries on.

Options:
      --pid-file PATH  the running proxy's pid file
  -h, --help           print this help
  -V, --version        print the version
";

pub const STATUS_HELP: &str = "\
flyproxy status - show a running proxy's apps, ports, targets, health and open connections

Usage: flyproxy status [--metrics ADDR] [--app NAME]

Reads /status.json from a proxy run with --metrics ADDR and prints it as /status shows it
(the first 1000 apps, and how many there are); exits 1 if no flyproxy answers. Port 9089 is
off 9100-9999, the exporters' (9100: node_exporter).

Options:
      --metrics ADDR  the proxy's --metrics address (default 127.0.0.1:9089)
      --app NAME      only this app (exits 1 if the proxy has no app of that name)
  -h, --help          print this help
  -V, --version       print the version
";

pub const CTL_HELP: &str = "\
flyproxy ctl - steer a running proxy through its admin socket

Usage: flyproxy ctl [-s PATH] COMMAND...

Sends COMMAND (the words after the options, as one line) to the admin socket of a proxy run
with --admin-socket PATH and prints the answer; exits 1, with the error on stderr, if the
answer is an error or no proxy answers. 'flyproxy ctl help' lists the commands:

  show apps | show targets [APP] | show conns [APP [TARGET]] | show config | show state
  set target APP TARGET state ready|drain|maint | set target APP TARGET weight N
  disable app APP | enable app APP | kill conn ID | kill conns APP [TARGET] | reload

Options:
  -s, --socket PATH  the proxy's --admin-socket (default /run/flyproxy/admin.sock)
  -h, --help         print this help
  -V, --version      print the version
";

pub const CHECK_HELP: &str = "\
flyproxy check - validate a config file

Usage: flyproxy check [-c PATH]

Prints a one-line summary and exits 0 if the file is valid; prints every problem
found and exits 1 if not.

Options:
  -c, --config PATH   config file, or a directory of *.json files (default ./config.json)
  -h, --help          print this help
  -V, --version       print the version
";
