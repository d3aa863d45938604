//! `--user USER` and `--group GROUP`: a proxy started as root (to bind low ports, load the bpf
//! program) runs the rest of its life as an ordinary user.
//!
//! Names are looked up in `/etc/passwd` and `/etc/group` directly (no NSS, no new crate): the
//! proxy's own user is a local system account. A number is taken as a uid or gid as it is.
//!
//! The switch happens once set-up is done, before any relay thread exists, and before the
//! capabilities are narrowed (switching needs CAP_SETUID and CAP_SETGID, narrowing the bounding
//! set CAP_SETPCAP): supplementary groups are reset to the one group, then gid, then uid (all
//! of real, effective and saved, so there is no way back), with `PR_SET_KEEPCAPS` so that the
//! capabilities survive the uid change. The caller then keeps only what the running proxy
//! needs (`caps::keep_only`) and raises that into the ambient set (`caps::regain`), so that an
//! upgrade's new process, exec'd as this user, gets exactly them too. glibc applies
//! `setresuid` and friends to every thread of the process, the log writer included.

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
    /// No such user in /etc/passwd.
    NoUser(String),
    /// No such group in /etc/group.
    NoGroup(String),
    /// A numeric uid without a passwd entry and no --group to say which group.
    NoPrimaryGroup(u32),
    /// /etc/passwd or /etc/group could not be read.
    Read(&'static str, io::Error),
    /// A set*id call failed (usually: not started as root).
    Switch(&'static str, io::Error),
    /// The kept capabilities could not be restored after the switch.
    Caps(CapsError),
}

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserError::NoUser(u) => write!(f, "no user {u:?} in /etc/passwd"),
            UserError::NoGroup(g) => write!(f, "--group: no group {g:?} in /etc/group"),
            UserError::NoPrimaryGroup(uid) => write!(
                f,
                "uid {uid} has no entry in /etc/passwd: give its group with --group"
            ),
            UserError::Read(file, e) => write!(f, "cannot read {file}: {e}"),
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

/// A user or a group as one line of /etc/passwd or /etc/group gives it: its name, its id, and
/// (a user) its primary gid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedId {
    pub name: String,
    pub id: u32,
    pub gid: Option<u32>,
}

/// Find `key` (a name, or a decimal id) in the text of /etc/passwd (`passwd = true`) or
/// /etc/group. Lines that are not well-formed are skipped; a name wins over an id.
pub fn find_named_id(text: &str, key: &str, passwd: bool) -> Option<NamedId> {
    let parse = |line: &str| -> Option<NamedId> {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let id = fields.next()?.parse::<u32>().ok()?;
        let gid = if passwd {
            Some(fields.next()?.parse::<u32>().ok()?)
        } else {
            None
        };
        (!name.is_empty()).then(|| NamedId {
            name: name.to_owned(),
            id,
            gid,
        })
    };
    let entries: Vec<NamedId> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(parse)
        .collect();
    if let Some(e) = entries.iter().find(|e| e.name == key) {
        return Some(e.clone());
    }
    let id = parse_id(key)?;
    entries.into_iter().find(|e| e.id == id)
}

/// A decimal uid or gid: digits only, no sign, within u32 and not -1 (u32::MAX, "no change").
pub fn parse_id(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u32>().ok().filter(|&id| id != u32::MAX)
}

/// Look up `user` and `group` (default: the user's primary group).
pub fn lookup(user: &str, group: Option<&str>) -> Result<Ids, UserError> {
    let read =
        |file: &'static str| std::fs::read_to_string(file).map_err(|e| UserError::Read(file, e));
    let passwd = read("/etc/passwd")?;
    let (user_name, uid, primary) = match find_named_id(&passwd, user, true) {
        Some(e) => (e.name, e.id, e.gid),
        None => match parse_id(user) {
            Some(uid) => (user.to_owned(), uid, None),
            None => return Err(UserError::NoUser(user.to_owned())),
        },
    };
    let groups = read("/etc/group")?;
    let (group_name, gid) = match group {
        Some(g) => match find_named_id(&groups, g, false) {
            Some(e) => (e.name, e.id),
            None => match parse_id(g) {
                Some(gid) => (g.to_owned(), gid),
                None => return Err(UserError::NoGroup(g.to_owned())),
            },
        },
        None => {
            let gid = primary.ok_or(UserError::NoPrimaryGroup(uid))?;
            let name = find_named_id(&groups, &gid.to_string(), false)
                .map_or_else(|| gid.to_string(), |e| e.name);
            (name, gid)
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

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # a comment\n\
        broken line\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
        app:x:1001:1002::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nnogroup:x:65534:\napps:x:1002:app\n";

    #[test]
    fn entries() {
        let e = find_named_id(PASSWD, "nobody", true).unwrap();
        assert_eq!((e.id, e.gid), (65534, Some(65534)));
        assert_eq!(find_named_id(PASSWD, "1001", true).unwrap().name, "app");
        assert_eq!(find_named_id(GROUP, "apps", false).unwrap().id, 1002);
        assert!(find_named_id(PASSWD, "broken line", true).is_none());
        assert!(find_named_id(PASSWD, "ghost", true).is_none());
        assert_eq!(parse_id("0"), Some(0));
        for bad in ["", "-1", "+1", "4294967295", "1x", " 1"] {
            assert_eq!(parse_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn lookup_nobody() {
        // Every Debian system has nobody/nogroup.
        let ids = lookup("nobody", None).unwrap();
        assert_eq!((ids.uid, ids.gid), (65534, 65534));
        assert!(matches!(
            lookup("no-such-user-here", None),
            Err(UserError::NoUser(_))
        ));
        assert!(matches!(
            lookup("nobody", Some("no-such-group-here")),
            Err(UserError::NoGroup(_))
        ));
    }
}
