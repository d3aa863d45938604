//! The listening sockets (doors), shared by the listener loop, which opens and closes them (the
//! modes do, on start, reloads, stops and upgrades), and the relay threads, which accept from
//! them (`accept`). Each is watched in the parking lot's epoll set, armed for one event at a
//! time: the thread told of waiting connections has the door to itself until it re-arms it.
//!
//! A door is closed under its own lock, which every accept and re-arm takes: once `close`
//! returns, no thread accepts from it again, and none re-arms its descriptor number after it
//! was closed and perhaps given to another socket.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use mio::net::TcpListener;

use crate::relay::park::Listeners;
use crate::sys::net::canonical;

/// One listening socket, open until `Doors::close`.
pub struct Door {
    key: u64,
    /// None once closed.
    listener: Mutex<Option<TcpListener>>,
}

/// One accepted connection and the address it came in on.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// The address and port the client dialled (getsockname of the accepted socket, which
    /// in bpf mode is the original destination, not the listener's), IPv4 written as IPv4.
    pub local: SocketAddr,
}

impl Door {
    fn lock(&self) -> MutexGuard<'_, Option<TcpListener>> {
        // Held for one accept or one epoll_ctl: a poisoned lock is still whole.
        self.listener.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accept one connection. `Ok(None)`: nothing waiting, or the door is closed.
    pub fn accept(&self) -> io::Result<Option<Accepted>> {
        match &*self.lock() {
            Some(l) => accept_from(l),
            None => Ok(None),
        }
    }

    /// Arm the door for its next event (nothing if it was closed meanwhile).
    pub fn rearm(&self, listeners: &Listeners) {
        if let Some(l) = &*self.lock() {
            if let Err(e) = listeners.rearm(l.as_raw_fd(), self.key) {
                // Not expected (the listener is open and watched); accepting from it stops.
                crate::error!("cannot watch a listener again: {e}; it accepts no more");
            }
        }
    }

    /// Its bound address and descriptor, for an upgrade; None once closed.
    pub fn handover(&self) -> Option<(SocketAddr, RawFd)> {
        let l = self.lock();
        let l = l.as_ref()?;
        Some((l.local_addr().ok()?, l.as_raw_fd()))
    }
}

/// The open doors, by key.
pub struct Doors {
    listeners: Listeners,
    open: Mutex<HashMap<u64, Arc<Door>>>,
    next_key: AtomicU64,
}

impl Doors {
    pub fn new(listeners: Listeners) -> Arc<Doors> {
        Arc::new(Doors {
            listeners,
            open: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Door>>> {
        // Every critical section is one map operation: a poisoned map is still whole.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the doors are watched.
    pub fn listeners(&self) -> &Listeners {
        &self.listeners
    }

    /// Open `listener` (non-blocking, listening) as a door: from now on the relay threads
    /// accept from it.
    pub fn open(&self, listener: TcpListener) -> io::Result<Arc<Door>> {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        self.listeners.add(listener.as_raw_fd(), key)?;
        let door = Arc::new(Door {
            key,
            listener: Mutex::new(Some(listener)),
        });
        self.lock().insert(key, Arc::clone(&door));
        Ok(door)
    }

    /// The door `key` if it is still open.
    pub fn get(&self, key: u64) -> Option<Arc<Door>> {
        self.lock().get(&key).cloned()
    }

    /// Close `door`: connections still in its backlog are refused by the kernel.
    pub fn close(&self, door: &Door) {
        self.lock().remove(&door.key);
        let mut l = door.lock();
        if let Some(listener) = l.take() {
            self.listeners.remove(listener.as_raw_fd());
        }
    }
}

/// Accept one connection, with the address the client dialled: the accepted socket's local
/// address, which keeps the original destination when sk_lookup steered the connection to us.
pub fn accept_from(listener: &TcpListener) -> io::Result<Option<Accepted>> {
    let (stream, peer) = match listener.accept() {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) => return Err(e),
    };
    // mio accepts with SOCK_NONBLOCK; the relay wants exactly that, as a std stream.
    // SAFETY: into_raw_fd hands over sole ownership of a valid, open socket.
    let stream = unsafe { TcpStream::from_raw_fd(stream.into_raw_fd()) };
    let local = canonical(stream.local_addr()?);
    Ok(Some(Accepted {
        stream,
        peer: canonical(peer),
        local,
    }))
}
