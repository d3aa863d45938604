//! The directory's indices: what they are made of (a (port, prefix) slot's apps, an app in a
//! set by its name, a file's hash as bytes) and how a file's apps enter and leave them.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use super::Directory;
use crate::backends::loops::{dialled, local_target};
use crate::config::hostname::Pattern;
use crate::config::{self, app_prefixes, App};
use crate::sys::hash::FastMap;

/// The apps answering on one (port, prefix). Most have one app without Hostnames: 16
/// bytes, the map only for those with Hostnames.
#[derive(Default)]
pub(super) struct Slot {
    /// The app without Hostnames.
    pub(super) default: Option<Arc<App>>,
    pub(super) names: Option<Box<Names>>,
}

/// A slot's apps with Hostnames.
#[derive(Default)]
pub(super) struct Names {
    pub(super) by: FastMap<Pattern, Arc<App>>,
    /// How many apps (each counted once, whatever its number of Hostnames).
    pub(super) apps: u32,
}

impl Slot {
    /// How many apps answer here.
    pub(super) fn apps(&self) -> u32 {
        u32::from(self.default.is_some()) + self.names.as_ref().map_or(0, |n| n.apps)
    }

    pub(super) fn name(&self, h: &Pattern) -> Option<&Arc<App>> {
        self.names.as_ref()?.by.get(h)
    }
}

/// An app in a set, the same as another of its name (names are unique among serving apps).
pub(super) struct ByName(pub(super) Arc<App>);

impl PartialEq for ByName {
    fn eq(&self, other: &ByName) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for ByName {}

impl Hash for ByName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `str` hashes: `Borrow<str>` lets the set be asked by name.
        self.0.name.as_str().hash(state)
    }
}

impl Borrow<str> for ByName {
    fn borrow(&self) -> &str {
        &self.0.name
    }
}

/// A SHA-256, as bytes (half the size of its hex, and inline).
pub(super) type Sha = [u8; 32];

/// The hash of contents that could not be read (never a file's).
pub(super) const UNREAD: Sha = [0; 32];

/// The address a target of this host connects to, as `local_target` gives it, without
/// asking whether it is local: where an app's entry in `local_targets` is, even if the
/// address has left the host since.
pub(super) fn target_ip(t: &config::Target) -> IpAddr {
    t.host
        .parse::<IpAddr>()
        .map_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), dialled)
}

/// Adding and removing a file's apps from the indices.
impl Directory {
    pub(super) fn index(&mut self, file: &Arc<str>, apps: &[Arc<App>]) {
        for app in apps {
            self.note(app, false);
            // Removed first: an insert over an equal key would keep the old record.
            self.owners.remove(app.name.as_str());
            self.owners
                .insert(ByName(Arc::clone(app)), Arc::clone(file));
            for &prefix in app_prefixes(app) {
                for &port in &app.ports {
                    let (slots_on_port, lens) = self.ports.entry(port).or_default();
                    let slot = self.slots.entry((port, prefix)).or_insert_with(|| {
                        *slots_on_port += 1;
                        Slot::default()
                    });
                    if !lens.contains(&prefix.prefix_len()) {
                        lens.push(prefix.prefix_len());
                    }
                    if app.hostnames.is_empty() {
                        slot.default = Some(Arc::clone(app));
                        continue;
                    }
                    let names = slot.names.get_or_insert_with(Box::default);
                    names.apps += 1;
                    for h in &app.hostnames {
                        names.by.insert(h.clone(), Arc::clone(app));
                    }
                }
            }
            for t in app.targets.iter().map(|spec| &spec.target) {
                if let Some(ip) = local_target(t) {
                    self.local_targets
                        .entry(t.port)
                        .or_default()
                        .entry(ip)
                        .or_default()
                        .insert(ByName(Arc::clone(app)));
                }
            }
        }
    }

    pub(super) fn unindex(&mut self, apps: &[Arc<App>]) {
        for app in apps {
            self.note(app, true);
            self.owners.remove(app.name.as_str());
            for &prefix in app_prefixes(app) {
                for &port in &app.ports {
                    let Some(slot) = self.slots.get_mut(&(port, prefix)) else {
                        continue;
                    };
                    if slot.default.as_ref().is_some_and(|d| d.name == app.name) {
                        slot.default = None;
                    }
                    if let (Some(names), false) = (&mut slot.names, app.hostnames.is_empty()) {
                        // By the app's own Hostnames, not a pass over the slot's: a slot may
                        // hold thousands of apps.
                        for h in &app.hostnames {
                            if names.by.get(h).is_some_and(|a| a.name == app.name) {
                                names.by.remove(h);
                            }
                        }
                        names.apps = names.apps.saturating_sub(1);
                        if names.apps == 0 {
                            slot.names = None;
                        }
                    }
                    if slot.default.is_none() && slot.names.is_none() {
                        self.slots.remove(&(port, prefix));
                        if let Some((n, _)) = self.ports.get_mut(&port) {
                            *n -= 1;
                        }
                    }
                }
            }
            for t in app.targets.iter().map(|spec| &spec.target) {
                let Some(by_ip) = self.local_targets.get_mut(&t.port) else {
                    continue;
                };
                let ip = target_ip(t);
                if let Some(apps) = by_ip.get_mut(&ip) {
                    apps.remove(app.name.as_str());
                    if apps.is_empty() {
                        by_ip.remove(&ip);
                    }
                }
                if by_ip.is_empty() {
                    self.local_targets.remove(&t.port);
                }
            }
        }
    }
}
