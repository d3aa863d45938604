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

use crate::config::prefix::Prefix;
use crate::config::{Config, Problem, Target};
// Keyed by the config's ports: see the hasher's module doc.
use crate::sys::hash::{FastMap, FastSet};

/// Where a config's apps accept: each port with the prefixes it answers on (the running
/// proxy asks its routing table in force instead: `routing::OwnFrontends`).
#[derive(Debug, Default, Clone)]
pub struct Frontends {
    ports: FastMap<u16, PortPrefixes>,
}

/// A port's prefixes, looked up by masking the address to each length in use rather than
/// tried one by one: an edge with an address per app has as many prefixes on a port as it has
/// apps, and every target of every app is checked against them (a scan made 100,000 such
/// apps take minutes to check).
#[derive(Debug, Default, Clone)]
struct PortPrefixes {
    set: FastSet<Prefix>,
    /// The distinct prefix lengths in `set`.
    lens: Vec<u8>,
}

impl PortPrefixes {
    /// The prefixes of `pairs` (one per app's pair: a prefix may come more than once).
    fn of(mut pairs: Vec<Prefix>) -> PortPrefixes {
        pairs.sort_unstable();
        pairs.dedup();
        let mut lens: Vec<u8> = Vec::new();
        for prefix in &pairs {
            if !lens.contains(&prefix.prefix_len()) {
                lens.push(prefix.prefix_len());
            }
        }
        PortPrefixes {
            set: pairs.into_iter().collect(),
            lens,
        }
    }
}

impl Frontends {
    pub fn new(config: &Config) -> Frontends {
        // Each port's pairs listed, then sorted: at 200,000 apps with addresses of their own,
        // a lookup per pair into a growing set was most of this.
        let mut pairs: FastMap<u16, Vec<Prefix>> = FastMap::default();
        for app in &config.apps {
            let prefixes = crate::config::app_prefixes(app);
            for &port in &app.ports {
                pairs.entry(port).or_default().extend_from_slice(prefixes);
            }
        }
        let ports = pairs
            .into_iter()
            .map(|(p, pairs)| (p, PortPrefixes::of(pairs)))
            .collect();
        Frontends { ports }
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
            .any(|&len| prefixes.set.contains(&Prefix::new(ip, len)));
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
    // Compared in place: every target of every app is asked this as files are taken in
    // (400,000 at a start with 200,000 apps), and a lowercased copy was an allocation each.
    const UNDER: &[u8] = b".localhost";
    let h = host.strip_suffix('.').unwrap_or(host).as_bytes();
    h.eq_ignore_ascii_case(&UNDER[1..])
        || (h.len() >= UNDER.len() && h[h.len() - UNDER.len()..].eq_ignore_ascii_case(UNDER))
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
        assert!(is_localhost_name("localhost") && is_localhost_name("B.A.LOCALHOST."));
        assert!(!is_localhost_name("xlocalhost") && !is_localhost_name("ocalhost"));
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
}
