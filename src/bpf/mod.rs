//! The eBPF half of "any number of ports on one socket": loads the sk_lookup
//! program in `steer.bpf.c`, puts the proxy's listening sockets into its sockmap,
//! attaches it to the current network namespace, and edits the steered (address prefix,
//! port) bindings.
//!
//! Ownership: [`Steering`] holds the attachment ([`Link`]) and handles to the maps it
//! edits later. The skeleton and libbpf's `Object` only live inside
//! [`Steering::attach`]; the kernel keeps the program and maps alive through the link
//! and our own map file descriptors, so nothing here borrows from anything else.
//!
//! The maps' byte layouts are in `layout`, the errors and how a failure is classified in
//! `error`.

mod error;
mod layout;

use error::{classify, stats_error};
pub use error::{BpfError, Step};
use layout::{
    bind_value, binding_value, LISTENER_V4, LISTENER_V6, NETNS_PATH, STAT_DROPPED_ASSIGN,
    STAT_DROPPED_NO_LISTENER, STAT_PASSED, STAT_STEERED,
};
pub use layout::{binding_key, host_key};

use std::fs;
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{ErrorKind, Link, MapCore, MapFlags, MapHandle};

use crate::config::prefix::Prefix;

/// The generated skeleton (`SteerSkelBuilder`, `SteerSkel`), built by build.rs. Lints are
/// silenced on the generated code alone.
#[allow(unused_imports, clippy::all, clippy::pedantic, clippy::nursery)]
mod steer {
    include!(concat!(env!("OUT_DIR"), "/steer.skel.rs"));
}

use steer::SteerSkelBuilder;

/// The sk_lookup program, attached to the network namespace, and the maps it reads.
///
/// Dropping it (or calling [`Steering::detach`]) detaches the program: connections
/// to the steered ports are refused again at once, since nothing listens on them.
/// The listener sockets given to [`Steering::attach`] must stay open for as long as
/// steering should work: closing one removes it from the sockmap.
#[derive(Debug)]
pub struct Steering {
    /// The attachment; `None` after [`Steering::detach`]. Never forgotten or
    /// disconnected: dropping it is what detaches the program.
    link: Option<Link>,
    /// The maps of steered bindings.
    maps: Bindings,
    /// Our own fds of the counter maps.
    counters: Counters,
}

/// The two maps of steered bindings, apart from the link so that several threads may write
/// them at once (`Steering` holds the link, which may not leave its thread): a start writes
/// 800,000 entries at 200,000 apps, and the kernel's hash map takes concurrent writers (it
/// locks a bucket, not the map).
#[derive(Debug)]
pub struct Bindings {
    /// Our own fd of the `bindings` trie (the skeleton's copy was closed with it): the
    /// prefixes shorter than one address.
    trie: MapHandle,
    /// Our own fd of the `hosts` hash map: the bindings of one address exactly (an IPv4 /32,
    /// an IPv6 /128), most of an edge's, and much cheaper to write than trie entries.
    hosts: MapHandle,
}

/// Reads the program's per-CPU counters. Holds its own map fds, so a copy can live on the
/// metrics thread while the `Steering` stays with the listener loop.
#[derive(Debug)]
pub struct Counters {
    stats: MapHandle,
    group_stats: MapHandle,
}

/// Port groups (apps) counted separately; must match MAX_GROUPS in steer.bpf.c. Groups at or
/// beyond it share the last counter.
pub const MAX_GROUPS: u32 = 4096;

/// Bindings written in one batch update at most (see `Bindings::add_many`).
pub const STEER_BATCH: usize = 4096;

impl Steering {
    /// Load the program, put the listener fds in the sockmap (v4 at key 0, v6 at
    /// key 1; either may be `None`), and attach to the calling thread's network
    /// namespace (`/proc/thread-self/ns/net`, the same as `/proc/self/ns/net` on the
    /// main thread).
    ///
    /// The listeners must already be listening (the sockmap accepts only TCP
    /// sockets in LISTEN or ESTABLISHED state), and should bind an address of
    /// their own family (the v6 one with IPV6_V6ONLY). No port is steered until
    /// [`Steering::add_port`]. Connections of a family given `None` (or whose
    /// listener was closed) to steered ports are refused (the program's SK_DROP
    /// makes the kernel answer the SYN with a RST); they never fall through to
    /// another socket bound to that port.
    ///
    /// With `bind` set, only connections to that address (or, for an unspecified address,
    /// to that family) are steered; others are left to the regular lookup.
    pub fn attach(
        v4: Option<BorrowedFd<'_>>,
        v6: Option<BorrowedFd<'_>>,
        bind: Option<IpAddr>,
    ) -> Result<Steering, BpfError> {
        // The skeleton borrows this storage, so it cannot outlive this function;
        // it does not need to. Everything kept afterwards is owned: the Link (its
        // own fd, which pins the program in the kernel) and duplicated map fds.
        // When the skeleton drops here, libbpf closes only its own fds.
        let mut storage = MaybeUninit::uninit();
        let open = SteerSkelBuilder::default()
            .open(&mut storage)
            .map_err(|source| BpfError::Setup {
                step: Step::Open,
                source,
            })?;
        let skel = open.load().map_err(|e| classify(Step::Load, e))?;

        // Listeners go in before the program is attached (and no port is steered
        // before add_port), so no connection ever meets a half-filled sockmap.
        for (key, fd, step) in [
            (LISTENER_V4, v4, Step::ListenerV4),
            (LISTENER_V6, v6, Step::ListenerV6),
        ] {
            let Some(fd) = fd else { continue };
            // A BorrowedFd is never negative, so the cast does not change the value.
            // The map's value is a __u64, and MapCore::update checks sizes exactly.
            let value = fd.as_raw_fd() as u64;
            skel.maps
                .listeners
                .update(&key.to_ne_bytes(), &value.to_ne_bytes(), MapFlags::ANY)
                .map_err(|e| classify(step, e))?;
        }

        if let Some(ip) = bind {
            skel.maps
                .bind
                .update(&0u32.to_ne_bytes(), &bind_value(ip), MapFlags::ANY)
                .map_err(|e| classify(Step::Bind, e))?;
        }

        let handle = |map: &libbpf_rs::MapMut<'_>| {
            MapHandle::try_from(map).map_err(|source| BpfError::Setup {
                step: Step::MapHandles,
                source,
            })
        };
        let bindings = handle(&skel.maps.bindings)?;
        let hosts = handle(&skel.maps.hosts)?;
        let stats = handle(&skel.maps.stats)?;
        let group_stats = handle(&skel.maps.group_stats)?;

        let netns = fs::File::open(NETNS_PATH).map_err(|source| BpfError::Netns {
            path: NETNS_PATH,
            source,
        })?;
        let link = skel
            .progs
            .steer
            .attach_netns(netns.as_raw_fd())
            .map_err(|e| classify(Step::Attach, e))?;
        // `netns` is closed when it drops: the link holds its own reference.

        Ok(Steering {
            link: Some(link),
            maps: Bindings {
                trie: bindings,
                hosts,
            },
            counters: Counters { stats, group_stats },
        })
    }

    /// Steer connections to `prefix` on `port` (insert into the bindings map), counting
    /// their lookups under `group`. A longer prefix on the same port wins over it. Adding a
    /// binding twice overwrites its group.
    pub fn add_binding(&mut self, prefix: Prefix, port: u16, group: u32) -> Result<(), BpfError> {
        self.maps.add(prefix, port, group)
    }

    /// Stop steering `prefix` on `port` (see `Bindings::remove`).
    pub fn remove_binding(&mut self, prefix: Prefix, port: u16) -> Result<(), BpfError> {
        self.maps.remove(prefix, port)
    }

    /// The maps of steered bindings, to write from other threads too.
    pub fn bindings(&self) -> &Bindings {
        &self.maps
    }

    /// Steer `port` on every address, IPv4 and IPv6.
    pub fn add_port(&mut self, port: u16, group: u32) -> Result<(), BpfError> {
        self.add_binding(Prefix::ALL_V4, port, group)?;
        self.add_binding(Prefix::ALL_V6, port, group)
    }

    /// Stop steering `port` on every address.
    pub fn remove_port(&mut self, port: u16) -> Result<(), BpfError> {
        self.remove_binding(Prefix::ALL_V4, port)?;
        self.remove_binding(Prefix::ALL_V6, port)
    }

    /// Stop steering every port at once, by dropping the link (used first thing
    /// on SIGTERM so new connections are refused immediately). Connections already
    /// accepted, or waiting in the listener's backlog, are not affected. It cannot
    /// be undone: the ports map can still be edited, but nothing reads it.
    pub fn detach(&mut self) {
        self.link = None;
    }

    /// Read the per-CPU stats counters, summed over CPUs: `(steered, dropped, passed)`.
    pub fn stats(&self) -> Result<(u64, u64, u64), BpfError> {
        self.counters.totals()
    }

    /// Zero the lookup counters of port `group`, so that an app given a group another app
    /// had starts from nothing.
    pub fn clear_group(&self, group: u32) -> Result<(), BpfError> {
        let fail = |source| BpfError::ClearGroup { group, source };
        let cpus = libbpf_rs::num_possible_cpus().map_err(fail)?;
        let zeros = vec![vec![0u8; 8]; cpus];
        let g = group.min(MAX_GROUPS - 1);
        for index in [g * 2, g * 2 + 1] {
            self.counters
                .group_stats
                .update_percpu(&index.to_ne_bytes(), &zeros, MapFlags::ANY)
                .map_err(fail)?;
        }
        Ok(())
    }

    /// A reader of the counters with fds of its own, for another thread.
    pub fn counters(&self) -> Result<Counters, BpfError> {
        let dup = |m: &MapHandle| {
            MapHandle::try_from(m).map_err(|source| BpfError::Setup {
                step: Step::MapHandles,
                source,
            })
        };
        Ok(Counters {
            stats: dup(&self.counters.stats)?,
            group_stats: dup(&self.counters.group_stats)?,
        })
    }
}

/// Keys and values for one map's batch update, end to end as the kernel reads them.
#[derive(Default)]
struct Batch {
    keys: Vec<u8>,
    values: Vec<u8>,
    count: u32,
    /// The first item's port, for the error.
    first_port: Option<u16>,
}

impl Batch {
    fn push(&mut self, port: u16, key: &[u8], value: &[u8]) {
        self.keys.extend_from_slice(key);
        self.values.extend_from_slice(value);
        self.count += 1;
        self.first_port.get_or_insert(port);
    }

    fn write(&self, map: &MapHandle) -> Result<(), BpfError> {
        let Some(port) = self.first_port else {
            return Ok(());
        };
        map.update_batch(
            &self.keys,
            &self.values,
            self.count,
            MapFlags::ANY,
            MapFlags::empty(),
        )
        .map_err(|source| BpfError::Port {
            port,
            adding: true,
            source,
        })
    }
}

impl Bindings {
    /// Steer connections to `prefix` on `port` (insert into the bindings map), counting
    /// their lookups under `group`. A longer prefix on the same port wins over it. Adding a
    /// binding twice overwrites its group.
    pub fn add(&self, prefix: Prefix, port: u16, group: u32) -> Result<(), BpfError> {
        let value = binding_value(prefix, group);
        let done = match host_key(prefix, port) {
            Some(key) => self.hosts.update(&key, &value, MapFlags::ANY),
            None => self
                .trie
                .update(&binding_key(prefix, port), &value, MapFlags::ANY),
        };
        done.map_err(|source| BpfError::Port {
            port,
            adding: true,
            source,
        })
    }

    /// Steer each (prefix, port, group) of `items` as `add` does, in a batch update per
    /// map (a start with 200,000 apps writes 800,000 bindings: one syscall each was most of it).
    /// On an error some of them may be in and others not: the caller adds them one by one then
    /// (adding a binding twice only overwrites it).
    pub fn add_many(
        &self,
        items: impl IntoIterator<Item = (Prefix, u16, u32)>,
    ) -> Result<(), BpfError> {
        // Each map's keys and values, in one buffer each: (hosts, trie).
        let mut hosts = Batch::default();
        let mut trie = Batch::default();
        for (prefix, port, group) in items {
            let value = binding_value(prefix, group);
            match host_key(prefix, port) {
                Some(key) => hosts.push(port, &key, &value),
                None => trie.push(port, &binding_key(prefix, port), &value),
            }
        }
        hosts.write(&self.hosts)?;
        trie.write(&self.trie)
    }

    /// Stop steering `prefix` on `port`: new connections that only it covered take the
    /// kernel's normal lookup. Established connections are not affected. Removing a binding
    /// that is not there is not an error.
    pub fn remove(&self, prefix: Prefix, port: u16) -> Result<(), BpfError> {
        let done = match host_key(prefix, port) {
            Some(key) => self.hosts.delete(&key),
            None => self.trie.delete(&binding_key(prefix, port)),
        };
        match done {
            Err(source) if source.kind() != ErrorKind::NotFound => Err(BpfError::Port {
                port,
                adding: false,
                source,
            }),
            _ => Ok(()),
        }
    }
}

impl Counters {
    /// Every lookup for our ports, summed over CPUs: `(steered, dropped, passed)`.
    pub fn totals(&self) -> Result<(u64, u64, u64), BpfError> {
        let steered = sum_percpu(&self.stats, STAT_STEERED)?;
        let dropped = sum_percpu(&self.stats, STAT_DROPPED_NO_LISTENER)?
            .wrapping_add(sum_percpu(&self.stats, STAT_DROPPED_ASSIGN)?);
        let passed = sum_percpu(&self.stats, STAT_PASSED)?;
        Ok((steered, dropped, passed))
    }

    /// `(steered, dropped)` for one port group.
    pub fn group(&self, group: u32) -> Result<(u64, u64), BpfError> {
        let g = group.min(MAX_GROUPS - 1);
        Ok((
            sum_percpu(&self.group_stats, g * 2)?,
            sum_percpu(&self.group_stats, g * 2 + 1)?,
        ))
    }
}

/// One counter of a per-CPU array map, summed over CPUs.
fn sum_percpu(map: &MapHandle, index: u32) -> Result<u64, BpfError> {
    let per_cpu = map
        .lookup_percpu(&index.to_ne_bytes(), MapFlags::ANY)
        .map_err(|source| BpfError::Stats { source })?
        // An array map has every index below max_entries, so None means the
        // index is out of range: a mismatch with steer.bpf.c.
        .ok_or_else(|| stats_error(format!("no counter at index {index}")))?;
    per_cpu.iter().try_fold(0u64, |sum, value| {
        let bytes = <[u8; 8]>::try_from(value.as_slice())
            .map_err(|_| stats_error(format!("counter value is {} bytes, not 8", value.len())))?;
        Ok(sum.wrapping_add(u64::from_ne_bytes(bytes)))
    })
}
