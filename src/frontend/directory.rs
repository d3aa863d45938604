//! `-c DIR`: the config as a directory of files, each `*.json` in it (not a dotfile) holding
//! `{"Apps": [...]}`, typically one app named after the file. The config in force is the
//! apps of every file's last good version, in file name order.
//!
//! Blast radius of one file: a file is checked on its own (as a whole config file would be)
//! and then against the apps serving from the other files: an app name another file serves,
//! an (address prefix, port) that Hostnames do not tell apart from another file's app, a
//! target that is one of the proxy's own frontends (its own, or another file's), or a
//! frontend that makes another file's target loop. Such a file is rejected alone, with every
//! problem; its last good version, if it had one, keeps serving, and every other file's
//! change applies. A serving app wins a clash against a newcomer; among newcomers, the first
//! file by name wins. A rejected file is tried again whenever another file changes (the app
//! it clashed with may be gone), and when it changes itself.
//!
//! What changed is told by inotify (`sys::inotify`): a tick reads the names of the files
//! written, moved or deleted since the last, and looks only at those. Without inotify, when
//! its queue overflowed and on SIGHUP, every file is looked at (a readdir and a stat each;
//! only files whose size, mtime or inode changed are read again). At start every file is
//! read, on a few threads (`load`).

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backends::loops::{dialled, is_local, target_is_own};
use crate::config::prefix::Prefix;
use crate::config::{self, app_prefixes, sha256, App, Config, Diff};
use crate::frontend::watch::{FileSig, Watch};
use crate::sys::hash::{FastMap, FastSet};
use crate::sys::inotify::{DirWatch, Events};
use digest::{Digest, Line};
use frontends::Frontends;
use index::{target_ip, ByName, Sha, Slot, UNREAD};

/// A config directory as the config plane keeps it. Its indices are keyed by what the files
/// say (app names, ports, prefixes, hostnames), never by what a peer sends: `FastMap`.
///
/// Its indices hold per app what they must and share the rest: an app is its `Arc<App>` (the
/// file state's), a file name the `files` key's `Arc<str>`, a hash 32 bytes. At 200,000 apps
/// each byte an app costs is 200 kB; copies of names and hex hashes in every index were
/// about 2.5 kB an app.
pub struct Directory {
    dir: PathBuf,
    files: BTreeMap<Arc<str>, FileState>,
    /// App (by name) -> the file serving it (the `files` key, shared). Keyed by the app's
    /// record, not a copy of its name.
    owners: FastMap<ByName, Arc<str>>,
    /// (port, prefix) -> who answers there. The served (port, prefix) pairs: the frontends
    /// a target must not be.
    slots: FastMap<(u16, Prefix), Slot>,
    /// Per served port: how many `slots` it has, and the prefix lengths in use on it.
    ports: FastMap<u16, (u32, Vec<u8>)>,
    /// The apps with targets that are this host (an IP address of it, or `localhost`), by
    /// the target's port and address: those a new frontend could make loop. By app, so an
    /// app leaves without a pass over every app's; the target itself is found again in the
    /// app when a problem names it.
    local_targets: FastMap<u16, FastMap<IpAddr, FastSet<ByName>>>,
    watch: Option<DirWatch>,
    /// Without inotify: the directory's own metadata at the last rescan (its mtime changes
    /// when a file is created, renamed in or out, or deleted).
    dir_sig: Option<FileSig>,
    /// What the refresh under way changed, as it goes (see `Refresh::diff`).
    touched: touched::Touched,
    /// Names the config in force (see `digest`), kept as files come and go.
    digest: Digest,
    /// The files refused now, with their problems: kept as files are taken in and out, so
    /// that publishing them costs the refused files, not a pass over every file.
    refused: BTreeMap<String, Vec<String>>,
    /// The files whose apps wait for what they clashed with to go: the apps of their refused
    /// contents that were valid on their own, tried again when other files change. Here
    /// rather than in each file's state: few files wait, and every file's state costs its
    /// size 200,000 times.
    waiting: BTreeMap<String, Vec<Arc<App>>>,
    /// The --metrics address, no app's once serving (see `reserve`).
    reserved: Option<SocketAddr>,
}

/// A file as the directory keeps it, one per file: kept small (an edge has 200,000).
struct FileState {
    sig: Option<FileSig>,
    /// SHA-256 of the contents last read.
    sha256: Sha,
    /// The version in force (its apps and hash); None: none ever was.
    good: Option<(Box<[Arc<App>]>, Sha)>,
}

/// A file refused, with every problem (as the metrics endpoint publishes it).
pub use crate::metrics::RejectedFile as Rejected;

/// What a refresh found.
#[derive(Debug, Default)]
pub struct Refresh {
    /// The apps in force changed.
    pub changed: bool,
    /// Files refused by this refresh (each logged and counted once per version).
    pub rejected: Vec<Rejected>,
    /// The apps and ports in force before and after this refresh differ by this.
    pub diff: Diff,
}

/// A file's apps, or every problem it has on its own (one a line).
type Parsed = Result<Vec<Arc<App>>, Vec<String>>;

/// The apps of the file `name` of `dir` read as `bytes`, or its problems.
fn parse(dir: &Path, name: &str, bytes: &[u8]) -> Parsed {
    Config::parse_with(bytes, || dir.join(name))
        .map(|c| c.apps)
        .map_err(|e| e.to_string().lines().map(str::to_owned).collect())
}

/// Whether `name` is a config file of the directory: `*.json`, not a dotfile.
fn is_config_file(name: &str) -> bool {
    name.ends_with(".json") && !name.starts_with('.')
}

impl Directory {
    /// The directory at `dir`, nothing read yet; watched through inotify if it can be.
    pub fn open(dir: &Path) -> Directory {
        let watch = match DirWatch::new(dir) {
            Ok(w) => Some(w),
            Err(e) => {
                crate::warn!(
                    "cannot watch {} with inotify ({e}): every file is looked at on each change of the directory",
                    dir.display()
                );
                None
            }
        };
        Directory::new(dir, watch)
    }

    fn new(dir: &Path, watch: Option<DirWatch>) -> Directory {
        Directory {
            dir: dir.to_owned(),
            files: BTreeMap::new(),
            owners: FastMap::default(),
            reserved: None,
            slots: FastMap::default(),
            ports: FastMap::default(),
            local_targets: FastMap::default(),
            watch,
            dir_sig: None,
            touched: touched::Touched::default(),
            digest: Digest::default(),
            refused: BTreeMap::new(),
            waiting: BTreeMap::new(),
        }
    }

    /// Look for changed files and take in what they say: every file if `full`, else those
    /// inotify named (every file if it cannot say).
    pub fn refresh(&mut self, full: bool) -> Refresh {
        let named = match (&mut self.watch, full) {
            (Some(w), false) => match w.read() {
                Events::Names(names) => Some(names),
                Events::Rescan => {
                    // Watch again: the directory may have been replaced.
                    self.watch = DirWatch::new(&self.dir).ok();
                    None
                }
            },
            (None, false) => {
                // No inotify: rescan only when the directory itself changed (a file written
                // in place, not renamed over, then waits for SIGHUP).
                let sig = Watch::stat(&self.dir);
                if sig.is_some() && sig == self.dir_sig {
                    return Refresh::default();
                }
                None
            }
            (_, true) => None,
        };
        if self.watch.is_none() {
            self.dir_sig = Watch::stat(&self.dir);
        }
        // Each file to look at, with its metadata now (None: gone).
        let mut look: BTreeMap<String, Option<FileSig>> = BTreeMap::new();
        match named {
            Some(names) => {
                for n in names.into_iter().filter(|n| is_config_file(n)) {
                    let sig = Watch::stat(&self.dir.join(&n));
                    look.insert(n, sig);
                }
            }
            None => {
                let listed = self.list();
                for n in self.files.keys() {
                    if !listed.contains_key(&**n) {
                        look.insert(n.to_string(), None);
                    }
                }
                for (n, sig) in listed {
                    if self
                        .files
                        .get(n.as_str())
                        .is_none_or(|f| f.sig != Some(sig))
                    {
                        look.insert(n, Some(sig));
                    }
                }
            }
        }
        let mut out = Refresh::default();
        for (name, sig) in &look {
            if sig.is_none() {
                out.changed |= self.remove(name);
            }
        }
        for (name, sig) in look {
            if let Some(sig) = sig {
                self.take(&name, sig, &mut out);
            }
        }
        if out.changed {
            self.retry_pending(&mut out);
        }
        out.diff = self.diff_touched();
        out
    }

    /// The config files there now, with their metadata.
    fn list(&self) -> BTreeMap<String, FileSig> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            // Gone for a moment or for good: keep serving what we have.
            return self
                .files
                .iter()
                .filter_map(|(n, f)| Some((n.to_string(), f.sig?)))
                .collect();
        };
        entries
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                if !is_config_file(&name) {
                    return None;
                }
                let sig = Watch::stat(&self.dir.join(&name))?;
                Some((name, sig))
            })
            .collect()
    }

    /// A file is gone: its apps no longer serve. True if it had some.
    fn remove(&mut self, name: &str) -> bool {
        let Some(state) = self.files.remove(name) else {
            return false;
        };
        self.refused.remove(name);
        self.waiting.remove(name);
        match state.good {
            Some((apps, sha)) => {
                self.digest.sub(Line::of(&sha, name));
                self.unindex(&apps);
                true
            }
            None => false,
        }
    }

    /// Read the file `name` (metadata `sig`) and take its apps in if they pass.
    fn take(&mut self, name: &str, sig: FileSig, out: &mut Refresh) {
        let path = self.dir.join(name);
        let (sha, parsed) = match config::read_file(&path) {
            Ok(bytes) => {
                let sha = sha256::digest(&bytes);
                if self.files.get(name).is_some_and(|f| f.sha256 == sha) {
                    // Same contents (rewritten alike, or only touched).
                    if let Some(f) = self.files.get_mut(name) {
                        f.sig = Some(sig);
                    }
                    return;
                }
                (sha, parse(&self.dir, name, &bytes))
            }
            Err(problem) => (UNREAD, Err(vec![format!("{}: {problem}", path.display())])),
        };
        self.take_parsed(name, sig, sha, None, parsed, out);
    }

    /// Take in the file `name` (metadata `sig`), read with SHA-256 `sha` and parsed to
    /// `parsed`, if its apps pass beside the other files'.
    fn take_parsed(
        &mut self,
        name: &str,
        sig: FileSig,
        sha: Sha,
        line: Option<Line>,
        parsed: Parsed,
        out: &mut Refresh,
    ) {
        if !self.files.contains_key(name) {
            let state = FileState {
                sig: None,
                sha256: UNREAD,
                good: None,
            };
            self.files.insert(Arc::from(name), state);
        }
        let Some(state) = self.files.get_mut(name) else {
            return;
        };
        state.sig = Some(sig);
        state.sha256 = sha;
        self.waiting.remove(name);
        let apps = match parsed {
            Ok(apps) => apps,
            Err(problems) => return self.refuse(name, problems, None, out),
        };
        let problems = self.clashes(name, &apps);
        if !problems.is_empty() {
            return self.refuse(name, problems, Some(apps), out);
        }
        self.accept(name, apps, sha, line);
        out.changed = true;
    }

    /// Refuse the file `name` with `problems`; `pending`: its apps, valid on their own, to try
    /// again when other files change (they clashed with what serves).
    fn refuse(
        &mut self,
        name: &str,
        problems: Vec<String>,
        pending: Option<Vec<Arc<App>>>,
        out: &mut Refresh,
    ) {
        if let Some(apps) = pending {
            self.waiting.insert(name.to_owned(), apps);
        }
        self.refused.insert(name.to_owned(), problems.clone());
        out.rejected.push(Rejected {
            file: name.to_owned(),
            problems,
        });
    }

    /// `apps` (hashing to `sha`) serve from `name` from now on, in place of its last version.
    /// `line`: the file's digest line, if its reader worked it out already.
    fn accept(&mut self, name: &str, apps: Vec<Arc<App>>, sha: Sha, line: Option<Line>) {
        let Some(state) = self.files.get_mut(name) else {
            return;
        };
        self.waiting.remove(name);
        self.refused.remove(name);
        self.digest
            .add(line.unwrap_or_else(|| Line::of(&sha, name)));
        let old = state.good.replace((apps.into_boxed_slice(), sha));
        if let Some((old, old_sha)) = old {
            self.digest.sub(Line::of(&old_sha, name));
            self.unindex(&old);
        }
        let Some((file, state)) = self.files.get_key_value(name) else {
            return;
        };
        let Some((apps, _)) = state.good.clone() else {
            return;
        };
        let file = Arc::clone(file);
        self.index(&file, &apps);
    }

    /// Try again the files refused for a clash, now that other files changed.
    fn retry_pending(&mut self, out: &mut Refresh) {
        // The files waiting, not a pass over every file.
        let waiting: Vec<(String, Vec<Arc<App>>, Sha)> = self
            .waiting
            .iter()
            .filter_map(|(n, apps)| {
                let f = self.files.get(n.as_str())?;
                Some((n.clone(), apps.clone(), f.sha256))
            })
            .collect();
        for (name, apps, sha) in waiting {
            if self.clashes(&name, &apps).is_empty() {
                crate::info!("config file {name}: accepted now that what it clashed with changed");
                self.accept(&name, apps, sha, None);
                out.changed = true;
            }
        }
    }

    /// Every problem of `apps` (valid on their own) from `file` beside the other files'.
    fn clashes(&self, file: &str, apps: &[Arc<App>]) -> Vec<String> {
        let other = |app: &Arc<App>| {
            self.owners
                .get(app.name.as_str())
                .is_some_and(|f| &**f != file)
        };
        let mut problems = Vec::new();
        for app in apps {
            if let Some(f) = self.owners.get(app.name.as_str()).filter(|f| &***f != file) {
                problems.push(format!("app {:?}: Name: already served from {f}", app.name));
            }
            for &prefix in app_prefixes(app) {
                for &port in &app.ports {
                    let Some(slot) = self.slots.get(&(port, prefix)) else {
                        continue;
                    };
                    if app.hostnames.is_empty() {
                        if let Some(first) = slot.default.as_ref().filter(|a| other(a)) {
                            problems.push(format!(
                                "app {:?}: Ports: {port} on {prefix} already used by app {:?} (file {}), and neither has Hostnames (apps share an address and port only when Hostnames tell them apart)",
                                app.name, first.name, self.owners[first.name.as_str()]
                            ));
                        }
                    }
                    for h in &app.hostnames {
                        if let Some(first) = slot.name(h).filter(|a| other(a)) {
                            problems.push(format!(
                                "app {:?}: Hostnames: {h:?} is also claimed by app {:?} (file {}) on port {port} on {prefix}",
                                app.name, first.name, self.owners[first.name.as_str()]
                            ));
                        }
                    }
                }
            }
        }
        problems.extend(self.loops(file, apps));
        problems.extend(self.on_reserved(apps));
        problems
    }

    /// Targets of `apps` that would be frontends (their own or the others'), and the others'
    /// targets that their frontends would make loop.
    fn loops(&self, file: &str, apps: &[Arc<App>]) -> Vec<String> {
        let mine = Frontends::of(apps);
        let is_own = |addr: SocketAddr| {
            let ip = dialled(addr.ip());
            let theirs = self.ports.get(&addr.port()).is_some_and(|(_, lens)| {
                lens.iter().any(|&len| {
                    let prefix = Prefix::new(ip, len);
                    self.slots
                        .get(&(addr.port(), prefix))
                        .is_some_and(|s| s.apps() > self.own_count(file, addr.port(), &prefix))
                })
            });
            let ours = mine.on(addr.port()).iter().any(|p| p.contains(ip));
            (theirs || ours) && is_local(ip)
        };
        let mut problems = Vec::new();
        for app in apps {
            for t in app.targets.iter().map(|spec| &spec.target) {
                if target_is_own(t, is_own) {
                    problems.push(format!(
                        "app {:?}: Targets: {:?} is this proxy's own frontend (port {} on a local address): connections to it would loop back into the proxy",
                        app.name,
                        t.to_string(),
                        t.port
                    ));
                }
            }
        }
        mine.each(|port, prefixes| {
            let port = &port;
            // The other files' apps with a local target inside the new frontends, by name
            // (the order the problems are listed in), with the addresses that are.
            let mut hit: BTreeMap<&str, (&Arc<App>, Vec<IpAddr>)> = BTreeMap::new();
            let on_port = self.local_targets.get(port).into_iter().flatten();
            for (ip, apps) in on_port.filter(|(ip, _)| prefixes.iter().any(|p| p.contains(**ip))) {
                for ByName(app) in apps {
                    if self
                        .owners
                        .get(app.name.as_str())
                        .is_some_and(|f| &**f != file)
                    {
                        hit.entry(&app.name)
                            .or_insert((app, Vec::new()))
                            .1
                            .push(*ip);
                    }
                }
            }
            for (name, (app, ips)) in hit {
                let targets = app.targets.iter().map(|spec| &spec.target);
                for t in targets.filter(|t| t.port == *port && ips.contains(&target_ip(t))) {
                    problems.push(format!(
                        "port {port}: would be a frontend that app {name:?} (file {}) targets ({:?}): its connections would loop back into the proxy",
                        self.owners[name],
                        t.to_string()
                    ));
                }
            }
        });
        problems
    }

    /// How many of the frontend (`port`, `prefix`) counts are `file`'s own serving apps
    /// (which the file's new version replaces).
    fn own_count(&self, file: &str, port: u16, prefix: &Prefix) -> u32 {
        let Some((apps, _)) = self.files.get(file).and_then(|f| f.good.as_ref()) else {
            return 0;
        };
        apps.iter()
            .filter(|a| a.ports.contains(&port) && app_prefixes(a).contains(prefix))
            .count() as u32
    }

    /// The config in force: every file's last good apps, in file name order.
    pub fn config(&self) -> Config {
        Config {
            apps: self
                .files
                .values()
                .filter_map(|f| f.good.as_ref())
                .flat_map(|(apps, _)| apps.iter().cloned())
                .collect(),
        }
    }

    /// The digest that names the directory's config in force (see `digest`: the sum of the
    /// SHA-256 of each file's `sha256sum` line), kept as files change.
    pub fn sha256(&self) -> String {
        self.digest.hex()
    }

    /// Every file refused now, with its problems.
    pub fn rejected(&self) -> Vec<Rejected> {
        self.refused
            .iter()
            .map(|(file, problems)| Rejected {
                file: file.clone(),
                problems: problems.clone(),
            })
            .collect()
    }

    /// The files looked at, and how many serve.
    pub fn counts(&self) -> (usize, usize) {
        let serving = self.files.values().filter(|f| f.good.is_some()).count();
        (self.files.len(), serving)
    }
}

/// `flyproxy check DIR`: every problem of every file, as the proxy would find them at start.
/// The config of the files that pass, and the files refused.
pub fn check(dir: &Path) -> (Config, Vec<Rejected>) {
    let mut d = Directory::open_unwatched(dir);
    d.load();
    (d.config(), d.rejected())
}

impl Directory {
    fn open_unwatched(dir: &Path) -> Directory {
        Directory::new(dir, None)
    }
}

mod digest;
mod frontends;
mod index;
mod load;
mod order;
mod reserve;
mod touched;

#[cfg(test)]
mod tests;
