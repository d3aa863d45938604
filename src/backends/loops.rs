//! Loop detection: a target that is the proxy's own frontend would have every connection to it
//! accepted again by the proxy, which connects again, until every slot is taken and every other
//! app is starved.
//!
//! Which addresses reach a frontend is the same in both modes: each configured port answers on
//! the app's `Addresses` (every local address when it has none): simple mode binds exactly
//! those, and bpf mode's sk_lookup program steers exactly those (prefix, port) pairs. So a
//! target loops when its address is local to this host and one of the config's (port,
//! prefix) pairs covers it. (bpf mode's own `-p`
//! listener port is not a frontend: a connection dialled to it directly names no app and is
//! closed at once, so it cannot loop.)
//!
//! Two checks, both needed:
//! - [`problems`], on the config (`flyproxy check`, the start and every reload): targets whose
//!   host is an IP address local to this host, or `localhost`, on a configured port. It resolves
//!   no name (a reload must not wait on DNS), so it runs the same with or without a mode, and
//!   `check` gives the answer the running proxy would (it runs on the same host under
//!   `systemctl reload`).
//! - [`Frontends::is_own`], at each connect, on the addresses a name resolved to: a name that
//!   later resolves to this host fails that connection with reason `loop` instead of relaying.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, RwLock};

use crate::backends::shards::Shards;
use crate::config::prefix::Prefix;
use crate::config::{Config, Problem, Target};
// Keyed by the config's ports: see the hasher's module doc.
use crate::sys::hash::FastMap;

/// Where this proxy accepts: each port with the prefixes it answers on.
///
/// Each port's prefixes are shared between the frontends of one reload and the next: a
/// reload copies only the ports its apps touch (see `Frontends::changed`).
#[derive(Debug, Default, Clone)]
pub struct Frontends {
    ports: FastMap<u16, Arc<PortPrefixes>>,
}

/// The frontends of the config in force, shared by every app's route: a route is kept across
/// reloads while its app is unchanged, the frontends are the whole config's, so they are
/// replaced in place.
#[derive(Debug, Default)]
pub struct OwnFrontends(RwLock<Arc<Frontends>>);

impl OwnFrontends {
    /// `addr` would be accepted by this proxy itself, as the config in force says.
    pub fn is_own(&self, addr: SocketAddr) -> bool {
        let now = Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()));
        now.is_own(addr)
    }

    /// These are the frontends from now on.
    pub fn set(&self, frontends: Arc<Frontends>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = frontends;
    }
}

/// A port's prefixes, looked up by masking the address to each length in use rather than
/// tried one by one: an edge with an address per app has as many prefixes on a port as it has
/// apps, and every target of every app is checked against them (a scan made 100,000 such
/// apps take minutes to check, and every connect to a target on that port pay for the scan).
#[derive(Debug, Default, Clone)]
struct PortPrefixes {
    /// Each prefix, with how many of the apps' (port, prefix) pairs answer there. `Shards`:
    /// a reload's next index copies only the shards of the prefixes it touches (a port with
    /// an address per app has as many prefixes as apps).
    set: Shards<Prefix, u32>,
    /// The distinct prefix lengths `set` had (at most 33 + 129; one no longer in use costs
    /// a lookup that finds nothing).
    lens: Vec<u8>,
}

impl PortPrefixes {
    /// The prefixes of `pairs` (one per app's pair: a prefix may come more than once), each
    /// counted.
    fn of(mut pairs: Vec<Prefix>) -> PortPrefixes {
        pairs.sort_unstable();
        let mut lens: Vec<u8> = Vec::new();
        let mut counted: Vec<(Prefix, u32)> = Vec::new();
        for prefix in pairs {
            match counted.last_mut() {
                Some((last, n)) if *last == prefix => *n += 1,
                _ => {
                    if !lens.contains(&prefix.prefix_len()) {
                        lens.push(prefix.prefix_len());
                    }
                    counted.push((prefix, 1));
                }
            }
        }
        PortPrefixes {
            set: counted.into_iter().collect(),
            lens,
        }
    }

    fn count(&mut self, prefix: Prefix, add: bool) {
        if add {
            if !self.lens.contains(&prefix.prefix_len()) {
                self.lens.push(prefix.prefix_len());
            }
            match self.set.get_mut(&prefix) {
                Some(n) => *n += 1,
                None => {
                    self.set.insert(prefix, 1);
                }
            }
        } else if let Some(n) = self.set.get_mut(&prefix) {
            *n -= 1;
            if *n == 0 {
                self.set.remove(&prefix);
            }
        }
    }
}

impl Frontends {
    pub fn new(config: &Config) -> Frontends {
        // Straight from the apps: `Config::bindings` would also sort and name every pair,
        // which at 200,000 apps costs more than the rest of a reload.
        // Each port's pairs listed, then sorted and counted: at 200,000 apps with addresses of
        // their own, a lookup per pair into a growing map was most of this.
        let mut pairs: FastMap<u16, Vec<Prefix>> = FastMap::default();
        for app in &config.apps {
            let prefixes = crate::config::app_prefixes(app);
            for &port in &app.ports {
                pairs.entry(port).or_default().extend_from_slice(&prefixes);
            }
        }
        let ports = pairs
            .into_iter()
            .map(|(p, pairs)| (p, Arc::new(PortPrefixes::of(pairs))))
            .collect();
        Frontends { ports }
    }

    /// These frontends without the (port, prefix) pairs `out` (of apps removed or changed)
    /// and with `into` (of apps added or changed): each port touched is copied once, the
    /// others are shared.
    pub fn changed(&self, out: &[(u16, Prefix)], into: &[(u16, Prefix)]) -> Frontends {
        let mut next = self.clone();
        for (pairs, add) in [(out, false), (into, true)] {
            for &(port, prefix) in pairs {
                let at = next.ports.entry(port).or_default();
                Arc::make_mut(at).count(prefix, add);
            }
        }
        next.ports.retain(|_, at| !at.set.is_empty());
        next
    }

    /// `addr` would be accepted by this proxy itself.
    pub fn is_own(&self, addr: SocketAddr) -> bool {
        // The port first: a bind test costs three system calls, and most targets are remote.
        let Some(prefixes) = self.ports.get(&addr.port()) else {
            return false;
        };
        let ip = dialled(addr.ip());
        // `Prefix::new` caps a length at the address's family, so a length of the other
        // family can only find a prefix that does contain `ip`.
        let covered = prefixes
            .lens
            .iter()
            .any(|&len| prefixes.set.contains_key(&Prefix::new(ip, len)));
        covered && is_local(ip)
    }
}

/// The address a connection to `ip` arrives at: IPv4-mapped as IPv4, and the unspecified
/// address as loopback (connecting to 0.0.0.0 or :: reaches this host's loopback).
pub fn dialled(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, |v4| dialled(IpAddr::V4(v4))),
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        v4 => v4,
    }
}

/// `ip` is an address of this host: unspecified (connecting to it reaches this host),
/// loopback, or an address some interface here has. The last is asked of the kernel by binding
/// a UDP socket to it, which succeeds only for a local address (unless the host set
/// `net.ipv4.ip_nonlocal_bind`, which makes every address look local: refused as a loop, a
/// target is never silently relayed into ourselves).
pub fn is_local(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    if ip.is_unspecified() || ip.is_loopback() {
        return true;
    }
    if ip.is_multicast() {
        return false;
    }
    UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// A host name that is this host whatever the resolver says (RFC 6761: `localhost` and names
/// under it), written in any case, with or without the root dot.
fn is_localhost_name(host: &str) -> bool {
    let h = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    h == "localhost" || h.ends_with(".localhost")
}

/// Every target of `config` that is the proxy's own frontend, as a problem naming it.
pub fn problems(config: &Config) -> Vec<Problem> {
    let own = Frontends::new(config);
    let mut found = Vec::new();
    for app in &config.apps {
        for t in app.targets.iter().map(|spec| &spec.target) {
            if target_is_own(t, |a| own.is_own(a)) {
                found.push(Problem::Loop {
                    app: app.name.clone(),
                    target: t.to_string(),
                    port: t.port,
                });
            }
        }
    }
    found
}

/// Whether target `t` is a frontend, as `is_own` says of an address, without resolving a
/// name: an IP address, or `localhost` (whatever loopback address it resolves to).
pub fn target_is_own(t: &Target, is_own: impl Fn(SocketAddr) -> bool) -> bool {
    if is_localhost_name(&t.host) {
        ["127.0.0.1", "::1"]
            .iter()
            .filter_map(|a| a.parse::<IpAddr>().ok())
            .any(|ip| is_own(SocketAddr::new(ip, t.port)))
    } else {
        t.host
            .parse::<IpAddr>()
            .is_ok_and(|ip| is_own(SocketAddr::new(ip, t.port)))
    }
}

/// The address a target connects to, if it is one of this host's without a lookup (an IP
/// address that is local, or `localhost`): only such a target can be a frontend at check
/// time.
pub fn local_target(t: &Target) -> Option<IpAddr> {
    if is_localhost_name(&t.host) {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let ip = dialled(t.host.parse::<IpAddr>().ok()?);
    is_local(ip).then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn local_addresses() {
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "::1",
            "::",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_local(ip.parse().unwrap()), "{ip}");
        }
        // TEST-NET-1 (RFC 5737) is never configured on a test host.
        assert!(!is_local("192.0.2.1".parse().unwrap()));
        assert!(!is_local("224.0.0.1".parse().unwrap()));
        assert!(is_localhost_name("LocalHost."));
        assert!(is_localhost_name("a.localhost"));
        assert!(!is_localhost_name("localhost.example.com"));
    }

    #[test]
    fn own_frontends_are_found() {
        let c = Config::parse(
            Path::new("c.json"),
            br#"{"Apps":[
                {"Name":"a","Ports":[7001],"Targets":["127.0.0.1:7002","localhost:7001","192.0.2.1:7001"]},
                {"Name":"b","Ports":[7002],"Targets":["127.0.0.1:7003","[::1]:7002"]}]}"#,
        )
        .unwrap();
        let found: Vec<String> = problems(&c).iter().map(|p| p.to_string()).collect();
        assert_eq!(found.len(), 3, "{found:#?}");
        assert!(found[0].contains("\"127.0.0.1:7002\""), "{found:#?}");
        assert!(found[1].contains("\"localhost:7001\""), "{found:#?}");
        assert!(found[2].contains("\"[::1]:7002\""), "{found:#?}");
        let own = Frontends::new(&c);
        assert!(own.is_own("127.0.0.1:7001".parse().unwrap()));
        assert!(!own.is_own("127.0.0.1:7003".parse().unwrap()));
        assert!(!own.is_own("192.0.2.1:7001".parse().unwrap()));
    }

    /// Pairs counted out and in give the frontends of the changed config; a pair two apps
    /// share stays while one is left, and a port with none left goes.
    #[test]
    fn changed_frontends_are_the_new_configs() {
        let p = |s: &str| Prefix::parse(s).unwrap();
        let c = Config::parse(
            Path::new("c.json"),
            br#"{"Apps":[
                {"Name":"a","Ports":[7001],"Addresses":["127.0.0.2/32"],"Targets":["192.0.2.1:1"]},
                {"Name":"b","Ports":[7001],"Addresses":["127.0.0.2/32"],"Hostnames":["b.example"],"Targets":["192.0.2.1:1"]},
                {"Name":"c","Ports":[7002],"Addresses":["127.0.0.3/32"],"Targets":["192.0.2.1:1"]}]}"#,
        )
        .unwrap();
        let own = Frontends::new(&c);
        // b and c go; d comes on 7003 on every IPv4 address.
        let next = own.changed(
            &[(7001, p("127.0.0.2/32")), (7002, p("127.0.0.3/32"))],
            &[(7003, p("0.0.0.0/0"))],
        );
        assert!(next.is_own("127.0.0.2:7001".parse().unwrap()));
        assert!(!next.is_own("127.0.0.3:7002".parse().unwrap()));
        assert!(next.is_own("127.0.0.9:7003".parse().unwrap()));
        assert!(!next.ports.contains_key(&7002));
        // The frontends before are as they were.
        assert!(own.is_own("127.0.0.3:7002".parse().unwrap()));
    }
}
