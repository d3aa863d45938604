//! `--user USER` and `--group GROUP`: a proxy started as root (to bind low ports, load the bpf
//! program) runs the rest of its life as an ordinary user.
//!
//! Names are looked up through NSS (`getpwnam_r`, `getgrnam_r` and their by-id twins), as
//! `id` and `chown` do, so users from LDAP, sssd or systemd-userdb are found as well as those
//! in /etc/passwd. A number is taken as a uid or gid as it is, with its name if it has one.
//! The user's other groups (`getgrouplist`) are not looked up: the switch keeps only the one
//! group, so the proxy holds no group's rights but that one.
//!
//! The switch happens once set-up is done, before any relay thread exists, and before the
//! capabilities are narrowed (switching needs CAP_SETUID and CAP_SETGID, narrowing the bounding
//! set CAP_SETPCAP): supplementary groups are reset to the one group, then gid, then uid (all
//! of real, effective and saved, so there is no way back), with `PR_SET_KEEPCAPS` so that the
//! capabilities survive the uid change. The caller then keeps only what the running proxy
//! needs (`caps::keep_only`) and raises that into the ambient set (`caps::regain`), so that an
//! upgrade's new process, exec'd as this user, gets exactly them too. glibc applies
//! `setresuid` and friends to every thread of the process, the log writer included.

use std::ffi::{CStr, CString};
use std::fmt;
use std::io;

use super::caps::{self, CapsError};

/// Who to run as, looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub user: String,
    pub uid: u32,
    pub group: String,
    pub gid: u32,
}

impl fmt::Display for Ids {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "user {} (uid {}) group {} (gid {})",
            self.user, self.uid, self.group, self.gid
        )
    }
}

/// Why `--user`/`--group` could not be honoured.
#[derive(Debug)]
pub enum UserError {
    /// No such user in any passwd source.
    NoUser(String),
    /// No such group in any group source.
    NoGroup(String),
    /// A numeric uid without a passwd entry and no --group to say which group.
    NoPrimaryGroup(u32),
    /// The lookup itself failed (an NSS source unreachable, out of memory): the database
    /// ("user" or "group") and the name or id asked for.
    Lookup(&'static str, String, io::Error),
    /// A set*id call failed (usually: not started as root).
    Switch(&'static str, io::Error),
    /// The kept capabilities could not be restored after the switch.
    Caps(CapsError),
}

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // "in /etc/passwd" first: where an operator looks, and what tests/hardening.rs reads.
            UserError::NoUser(u) => write!(
                f,
                "no user {u:?} in /etc/passwd nor in the other passwd sources of /etc/nsswitch.conf"
            ),
            UserError::NoGroup(g) => write!(
                f,
                "--group: no group {g:?} in /etc/group nor in the other group sources of \
                 /etc/nsswitch.conf"
            ),
            UserError::NoPrimaryGroup(uid) => write!(
                f,
                "uid {uid} has no passwd entry, so no primary group: give its group with --group"
            ),
            UserError::Lookup(db, key, e) => write!(f, "cannot look up {db} {key:?}: {e}"),
            UserError::Switch(call, e) if e.raw_os_error() == Some(libc::EPERM) => write!(
                f,
                "{call} failed: {e} (switching user needs root or CAP_SETUID and CAP_SETGID)"
            ),
            UserError::Switch(call, e) => write!(f, "{call} failed: {e}"),
            UserError::Caps(e) => write!(f, "after switching user: {e}"),
        }
    }
}

impl std::error::Error for UserError {}

/// A decimal uid or gid: digits only, no sign, within u32 and not -1 (u32::MAX, "no change").
pub fn parse_id(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u32>().ok().filter(|&id| id != u32::MAX)
}

/// A passwd entry: the name, the uid and the primary gid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passwd {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// A group entry: the name and the gid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub gid: u32,
}

/// The user called `name`, if any passwd source knows it.
pub fn passwd_by_name(name: &str) -> io::Result<Option<Passwd>> {
    // A name with a NUL in it cannot be in any database.
    let Ok(key) = CString::new(name) else {
        return Ok(None);
    };
    nss(
        |pwd, buf, result| {
            // SAFETY: getpwnam_r reads the NUL-terminated key and writes the entry into `pwd`,
            // its strings into `buf` (of the length given) and a pointer into `result`; all
            // three outlive the call.
            unsafe { libc::getpwnam_r(key.as_ptr(), pwd, buf.as_mut_ptr(), buf.len(), result) }
        },
        passwd_of,
    )
}

/// The user with `uid`, if any passwd source knows it.
pub fn passwd_by_uid(uid: u32) -> io::Result<Option<Passwd>> {
    nss(
        |pwd, buf, result| {
            // SAFETY: as in passwd_by_name, with an integer key.
            unsafe { libc::getpwuid_r(uid, pwd, buf.as_mut_ptr(), buf.len(), result) }
        },
        passwd_of,
    )
}

/// The group called `name`, if any group source knows it.
pub fn group_by_name(name: &str) -> io::Result<Option<Group>> {
    let Ok(key) = CString::new(name) else {
        return Ok(None);
    };
    nss(
        |grp, buf, result| {
            // SAFETY: as in passwd_by_name, for a struct group.
            unsafe { libc::getgrnam_r(key.as_ptr(), grp, buf.as_mut_ptr(), buf.len(), result) }
        },
        group_of,
    )
}

/// The group with `gid`, if any group source knows it.
pub fn group_by_gid(gid: u32) -> io::Result<Option<Group>> {
    nss(
        |grp, buf, result| {
            // SAFETY: as in passwd_by_name, for a struct group with an integer key.
            unsafe { libc::getgrgid_r(gid, grp, buf.as_mut_ptr(), buf.len(), result) }
        },
        group_of,
    )
}

fn passwd_of(pwd: &libc::passwd) -> Passwd {
    Passwd {
        // SAFETY: a successful getpw*_r points pw_name at a NUL-terminated string in the
        // buffer, which nss keeps alive while this runs.
        name: unsafe { CStr::from_ptr(pwd.pw_name) }
            .to_string_lossy()
            .into_owned(),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    }
}

fn group_of(grp: &libc::group) -> Group {
    Group {
        // SAFETY: as in passwd_of, for gr_name.
        name: unsafe { CStr::from_ptr(grp.gr_name) }
            .to_string_lossy()
            .into_owned(),
        gid: grp.gr_gid,
    }
}

/// The C entry structs the `get*_r` functions fill in.
trait CEntry: Sized {
    /// The sysconf name of the suggested buffer size for this database.
    const SIZE_HINT: libc::c_int;
    fn empty() -> Self;
}

impl CEntry for libc::passwd {
    const SIZE_HINT: libc::c_int = libc::_SC_GETPW_R_SIZE_MAX;
    fn empty() -> Self {
        // SAFETY: struct passwd is pointers and integers, for which all zeroes is valid.
        unsafe { std::mem::zeroed() }
    }
}

impl CEntry for libc::group {
    const SIZE_HINT: libc::c_int = libc::_SC_GETGR_R_SIZE_MAX;
    fn empty() -> Self {
        // SAFETY: struct group is pointers and integers, for which all zeroes is valid.
        unsafe { std::mem::zeroed() }
    }
}

/// The largest buffer tried for one entry: a group of many thousand members needs a few
/// hundred kB; past this a source is broken rather than its entry large.
const MAX_BUFFER: usize = 16 << 20;

/// Call one `get*_r` function with a buffer for its strings, twice as large each time it
/// answers ERANGE, and `convert` the entry while the buffer lives (`Ok(None)`: no such entry).
fn nss<T: CEntry, U>(
    mut call: impl FnMut(&mut T, &mut [libc::c_char], &mut *mut T) -> libc::c_int,
    convert: impl FnOnce(&T) -> U,
) -> io::Result<Option<U>> {
    // SAFETY: sysconf only reads its argument; -1 (no suggestion) is handled below.
    let hint = unsafe { libc::sysconf(T::SIZE_HINT) };
    let mut len = usize::try_from(hint)
        .ok()
        .filter(|&n| n > 0)
        .unwrap_or(1024);
    loop {
        let mut buf = vec![0 as libc::c_char; len];
        let mut entry = T::empty();
        let mut result: *mut T = std::ptr::null_mut();
        match call(&mut entry, &mut buf, &mut result) {
            0 if result.is_null() => return Ok(None),
            0 => return Ok(Some(convert(&entry))),
            libc::ERANGE if len < MAX_BUFFER => len *= 2,
            // getpwnam(3): some sources answer these for a name or id they do not have.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            rc => return Err(io::Error::from_raw_os_error(rc)),
        }
    }
}

/// Look up `user` and `group` (default: the user's primary group). A name is looked up first;
/// a number with no such name is a uid or gid, named after its entry if it has one.
pub fn lookup(user: &str, group: Option<&str>) -> Result<Ids, UserError> {
    let failed = |db: &'static str, key: &str| {
        let key = key.to_owned();
        move |e| UserError::Lookup(db, key, e)
    };
    let by_name = passwd_by_name(user).map_err(failed("user", user))?;
    let by_id = match (&by_name, parse_id(user)) {
        (None, Some(uid)) => Some((uid, passwd_by_uid(uid).map_err(failed("user", user))?)),
        _ => None,
    };
    let (user_name, uid, primary) = match (by_name, by_id) {
        (Some(p), _) | (None, Some((_, Some(p)))) => (p.name, p.uid, Some(p.gid)),
        (None, Some((uid, None))) => (user.to_owned(), uid, None),
        (None, None) => return Err(UserError::NoUser(user.to_owned())),
    };
    let (group_name, gid) = match group {
        Some(g) => match group_by_name(g).map_err(failed("group", g))? {
            Some(e) => (e.name, e.gid),
            None => {
                let gid = parse_id(g).ok_or_else(|| UserError::NoGroup(g.to_owned()))?;
                let entry = group_by_gid(gid).map_err(failed("group", g))?;
                (entry.map_or_else(|| g.to_owned(), |e| e.name), gid)
            }
        },
        None => {
            let gid = primary.ok_or(UserError::NoPrimaryGroup(uid))?;
            let entry = group_by_gid(gid).map_err(failed("group", &gid.to_string()))?;
            (entry.map_or_else(|| gid.to_string(), |e| e.name), gid)
        }
    };
    Ok(Ids {
        user: user_name,
        uid,
        group: group_name,
        gid,
    })
}

/// Become `ids`, keeping the capabilities held now (the caller narrows them next, with
/// `caps::keep_only`, then makes what it kept inheritable with `caps::regain`). Nothing is
/// done if the process already runs as `ids` (an upgrade's new process, exec'd by one that had
/// switched); `Ok(false)` then.
pub fn switch(ids: &Ids) -> Result<bool, UserError> {
    let (mut ruid, mut euid, mut suid) = (0, 0, 0);
    let (mut rgid, mut egid, mut sgid) = (0, 0, 0);
    // SAFETY: getres[ug]id write three ids into the variables we pass.
    unsafe {
        libc::getresuid(&mut ruid, &mut euid, &mut suid);
        libc::getresgid(&mut rgid, &mut egid, &mut sgid);
    }
    if [ruid, euid, suid] == [ids.uid; 3] && [rgid, egid, sgid] == [ids.gid; 3] {
        return Ok(false);
    }
    let check = |call: &'static str, rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(UserError::Switch(call, io::Error::last_os_error()))
        }
    };
    // SAFETY: prctl with integer arguments only.
    check("prctl(PR_SET_KEEPCAPS)", unsafe {
        libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0)
    })?;
    let gid = ids.gid;
    // SAFETY: setgroups reads one gid from the pointer we pass; set*id take plain integers.
    check("setgroups", unsafe { libc::setgroups(1, &gid) })?;
    // SAFETY: as above.
    check("setresgid", unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: as above.
    check("setresuid", unsafe {
        libc::setresuid(ids.uid, ids.uid, ids.uid)
    })?;
    // SAFETY: prctl with integer arguments only.
    check("prctl(PR_SET_KEEPCAPS)", unsafe {
        libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0)
    })?;
    // The uid change cleared the effective set; the permitted one survived (KEEPCAPS).
    caps::effective_from_permitted().map_err(UserError::Caps)?;
    // SAFETY: as above.
    unsafe {
        libc::getresuid(&mut ruid, &mut euid, &mut suid);
    }
    if [ruid, euid, suid] != [ids.uid; 3] {
        return Err(UserError::Switch(
            "setresuid",
            io::Error::other(format!("still uid {ruid}/{euid}/{suid}")),
        ));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Every Debian system has root/root and nobody/nogroup (base-passwd).

    #[test]
    fn entries() {
        let nobody = passwd_by_name("nobody").unwrap().unwrap();
        assert_eq!((nobody.uid, nobody.gid), (65534, 65534));
        assert_eq!(passwd_by_uid(0).unwrap().unwrap().name, "root");
        assert_eq!(group_by_name("nogroup").unwrap().unwrap().gid, 65534);
        assert_eq!(group_by_gid(0).unwrap().unwrap().name, "root");
        assert_eq!(passwd_by_name("no-such-user-here").unwrap(), None);
        assert_eq!(passwd_by_name("nul\0byte").unwrap(), None);
        assert_eq!(group_by_name("no-such-group-here").unwrap(), None);
        assert_eq!(parse_id("0"), Some(0));
        for bad in ["", "-1", "+1", "4294967295", "1x", " 1"] {
            assert_eq!(parse_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn lookup_root_and_nobody() {
        let root = lookup("root", None).unwrap();
        assert_eq!(
            root,
            Ids {
                user: "root".into(),
                uid: 0,
                group: "root".into(),
                gid: 0
            }
        );
        let ids = lookup("nobody", None).unwrap();
        assert_eq!((ids.uid, ids.gid), (65534, 65534));
        assert_eq!(ids.group, "nogroup");
        let ids = lookup("nobody", Some("nogroup")).unwrap();
        assert_eq!((ids.uid, ids.gid), (65534, 65534));
        // Numbers: named after their entry when there is one, taken as they are otherwise.
        let ids = lookup("65534", Some("0")).unwrap();
        assert_eq!((ids.user.as_str(), ids.group.as_str()), ("nobody", "root"));
        let ids = lookup("3999999", Some("3999998")).unwrap();
        assert_eq!((ids.uid, ids.gid), (3999999, 3999998));
        assert_eq!(
            (ids.user.as_str(), ids.group.as_str()),
            ("3999999", "3999998")
        );
    }

    #[test]
    fn unknown_names_are_clear_errors() {
        let e = lookup("no-such-user-here", None).unwrap_err();
        assert!(matches!(e, UserError::NoUser(_)), "{e:?}");
        assert!(
            e.to_string().contains("no user \"no-such-user-here\""),
            "{e}"
        );
        let e = lookup("nobody", Some("no-such-group-here")).unwrap_err();
        assert!(matches!(e, UserError::NoGroup(_)), "{e:?}");
        assert!(
            e.to_string().contains("no group \"no-such-group-here\""),
            "{e}"
        );
        let e = lookup("3999999", None).unwrap_err();
        assert!(matches!(e, UserError::NoPrimaryGroup(3999999)), "{e:?}");
        assert!(e.to_string().contains("--group"), "{e}");
    }

    /// The buffer doubles while the call answers ERANGE, up to a bound.
    #[test]
    fn the_buffer_grows_on_erange() {
        let mut sizes = Vec::new();
        let found = nss::<libc::group, usize>(
            |grp, buf, result| {
                sizes.push(buf.len());
                if buf.len() < 100_000 {
                    return libc::ERANGE;
                }
                *result = grp;
                0
            },
            |_| 7,
        )
        .unwrap();
        assert_eq!(found, Some(7));
        assert!(
            sizes.len() > 1 && sizes.windows(2).all(|w| w[1] == 2 * w[0]),
            "{sizes:?}"
        );
        let e = nss::<libc::group, ()>(|_, _, _| libc::ERANGE, |_| ()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ERANGE));
        let e = nss::<libc::group, ()>(|_, _, _| libc::EIO, |_| ()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
    }
}
