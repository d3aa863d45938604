//! Packaging and running as a service: the Debian package (`make deb`: `dpkg-buildpackage` on
//! the source package in `debian/`), the systemd units in `dist/`, readiness notification
//! (`NOTIFY_SOCKET`) and the capabilities left after start-up.
//!
//! - The package tests need a release build, which is slow: they run when
//!   `FLYPROXY_PACKAGING_TESTS=1` or `CI` is set (`make test` builds the package first then, so
//!   the build does not compete with the other tests), and print why they skip otherwise. They
//!   check that dpkg-buildpackage built it and lintian finds no error nor warning, and inspect it
//!   without installing it; in CI, as root, they also install it with `dpkg -i` and purge it
//!   again (never over a flyproxy package already installed).
//! - The unit files are checked with `systemd-analyze verify` always (against the debug binary),
//!   and the proxy is started with the command line a unit's `ExecStart=` gives with the options
//!   of `/etc/default/flyproxy` (systemd is not PID 1 in every test machine, so the units are
//!   not started with systemd itself).
//! - The notify and capability tests run the debug binary like the other integration tests.
//!   The capability ones need root (skipped without it, failing in CI): simple mode started as
//!   root, and both modes run as `nobody` with exactly the capabilities their unit grants
//!   (`setpriv`, in a network namespace of their own), through a reload and a SIGUSR2 upgrade.

mod common;
#[allow(dead_code)]
mod netns;

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{app, config, free_port, in_ci, is_root, Backend, Proxy, TempDir, BIN, WAIT};

/// Where `make deb` leaves the package and what dpkg-buildpackage wrote with it.
const DEB_DIR: &str = "target/debian";

const VERSION: &str = env!("CARGO_PKG_VERSION");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_ADMIN: u32 = 12;
const CAP_BPF: u32 = 39;

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Whether the (slow) package tests run; prints why not.
fn packaging_enabled(test: &str) -> bool {
    if env_set("FLYPROXY_PACKAGING_TESTS") || in_ci() {
        return true;
    }
    eprintln!(
        "skipping {test}: builds the release package; set FLYPROXY_PACKAGING_TESTS=1 (or CI) to run it"
    );
    false
}

/// A test that cannot run here: skipped with a message, or a failure in CI.
fn cannot_run(test: &str, why: &str) {
    if in_ci() {
        panic!("{test}: cannot run in CI (CI is set, so this is a failure): {why}");
    }
    eprintln!("skipping {test}: {why}");
}

fn run(cmd: &mut Command) -> Output {
    let out = spawn(cmd);
    succeeded(cmd, out)
}

/// `cmd` run to its end, stdin empty, whatever its status.
fn spawn(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

/// `out` of `cmd`, which must have succeeded (else its output is the failure's message).
fn succeeded(cmd: &Command, out: Output) -> Output {
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).unwrap()
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// ---------------------------------------------------------------------------------------------
// The package

/// Run `make deb` and copy the package into `dir`, with the other files dpkg-buildpackage wrote
/// (the .changes and the .buildinfo) and the source package (.dsc, .tar.xz) beside it. An exclusive lock on a file
/// in target/ keeps tests in parallel processes from building the same files at once.
fn build_deb(dir: &Path) -> PathBuf {
    let lock_path = Path::new(ROOT).join("target").join(".packaging-test.lock");
    fs::create_dir_all(lock_path.parent().unwrap()).unwrap();
    let lock = fs::File::create(&lock_path).unwrap();
    // SAFETY: flock on a file we hold open; released when it closes.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let mut make = Command::new("make");
    make.arg("--no-print-directory")
        .arg("deb")
        .current_dir(ROOT);
    // What cargo sets for this test process describes this crate to a build script; the nested
    // build gets its own from cargo.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || key.starts_with("CARGO_CRATE_")
            || key == "CARGO_MANIFEST_DIR"
            || key == "CARGO_PRIMARY_PACKAGE"
        {
            make.env_remove(key.as_ref());
        }
    }
    let out = stdout(&mut make);
    let built = out
        .lines()
        .last()
        .map(|l| Path::new(ROOT).join(l.trim()))
        .expect("make deb prints the package's path last");
    let arch = stdout(Command::new("dpkg").arg("--print-architecture"));
    let arch = arch.trim();
    assert_eq!(
        built,
        Path::new(ROOT)
            .join(DEB_DIR)
            .join(format!("flyproxy_{VERSION}_{arch}.deb"))
    );
    for name in [
        format!("flyproxy_{VERSION}_{arch}.changes"),
        format!("flyproxy_{VERSION}_{arch}.buildinfo"),
        format!("flyproxy_{VERSION}.dsc"),
        format!("flyproxy_{VERSION}.tar.xz"),
    ] {
        let from = built.with_file_name(&name);
        fs::copy(&from, dir.join(&name)).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (written by dpkg-buildpackage?)\n{out}",
                from.display()
            )
        });
    }
    let copy = dir.join(built.file_name().unwrap());
    fs::copy(&built, &copy).unwrap();
    copy
}

/// The files the package installs (directories left out), and their owners.
const FILES: &[&str] = &[
    "/etc/default/flyproxy",
    "/etc/default/flyproxy-etcd-sync",
    "/etc/flyproxy/config.json",
    "/lib/systemd/system/flyproxy-bpf.service",
    "/lib/systemd/system/flyproxy-etcd-sync.service",
    "/lib/systemd/system/flyproxy.service",
    "/usr/bin/flyproxy",
    "/usr/bin/flyproxy-etcd-sync",
    "/usr/share/doc/flyproxy/README.md.gz",
    "/usr/share/doc/flyproxy/changelog.gz",
    "/usr/share/doc/flyproxy/copyright",
    "/usr/share/lintian/overrides/flyproxy",
    "/usr/share/man/man1/flyproxy-etcd-sync.1.gz",
    "/usr/share/man/man1/flyproxy.1.gz",
];

/// The conffiles: the config and the settings in /etc/default.
const CONFFILES: &[&str] = &[
    "/etc/default/flyproxy",
    "/etc/default/flyproxy-etcd-sync",
    "/etc/flyproxy/config.json",
];

/// The package's origin, lintian's verdict, control fields, file list, maintainer scripts and
/// contents, without installing it: the binary runs and validates the shipped config, the units
/// verify and pass /etc/default/flyproxy's options to the proxy, both man pages render without
/// warnings and name every option of every command.
#[test]
fn deb_package_contents() {
    if !packaging_enabled("deb_package_contents") {
        return;
    }
    let dir = TempDir::new("deb");
    let deb = build_deb(&dir.path);
    let changes = deb_built_by_dpkg_buildpackage(&deb);
    let dsc = dir.path.join(format!("flyproxy_{VERSION}.dsc"));
    deb_source_package(&dsc);
    deb_lintian_clean(&[&changes, &dsc]);
    deb_control_fields(&deb);
    deb_files(&deb);
    deb_control_area(&deb, &dir.path.join("control"));
    deb_contents(&deb, &dir.path.join("root"));
}

/// dpkg-buildpackage built the package: its .changes (from dpkg-genchanges) names the source
/// package and lists this very .deb, by size and SHA-256; a .buildinfo was written with it.
/// Returns the .changes.
fn deb_built_by_dpkg_buildpackage(deb: &Path) -> PathBuf {
    let name = deb.file_name().unwrap().to_str().unwrap();
    let changes = deb.with_extension("changes");
    let text = fs::read_to_string(&changes).unwrap();
    let field = |f: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{f}: ")))
            .unwrap_or_else(|| panic!("no {f} in {}:\n{text}", changes.display()))
            .to_owned()
    };
    assert_eq!(field("Source"), "flyproxy");
    assert_eq!(field("Version"), VERSION);
    assert!(
        field("Binary").split_whitespace().any(|b| b == "flyproxy"),
        "{text}"
    );
    let sha256 = stdout(Command::new("sha256sum").arg(deb));
    let sha256 = sha256.split_whitespace().next().unwrap();
    let size = fs::metadata(deb).unwrap().len();
    let listed = format!(" {sha256} {size} {name}");
    assert!(
        text.lines().any(|l| l == listed),
        "{} does not list this package ({listed}):\n{text}",
        changes.display()
    );
    let buildinfo = fs::read_to_string(deb.with_extension("buildinfo")).unwrap();
    assert!(buildinfo.contains("\nSource: flyproxy\n"), "{buildinfo}");
    changes
}

/// The source package unpacks (its checksums match) into a tree with debian/ and the crate,
/// and without cargo's build directories.
fn deb_source_package(dsc: &Path) {
    let dir = TempDir::new("deb-source");
    let tree = dir.path.join("flyproxy");
    run(Command::new("dpkg-source").arg("-x").arg(dsc).arg(&tree));
    for f in [
        "debian/control",
        "debian/rules",
        "Cargo.toml",
        "Cargo.lock",
        "src/main.rs",
    ] {
        assert!(tree.join(f).exists(), "{f} is not in the source package");
    }
    assert!(
        !tree.join("target").exists(),
        "target/ is in the source package"
    );
}

/// lintian, on the .changes (so on the package and the .buildinfo) and on the source package,
/// finds no error and no warning. Overrides, each with its reason, are in debian/ (the package
/// installs them where lintian finds them).
fn deb_lintian_clean(files: &[&Path]) {
    let out = Command::new("lintian")
        .args(["--fail-on", "error,warning"])
        .args(files)
        .output()
        .expect("run lintian (apt install lintian)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("E: ") || l.starts_with("W: "))
        .collect();
    assert!(
        out.status.success() && problems.is_empty(),
        "lintian {files:?}: {}:\n{text}",
        out.status
    );
}

/// The control fields: name, version, architecture, dependencies, description.
fn deb_control_fields(deb: &Path) {
    let field = |name: &str| stdout(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name));
    assert_eq!(field("Package").trim(), "flyproxy");
    assert_eq!(field("Version").trim(), VERSION);
    let arch = stdout(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(field("Architecture").trim(), arch.trim());
    let depends = field("Depends");
    for lib in ["libc6", "libelf1", "zlib1g"] {
        assert!(depends.contains(lib), "Depends: {depends}");
    }
    assert!(!field("Maintainer").trim().is_empty());
    assert!(field("Description").contains("TCP proxy"));
    assert_eq!(field("Suggests").trim(), "etcd-client");
}

/// Every file, owned by root; nothing else.
fn deb_files(deb: &Path) {
    let listing = stdout(Command::new("dpkg-deb").arg("-c").arg(deb));
    let mut files = BTreeSet::new();
    for line in listing.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols.get(1), Some(&"root/root"), "{line}");
        let path = cols.last().unwrap().trim_start_matches('.');
        if !line.starts_with('d') {
            files.insert(path.to_owned());
        }
    }
    let expected: BTreeSet<String> = FILES.iter().map(|s| s.to_string()).collect();
    assert_eq!(files, expected, "files in the package");
}

/// Control area: the config and both settings files in /etc/default are conffiles; the
/// maintainer scripts are executable and start nothing.
fn deb_control_area(deb: &Path, control: &Path) {
    run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(control));
    let conffiles = fs::read_to_string(control.join("conffiles")).unwrap();
    let mut listed: Vec<&str> = conffiles.lines().collect();
    listed.sort_unstable();
    assert_eq!(listed, CONFFILES, "conffiles:\n{conffiles}");
    for script in ["postinst", "prerm", "postrm"] {
        let path = control.join(script);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "{script}");
        run(Command::new("sh").arg("-n").arg(&path));
        let text = fs::read_to_string(&path).unwrap();
        let commands = shell_commands(&text);
        let lines: Vec<&str> = commands
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        for (i, line) in lines.iter().enumerate() {
            for word in [
                "enable",
                "start",
                "restart",
                "try-restart",
                "reload-or-restart",
            ] {
                if !line.split_whitespace().any(|w| w == word) {
                    continue;
                }
                // dh_installsystemd --no-enable's one exception: the links of a unit that the
                // administrator had enabled are made again (on an upgrade, after a rename).
                let unit = line.strip_prefix("deb-systemd-helper enable ");
                let re_enable = unit
                    .and_then(|u| u.split_whitespace().next())
                    .is_some_and(|u| {
                        i > 0
                            && lines[i - 1]
                                == format!("if deb-systemd-helper --quiet was-enabled {u}; then")
                    });
                assert!(
                    word == "enable" && re_enable,
                    "{script} must not enable or start a service ('{word}' in {line:?}):\n{text}"
                );
            }
        }
    }
}

/// The contents.
fn deb_contents(deb: &Path, root: &Path) {
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root));
    let bin = root.join("usr/bin/flyproxy");
    assert_eq!(
        stdout(Command::new(&bin).arg("--version")).trim(),
        format!("flyproxy {VERSION}")
    );
    let check = stdout(
        Command::new(&bin)
            .arg("check")
            .arg("-c")
            .arg(root.join("etc/flyproxy/config.json")),
    );
    assert!(check.contains(": ok: "), "{check}");
    let sync = root.join("usr/bin/flyproxy-etcd-sync");
    assert_eq!(
        stdout(Command::new(&sync).arg("--version")).trim(),
        format!("flyproxy-etcd-sync {VERSION}")
    );
    for b in [&bin, &sync] {
        let sections = stdout(Command::new("readelf").arg("-S").arg(b));
        assert!(
            !sections.contains(".symtab"),
            "{} is not stripped",
            b.display()
        );
    }
    // The follower's settings may hold etcd credentials: root only. The proxy's options are
    // no secret.
    let mode = |path: &str| fs::metadata(root.join(path)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("etc/default/flyproxy-etcd-sync"), 0o600);
    assert_eq!(mode("etc/default/flyproxy"), 0o644);

    let man = root.join("usr/share/man");
    let units = root.join("lib/systemd/system");
    verify_units(&units, &bin, &man);
    check_man_page(&man.join("man1/flyproxy.1.gz"), &bin);
    check_sync_man_page(&man.join("man1/flyproxy-etcd-sync.1.gz"), &sync);
    options_reach_the_proxy(&units, &root.join("etc/default/flyproxy"), &bin);
}

/// A shell script without its comments and quoted strings (messages), leaving the commands.
fn shell_commands(script: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    for line in script.lines() {
        if !quoted && line.trim_start().starts_with('#') {
            continue;
        }
        for c in line.chars() {
            match c {
                '"' => quoted = !quoted,
                _ if !quoted => out.push(c),
                _ => {}
            }
        }
        out.push('\n');
    }
    out
}

/// In CI, as root: install the package for real, check what is installed, reinstall over a
/// changed config (kept: it is a conffile), remove (config stays) and purge (nothing stays).
#[test]
fn deb_installs_and_purges() {
    if !packaging_enabled("deb_installs_and_purges") {
        return;
    }
    if !in_ci() && !env_set("FLYPROXY_PACKAGING_INSTALL") {
        eprintln!(
            "skipping deb_installs_and_purges: installs into this machine; runs in CI, or set \
             FLYPROXY_PACKAGING_INSTALL=1"
        );
        return;
    }
    if !is_root() {
        cannot_run("deb_installs_and_purges", "dpkg -i needs root");
        return;
    }
    let status = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "flyproxy"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    if status.contains("installed") || status.contains("config-files") {
        eprintln!(
            "skipping deb_installs_and_purges: a flyproxy package is already here ({status})"
        );
        return;
    }

    let dir = TempDir::new("deb-install");
    let deb = build_deb(&dir.path);
    /// Purges the package if the test fails half-way.
    struct Purge;
    impl Drop for Purge {
        fn drop(&mut self) {
            let _ = Command::new("dpkg")
                .args(["--purge", "flyproxy"])
                .stdout(Stdio::null())
                .status();
        }
    }
    let _purge = Purge;
    // dpkg refuses at once while another dpkg or apt holds its lock (an unattended upgrade, a
    // package install elsewhere on the machine, another checkout's test run): wait for the
    // lock, up to a deadline, as `apt-get -o DPkg::Lock::Timeout` would, rather than fail.
    let dpkg = |args: &[&str]| {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let mut cmd = Command::new("dpkg");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        loop {
            let out = spawn(&mut cmd);
            let locked = String::from_utf8_lossy(&out.stderr).contains("locked by another process");
            if out.status.success() || !locked || std::time::Instant::now() > deadline {
                break succeeded(&cmd, out);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    };

    dpkg(&["-i", deb.to_str().unwrap()]);
    let status =
        stdout(Command::new("dpkg-query").args(["-W", "-f=${Status} ${Version}", "flyproxy"]));
    assert_eq!(status, format!("install ok installed {VERSION}"));
    for f in FILES {
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    assert_nothing_enabled();
    assert_eq!(
        stdout(Command::new("/usr/bin/flyproxy").arg("--version")).trim(),
        format!("flyproxy {VERSION}")
    );
    run(Command::new("/usr/bin/flyproxy").args(["check", "-c", "/etc/flyproxy/config.json"]));
    verify_units(
        Path::new("/lib/systemd/system"),
        Path::new("/usr/bin/flyproxy"),
        Path::new("/usr/share/man"),
    );

    // A changed conffile survives a reinstall.
    let mine = "{\"Apps\": [{\"Name\": \"mine\", \"Ports\": [18090], \"Targets\": [\"127.0.0.1:18091\"]}]}\n";
    fs::write("/etc/flyproxy/config.json", mine).unwrap();
    dpkg(&["-i", "--force-confold", deb.to_str().unwrap()]);
    assert_eq!(
        fs::read_to_string("/etc/flyproxy/config.json").unwrap(),
        mine
    );

    dpkg(&["-r", "flyproxy"]);
    assert!(!Path::new("/usr/bin/flyproxy").exists());
    assert!(!Path::new("/lib/systemd/system/flyproxy.service").exists());
    assert!(
        Path::new("/etc/flyproxy/config.json").exists(),
        "remove keeps the config"
    );

    dpkg(&["--purge", "flyproxy"]);
    assert!(
        !Path::new("/etc/flyproxy").exists(),
        "purge removes /etc/flyproxy"
    );
    assert!(
        !Path::new("/etc/default/flyproxy-etcd-sync").exists(),
        "purge removes the follower's settings"
    );
    assert!(
        !Path::new("/etc/default/flyproxy").exists(),
        "purge removes the proxy's options"
    );
    let left = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "flyproxy"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains("installed"),
        "still known to dpkg after purge"
    );
}

/// Installing enabled no unit: no link to a flyproxy unit anywhere under /etc/systemd/system.
fn assert_nothing_enabled() {
    let mut found = Vec::new();
    let mut dirs = vec![PathBuf::from("/etc/systemd/system")];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                dirs.push(path);
            } else if kind.is_symlink()
                && entry.file_name().to_string_lossy().starts_with("flyproxy")
            {
                found.push(path.display().to_string());
            }
        }
    }
    assert!(found.is_empty(), "installing enabled units: {found:?}");
}

/// `systemd-analyze verify` on the units in `unit_dir`, with their `/usr/bin/flyproxy` replaced
/// by `bin` (unless it is that; the follower's `/usr/bin/flyproxy-etcd-sync` becomes the binary
/// of that name beside `bin`) and the man page looked up in `man_dir` (the units'
/// `Documentation=man:flyproxy(1)` is checked too). Any message about our units fails.
fn verify_units(unit_dir: &Path, bin: &Path, man_dir: &Path) {
    let dir = TempDir::new("units");
    let mut units = Vec::new();
    for (name, exec) in [
        ("flyproxy.service", "/usr/bin/flyproxy "),
        ("flyproxy-bpf.service", "/usr/bin/flyproxy "),
        (
            "flyproxy-etcd-sync.service",
            "/usr/bin/flyproxy-etcd-sync\n",
        ),
    ] {
        let text = fs::read_to_string(unit_dir.join(name)).unwrap();
        assert!(
            text.contains(&format!("ExecStart={exec}")),
            "{name}: ExecStart"
        );
        let text = text.replace("/usr/bin/flyproxy", bin.to_str().unwrap());
        units.push(dir.write(name, &text));
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .env("MANPATH", man_dir)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("flyproxy"),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}

/// The man page renders without warnings, and names every command and every long option that
/// the binary's help texts list.
fn check_man_page(gz: &Path, bin: &Path) {
    let source = render_man_page(gz);
    let help = stdout(Command::new(bin).arg("--help"));
    let commands: Vec<String> = help
        .lines()
        .filter_map(|l| l.trim().strip_prefix("flyproxy "))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|c| c.chars().all(|ch| ch.is_ascii_lowercase()))
        .map(str::to_owned)
        .collect();
    assert!(
        commands.len() >= 3,
        "commands in --help: {commands:?}\n{help}"
    );
    for command in &commands {
        assert!(
            source.contains(&format!(".B {command}\n")),
            "the man page does not describe the command '{command}'"
        );
        let text = stdout(Command::new(bin).arg(command).arg("--help"));
        for option in long_options(&text) {
            assert!(
                source.contains(&option),
                "the man page does not mention {option} (flyproxy {command} --help)"
            );
        }
    }
}

/// flyproxy-etcd-sync's man page renders without warnings and names every long option of its
/// `--help`, and the environment variable of each.
fn check_sync_man_page(gz: &Path, sync: &Path) {
    let source = render_man_page(gz);
    let help = stdout(Command::new(sync).arg("--help"));
    let options = long_options(&help);
    assert!(options.len() >= 4, "options in --help: {options:?}\n{help}");
    for option in options {
        assert!(
            source.contains(&option),
            "flyproxy-etcd-sync's man page does not mention {option}"
        );
    }
    for var in [
        "FLYPROXY_ETCD_KEY",
        "FLYPROXY_CONFIG",
        "FLYPROXY_ETCDCTL",
        "FLYPROXY_ETCD_RESYNC",
    ] {
        assert!(
            help.contains(var),
            "{var} is not in --help any more:\n{help}"
        );
        assert!(
            source.contains(var),
            "flyproxy-etcd-sync's man page does not mention {var}"
        );
    }
}

/// `man --warnings` renders the page cleanly; its source, with `\-` as `-`.
fn render_man_page(gz: &Path) -> String {
    let out = Command::new("man")
        .args(["--warnings", "-l"])
        .arg(gz)
        .env("MANWIDTH", "80")
        .env("MANPAGER", "cat")
        .output()
        .expect("run man");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "man {}: {stderr}",
        gz.display()
    );
    let out = run(Command::new("gzip").arg("-dcf").arg(gz));
    String::from_utf8(out.stdout).unwrap().replace("\\-", "-")
}

/// The words of a unit's `ExecStart=` as systemd passes them, with the variables of the
/// `EnvironmentFile=` text `env_file`: a word that is `$NAME` becomes the value's words (none
/// when it is empty or unset), `${NAME}` inside a word the value as it is (systemd.service(5),
/// "Command lines"). The packaged units quote nothing, which this relies on (checked).
fn unit_command_line(unit: &str, env_file: &str) -> Vec<String> {
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart=");
    assert!(
        !exec.contains(['"', '\'', '\\']),
        "quoting in ExecStart={exec}"
    );
    let env = environment_file(env_file);
    let value = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    };
    let mut words = Vec::new();
    for word in exec.split_whitespace() {
        if let Some(name) = word.strip_prefix('$').filter(|n| !n.starts_with('{')) {
            words.extend(value(name).split_whitespace().map(str::to_owned));
        } else {
            let mut word = word.to_owned();
            for (k, v) in &env {
                word = word.replace(&format!("${{{k}}}"), v);
            }
            words.push(word);
        }
    }
    words
}

/// An `EnvironmentFile=` as systemd reads it (systemd.exec(5)): `NAME=value` lines, `#` and `;`
/// comments, blank lines; a value in quotes loses them.
fn environment_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not NAME=value: {l:?}"));
            let v = v.trim();
            let v = ['"', '\'']
                .iter()
                .find_map(|q| v.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
                .unwrap_or(v);
            (k.trim().to_owned(), v.to_owned())
        })
        .collect()
}

/// Both proxy units read `/etc/default/flyproxy` (optional: `EnvironmentFile=-`) and put
/// `$FLYPROXY_OPTS` on their command line; the shipped file sets no option, so the command line
/// is the plain one. With an option set there (`--metrics` and `--max-connections`), the
/// proxy started with flyproxy.service's command line has them in its /proc/PID/cmdline and
/// serves them. `bin` stands in for /usr/bin/flyproxy, a temporary config for the packaged one.
fn options_reach_the_proxy(unit_dir: &Path, default_file: &Path, bin: &Path) {
    let shipped = fs::read_to_string(default_file).unwrap();
    assert_eq!(
        environment_file(&shipped),
        [("FLYPROXY_OPTS".to_owned(), String::new())],
        "{}:\n{shipped}",
        default_file.display()
    );
    for (name, plain) in [
        (
            "flyproxy.service",
            "/usr/bin/flyproxy simple -c /etc/flyproxy/config.json --admin-socket /run/flyproxy/admin.sock",
        ),
        (
            "flyproxy-bpf.service",
            "/usr/bin/flyproxy bpf -p 8000 -c /etc/flyproxy/config.json --admin-socket /run/flyproxy/admin.sock",
        ),
    ] {
        let unit = fs::read_to_string(unit_dir.join(name)).unwrap();
        assert!(
            unit.lines()
                .any(|l| l == "EnvironmentFile=-/etc/default/flyproxy"),
            "{name} does not read /etc/default/flyproxy"
        );
        assert!(
            unit.contains(" $FLYPROXY_OPTS\n"),
            "{name}: no $FLYPROXY_OPTS in ExecStart"
        );
        assert_eq!(
            unit_command_line(&unit, &shipped).join(" "),
            plain,
            "{name}"
        );
    }

    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let options = format!(
        "{}FLYPROXY_OPTS=--metrics {metrics} --max-connections 77\n",
        shipped.replace("\nFLYPROXY_OPTS=\n", "\n")
    );
    let unit = fs::read_to_string(unit_dir.join("flyproxy.service")).unwrap();
    let words = unit_command_line(&unit, &options);
    assert_eq!(words[0], "/usr/bin/flyproxy");
    let port = free_port();
    let dir = TempDir::new("unit-options");
    let proxy_dir = dir.path.clone();
    let cfg = dir.write(
        "config.json",
        &config(&[app("opts", &[port], &["127.0.0.1:9".to_owned()])]),
    );
    let args: Vec<String> = words[1..]
        .iter()
        .map(|w| {
            if w == "/etc/flyproxy/config.json" {
                cfg.display().to_string()
            } else if w == "/run/flyproxy/admin.sock" {
                // systemd's RuntimeDirectory= makes /run/flyproxy; here, a directory of our own.
                proxy_dir.join("admin.sock").display().to_string()
            } else {
                w.clone()
            }
        })
        .collect();
    let mut cmd = Command::new(bin);
    cmd.args(&args);
    let mut proxy = Proxy::spawn_cmd(cmd, dir, cfg);
    proxy
        .wait_started()
        .unwrap_or_else(|log| panic!("{args:?} did not start:\n{log}"));
    let cmdline = fs::read(format!("/proc/{}/cmdline", proxy.pid)).unwrap();
    let cmdline: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    let metrics_arg = metrics.to_string();
    assert!(
        cmdline
            .windows(2)
            .any(|w| w[0] == "--metrics" && w[1] == metrics_arg),
        "--metrics {metrics} is not on the running proxy's command line: {cmdline:?}"
    );
    common::metrics::scrape_until(metrics, "the limit set in /etc/default/flyproxy", |m| {
        m.value("flyproxy_connections_limit", &[]) == Some(77.0)
    });
    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait_exit(WAIT).success());
}

/// `--word-word` tokens of a help text.
fn long_options(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("--") {
        let rest = &text[i + 2..];
        let end = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c == '-'))
            .unwrap_or(rest.len());
        if end > 1 {
            found.insert(format!("--{}", &rest[..end]));
        }
    }
    found
}

/// The units in dist/ verify against the debug binary (quick; no package needed), and the
/// packaged default config is valid.
#[test]
fn units_verify_and_default_config_is_valid() {
    let dist = Path::new(ROOT).join("dist");
    let check = stdout(
        Command::new(BIN)
            .arg("check")
            .arg("-c")
            .arg(dist.join("config.json")),
    );
    assert!(check.contains(": ok: "), "{check}");
    if !have("systemd-analyze") {
        cannot_run(
            "units_verify_and_default_config_is_valid",
            "systemd-analyze is not installed",
        );
        return;
    }
    let man = TempDir::new("man");
    fs::create_dir_all(man.path.join("man1")).unwrap();
    for page in ["flyproxy.1", "flyproxy-etcd-sync.1"] {
        fs::copy(dist.join(page), man.path.join("man1").join(page)).unwrap();
    }
    verify_units(&dist, Path::new(BIN), &man.path);
}

/// The units in dist/ read dist/flyproxy.default's options (the package's
/// /etc/default/flyproxy) and they reach the debug binary's command line (quick; no package
/// needed). The man pages in dist/ render cleanly and name every option.
#[test]
fn unit_options_and_man_pages_in_dist() {
    let dist = Path::new(ROOT).join("dist");
    options_reach_the_proxy(&dist, &dist.join("flyproxy.default"), Path::new(BIN));
    check_man_page(&dist.join("flyproxy.1"), Path::new(BIN));
    let sync = Path::new(BIN).with_file_name("flyproxy-etcd-sync");
    check_sync_man_page(&dist.join("flyproxy-etcd-sync.1"), &sync);
}

/// debian/changelog's version is the crate's: the package is built at Cargo.toml's version.
#[test]
fn debian_changelog_is_at_the_crate_version() {
    let changelog = fs::read_to_string(Path::new(ROOT).join("debian/changelog")).unwrap();
    let first = changelog.lines().next().unwrap_or("");
    assert!(
        first.starts_with(&format!("flyproxy ({VERSION}) ")),
        "debian/changelog starts with {first:?}, Cargo.toml is at {VERSION}: add an entry"
    );
}

// ---------------------------------------------------------------------------------------------
// Readiness notification

/// A unix datagram socket standing in for systemd's notify socket.
fn notify_socket(dir: &TempDir) -> (UnixDatagram, PathBuf) {
    let path = dir.path.join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    (socket, path)
}

fn receive(socket: &UnixDatagram) -> io::Result<String> {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Start `flyproxy simple` on one fresh port with NOTIFY_SOCKET set to `notify`.
fn spawn_notifying(notify: &std::ffi::OsStr) -> (Proxy, u16) {
    let port = free_port();
    let dir = TempDir::new("notify-proxy");
    let cfg = dir.write(
        "config.json",
        &config(&[app("notify", &[port], &["127.0.0.1:9".to_owned()])]),
    );
    let mut cmd = Command::new(BIN);
    cmd.arg("simple")
        .arg("-c")
        .arg(&cfg)
        .env("NOTIFY_SOCKET", notify);
    (Proxy::spawn_cmd(cmd, dir, cfg), port)
}

/// Under `Type=notify`, READY=1 arrives once the listeners are up: at that moment the port
/// already accepts connections. MAINPID, if sent, is the proxy's own pid.
#[test]
fn notifies_ready_once_listening() {
    let dir = TempDir::new("notify");
    let (socket, path) = notify_socket(&dir);
    let (proxy, port) = spawn_notifying(path.as_os_str());
    let message = receive(&socket).unwrap_or_else(|e| {
        panic!(
            "no notification within {WAIT:?} ({e}); is systemd::notify(\"READY=1...\") called \
             after the listeners are up?\n{}",
            proxy.logs().join("\n")
        )
    });
    let fields: Vec<&str> = message.lines().collect();
    assert!(
        fields.contains(&"READY=1"),
        "first notification: {message:?}"
    );
    TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(5),
    )
    .unwrap_or_else(|e| panic!("READY=1 sent but port {port} does not accept: {e}"));
    if let Some(pid) = fields.iter().find_map(|f| f.strip_prefix("MAINPID=")) {
        assert_eq!(pid, proxy.pid.to_string(), "MAINPID");
    }
}

/// systemd may hand out an abstract socket (`@name`).
#[test]
fn notifies_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!(
        "flyproxy-test-notify-{}-{}",
        std::process::id(),
        free_port()
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let (proxy, _) = spawn_notifying(format!("@{name}").as_ref());
    let message = receive(&socket)
        .unwrap_or_else(|e| panic!("no notification: {e}\n{}", proxy.logs().join("\n")));
    assert!(message.lines().any(|l| l == "READY=1"), "{message:?}");
}

// ---------------------------------------------------------------------------------------------
// Capabilities

/// The capability sets of every thread of `pid`: (thread name, field, mask).
fn thread_caps(pid: u32) -> Vec<(String, String, u64)> {
    let mut out = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let Ok(status) = fs::read_to_string(task.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let name = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .unwrap_or("?")
            .trim()
            .to_owned();
        for field in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            let mask = status
                .lines()
                .find_map(|l| l.strip_prefix(field).and_then(|v| v.strip_prefix(':')))
                .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
                .unwrap();
            out.push((name.clone(), field.to_owned(), mask));
        }
    }
    out
}

/// Every thread holds no capability outside `allowed` in any set.
fn assert_only(pid: u32, allowed: u64, logs: &[String]) {
    let caps = thread_caps(pid);
    let extra: Vec<String> = caps
        .iter()
        .filter(|(_, _, mask)| mask & !allowed != 0)
        .map(|(thread, field, mask)| format!("thread {thread}: {field}={mask:016x}"))
        .collect();
    assert!(
        extra.is_empty(),
        "capabilities beyond {allowed:016x} kept after start-up (is caps::keep_only called \
         before the threads start?):\n{}\n{}",
        extra.join("\n"),
        logs.join("\n")
    );
}

/// Simple mode started as root keeps only CAP_NET_BIND_SERVICE, in every thread and every set.
#[test]
fn simple_mode_as_root_keeps_only_net_bind_service() {
    if !is_root() {
        cannot_run(
            "simple_mode_as_root_keeps_only_net_bind_service",
            "needs root",
        );
        return;
    }
    let backend = Backend::echo();
    let mut proxy = Proxy::start(1, &[], |ports| {
        config(&[app("caps", ports, &[backend.target()])])
    });
    let mut client = common::connect(proxy.v4(0));
    common::roundtrip(&mut client, b"hello");
    drop(client);
    assert_only(proxy.pid, 1 << CAP_NET_BIND_SERVICE, &proxy.logs());
    let main = thread_caps(proxy.pid);
    assert!(
        main.iter()
            .any(|(_, f, m)| f == "CapEff" && *m == 1 << CAP_NET_BIND_SERVICE),
        "no thread has CAP_NET_BIND_SERVICE effective: {main:?}"
    );
    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait_exit(WAIT).success());
}

/// `setpriv` arguments that run a program as `nobody` with `caps` (like `+bpf,+net_admin`) as
/// its ambient, inheritable and bounding sets: what a unit's `DynamicUser=yes` with
/// `AmbientCapabilities=` and `CapabilityBoundingSet=` gives the service.
fn as_nobody(caps: &str) -> Vec<String> {
    vec![
        "--reuid=nobody".to_owned(),
        "--regid=nogroup".to_owned(),
        "--clear-groups".to_owned(),
        format!("--inh-caps=-all,{caps}"),
        format!("--ambient-caps=-all,{caps}"),
        format!("--bounding-set=-all,{caps}"),
        "--".to_owned(),
    ]
}

/// A copy of the binary and a config in a directory `nobody` can read, whatever the modes of
/// the checkout; returns the directory, the binary and the config.
fn nobody_can_read(config_json: &str) -> (TempDir, PathBuf, PathBuf) {
    let dir = TempDir::new("nobody");
    let bin = dir.path.join("flyproxy");
    fs::copy(BIN, &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&dir.path, fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = dir.write("config.json", config_json);
    fs::set_permissions(&cfg, fs::Permissions::from_mode(0o644)).unwrap();
    (dir, bin, cfg)
}

fn uid_of(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .to_owned()
}

/// Kills a process that is not our child (the new process of an upgrade) when dropped; declare
/// it after the `Proxy`, so it goes first and the log pipe the two share closes.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill with a pid we were told by the process we started.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
    }
}

/// Send SIGUSR2 and wait for the old process to say its successor serves and to exit; the new
/// process, killed when dropped.
fn upgrade(proxy: &mut Proxy) -> KillOnDrop {
    let mark = proxy.mark();
    proxy.signal(libc::SIGUSR2);
    let line = proxy.wait_log_since(mark, "the upgrade to serve (or fail)", |l| {
        l.contains(" is serving; ") || l.contains("upgrade failed")
    });
    let pid = line
        .split_once("upgrade: pid ")
        .and_then(|(_, rest)| rest.split_once(" is serving; "))
        .and_then(|(pid, _)| pid.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "the upgrade failed with the unit's capabilities: {line}\n{}",
                proxy.logs().join("\n")
            )
        });
    let new = KillOnDrop(pid);
    // Not wait_exit: that also waits for the end of the log, which the new process (sharing
    // the old one's stderr) keeps open.
    let status = common::wait_for("the old process to exit", WAIT, || proxy.try_status());
    assert!(status.success(), "the old process exits 0: {status}");
    new
}

/// Wait until `pid` (not our child) has exited.
fn wait_gone(pid: u32) {
    common::wait_for(&format!("pid {pid} to exit"), WAIT, || {
        let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for whoever adopted it.
        (state.is_empty() || state.contains(") Z ")).then_some(())
    });
}

/// What a bpf-mode process started with flyproxy-bpf.service's capabilities may hold once it
/// serves: CAP_BPF effective (map writes on reload), at most CAP_NET_ADMIN besides (which an
/// upgrade's new process needs to attach its program) in its permitted, effective and ambient
/// sets; the bounding set stays as the unit made it (changing it takes CAP_SETPCAP).
fn assert_bpf_mode_caps(pid: u32, logs: &[String]) {
    let may_keep = 1 << CAP_BPF | 1 << CAP_NET_ADMIN;
    assert_only(pid, may_keep | 1 << CAP_NET_BIND_SERVICE, logs);
    let caps = thread_caps(pid);
    for (thread, field, mask) in &caps {
        if field != "CapBnd" {
            assert_eq!(
                mask & !may_keep,
                0,
                "pid {pid} thread {thread}: {field}={mask:016x} has more than bpf mode needs \
                 once serving\n{}",
                logs.join("\n")
            );
        }
    }
    assert!(
        caps.iter()
            .any(|(_, f, m)| f == "CapEff" && m & 1 << CAP_BPF != 0),
        "pid {pid}: CAP_BPF not effective once serving: {caps:?}"
    );
}

/// bpf mode runs as an unprivileged user with exactly the capabilities flyproxy-bpf.service
/// grants (CAP_BPF, CAP_NET_ADMIN, CAP_NET_BIND_SERVICE, ambient), drops CAP_NET_BIND_SERVICE
/// and everything else it does not need once started, still reloads (a port written into the
/// map), and can still be upgraded with SIGUSR2 (the new process loads and attaches its own
/// program with what the old one passed on through exec).
#[test]
fn bpf_mode_as_nobody_with_the_units_capabilities() {
    if !is_root() || !have("setpriv") {
        cannot_run(
            "bpf_mode_as_nobody_with_the_units_capabilities",
            "needs root and setpriv",
        );
        return;
    }
    netns::run("bpf_mode_as_nobody_with_the_units_capabilities", |_ns| {
        let backend = Backend::tagged("nobody");
        let (dir, bin, cfg) =
            nobody_can_read(&config(&[app("nobody", &[7001], &[backend.target()])]));
        let mut cmd = Command::new("setpriv");
        cmd.args(as_nobody("+bpf,+net_admin,+net_bind_service"))
            .arg(&bin)
            .args(["bpf", "-p", "8000", "--reload-interval", "100ms", "-c"])
            .arg(&cfg);
        let mut proxy = Proxy::spawn_cmd(cmd, dir, cfg);
        proxy.wait_log("started mode=bpf", |l| l.contains(" started mode=bpf "));
        assert_eq!(netns::ask(netns::v4(7001)), "nobody", "steered as nobody");
        assert_eq!(uid_of(proxy.pid), "65534", "runs as nobody");

        // CAP_NET_BIND_SERVICE (the listener is on 8000) and anything else beyond what bpf
        // mode may keep are gone; CAP_BPF stays effective for the map writes of reloads.
        assert_bpf_mode_caps(proxy.pid, &proxy.logs());

        // A reload writes the ports map with what is left.
        let mark = proxy.mark();
        proxy.rewrite_config(&config(&[app(
            "nobody",
            &[7001, 7002],
            &[backend.target()],
        )]));
        proxy.wait_log_since(mark, "reload ok", |l| l.contains("reload ok"));
        assert_eq!(
            netns::ask(netns::v4(7002)),
            "nobody",
            "a port added by a reload"
        );
        assert!(
            !proxy
                .logs()
                .iter()
                .any(|l| l.contains("cannot update the port map")),
            "{}",
            proxy.logs().join("\n")
        );

        // SIGUSR2: the new process gets what survives exec (the ambient set), and must load
        // and attach its own program with it.
        let upgraded = upgrade(&mut proxy);
        let new = upgraded.0;
        assert_eq!(uid_of(new), "65534");
        assert_eq!(
            netns::ask(netns::v4(7001)),
            "nobody",
            "steered after the upgrade"
        );
        assert_eq!(
            netns::ask(netns::v4(7002)),
            "nobody",
            "steered after the upgrade"
        );
        assert_bpf_mode_caps(new, &proxy.logs());
        // SAFETY: kill with the pid the old process reported.
        unsafe { libc::kill(new as libc::pid_t, libc::SIGTERM) };
        wait_gone(new);
    });
}

/// Simple mode as an unprivileged user with flyproxy.service's only capability
/// (CAP_NET_BIND_SERVICE, ambient) binds ports below 1024, keeps that capability and nothing
/// else, and passes it on through an upgrade's exec: the new process binds another low port
/// on its next reload.
#[test]
fn simple_mode_as_nobody_binds_low_ports_across_an_upgrade() {
    if !is_root() || !have("setpriv") {
        cannot_run(
            "simple_mode_as_nobody_binds_low_ports_across_an_upgrade",
            "needs root and setpriv",
        );
        return;
    }
    netns::run(
        "simple_mode_as_nobody_binds_low_ports_across_an_upgrade",
        |_ns| {
            let backend = Backend::tagged("low");
            let (dir, bin, cfg) =
                nobody_can_read(&config(&[app("low", &[81], &[backend.target()])]));
            let mut cmd = Command::new("setpriv");
            cmd.args(as_nobody("+net_bind_service"))
                .arg(&bin)
                .args(["simple", "--reload-interval", "100ms", "-c"])
                .arg(&cfg);
            let mut proxy = Proxy::spawn_cmd(cmd, dir, cfg);
            proxy.wait_log("started mode=simple", |l| {
                l.contains(" started mode=simple ")
            });
            assert_eq!(uid_of(proxy.pid), "65534", "runs as nobody");
            assert_eq!(netns::ask(netns::v4(81)), "low");
            assert_only(proxy.pid, 1 << CAP_NET_BIND_SERVICE, &proxy.logs());

            let upgraded = upgrade(&mut proxy);
            let new = upgraded.0;
            assert_eq!(netns::ask(netns::v4(81)), "low", "served after the upgrade");
            assert_only(new, 1 << CAP_NET_BIND_SERVICE, &proxy.logs());
            // The new process binds a new low port on reload: it got CAP_NET_BIND_SERVICE.
            let mark = proxy.mark();
            proxy.rewrite_config(&config(&[app("low", &[81, 82], &[backend.target()])]));
            let line = proxy.wait_log_since(mark, "the new process's reload", |l| {
                l.contains("reload ok") || l.contains("reload rejected")
            });
            assert!(line.contains("reload ok"), "{}", proxy.logs().join("\n"));
            assert_eq!(
                netns::ask(netns::v4(82)),
                "low",
                "a low port bound after the upgrade"
            );
            // SAFETY: kill with the pid the old process reported.
            unsafe { libc::kill(new as libc::pid_t, libc::SIGTERM) };
            wait_gone(new);
        },
    );
}
