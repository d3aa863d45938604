//! A file's frontends by port, as the loop check (`Directory::loops`) asks for them.

use std::sync::Arc;

use crate::config::prefix::Prefix;
use crate::config::{app_prefixes, App};
use crate::sys::hash::FastMap;

/// Below this many ports, the ports of a file of one app are looked through (see `One`).
const ONE_PORTS_MAX: usize = 16;

/// A file's frontends, by port: the prefixes its apps answer on there.
pub(super) enum Frontends<'a> {
    /// A file of one app with a few ports (the typical file) answers on that app's ports and
    /// prefixes, each port once (an app lists a port once): nothing to build, and a port is
    /// looked for among a few. A map in each of 200,000 files was three allocations on the
    /// thread the readers wait for at start.
    One(&'a App),
    Many(FastMap<u16, Vec<Prefix>>),
}

impl<'a> Frontends<'a> {
    pub(super) fn of(apps: &'a [Arc<App>]) -> Frontends<'a> {
        // An app of many ports (a range) gets the map: `on` is asked for every target, and a
        // look through 65,535 ports for each of a million targets would be quadratic.
        if let [one] = apps {
            if one.ports.len() < ONE_PORTS_MAX {
                return Frontends::One(one);
            }
        }
        let mut by_port: FastMap<u16, Vec<Prefix>> = FastMap::default();
        for a in apps {
            for &port in &a.ports {
                by_port.entry(port).or_default().extend(app_prefixes(a));
            }
        }
        Frontends::Many(by_port)
    }

    /// The prefixes answering on `port` (none if the file has no app there).
    pub(super) fn on(&self, port: u16) -> &[Prefix] {
        match self {
            Frontends::One(app) if app.ports.contains(&port) => app_prefixes(app),
            Frontends::One(_) => &[],
            Frontends::Many(by_port) => by_port.get(&port).map_or(&[], |p| p),
        }
    }

    /// `f` of each port (once) and its prefixes.
    pub(super) fn each(&self, mut f: impl FnMut(u16, &[Prefix])) {
        match self {
            Frontends::One(app) => {
                for &port in &app.ports {
                    f(port, app_prefixes(app));
                }
            }
            Frontends::Many(by_port) => {
                for (&port, prefixes) in by_port {
                    f(port, prefixes);
                }
            }
        }
    }
}
