//! Running with no more privilege than serving needs: after every socket
//! that may need root is bound (listeners, the admin socket, the stats
//! listener), ringlb switches to the configured user and group and checks
//! that no capability is left. Also: warnings about config files others
//! could rewrite, and the hint a reload gets when it can no longer bind a
//! privileged port.
//!
//! The switch is made once worker and health threads run. That is sound
//! because glibc's (and musl's) setgroups/setgid/setuid wrappers change the
//! credentials of every thread of the process, not only the caller's
//! (setuid(2), NOTES); the check afterwards reads every thread's status to
//! make sure. io_uring work items take the submitting thread's credentials
//! when they are prepared, so later operations run as the new user too.

use std::ffi::{CStr, CString};
use std::mem::MaybeUninit;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Who to become: resolved from names (or numbers) before anything is
/// bound, so a missing user fails the start at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: Option<(String, libc::uid_t)>,
    pub group: (String, libc::gid_t),
}

impl Identity {
    /// `None` when neither is set. Without `group`, the user's primary group.
    pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<Identity>, String> {
        let user = user.map(lookup_user).transpose()?;
        if group.is_some() && user.is_none() {
            return Err(
                "group is set without user: a group alone would leave ringlb running \
                        as root; set user too"
                    .into(),
            );
        }
        let group = match (group, &user) {
            (Some(name), _) => lookup_group(name)?,
            (None, Some((_, _, gid))) => (group_name(*gid), *gid),
            (None, None) => return Ok(None),
        };
        Ok(Some(Identity {
            user: user.map(|(name, uid, _)| (name, uid)),
            group,
        }))
    }

    pub fn describe(&self) -> String {
        let (group, gid) = &self.group;
        match &self.user {
            Some((user, uid)) => format!("user {user} (uid {uid}), group {group} (gid {gid})"),
            None => format!("group {group} (gid {gid})"),
        }
    }

    /// setgroups, setgid, setuid, in that order (once the uid changed, the
    /// others would be refused), each checked; then every thread's
    /// credentials and capabilities are read back.
    pub fn drop_privileges(&self) -> Result<(), String> {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let gid = self.group.1;
        if euid != 0 {
            return self.check_unprivileged(euid);
        }
        // SAFETY: an empty list (count 0, null pointer) is valid.
        check(unsafe { libc::setgroups(0, std::ptr::null()) }, "setgroups")?;
        // SAFETY: plain syscall wrapper; glibc applies it to every thread.
        check(unsafe { libc::setgid(gid) }, "setgid")?;
        if let Some((_, uid)) = &self.user {
            // SAFETY: as above.
            check(unsafe { libc::setuid(*uid) }, "setuid")?;
            // SAFETY: as above. It must fail now: a way back to root would
            // make the drop worthless.
            if *uid != 0 && unsafe { libc::setuid(0) } == 0 {
                return Err("setuid(0) succeeded after dropping privileges".into());
            }
        }
        self.verify_threads()
    }

    /// Not root: nothing can be switched; the same identity is fine (the
    /// service manager already made it), another one is an error.
    fn check_unprivileged(&self, euid: libc::uid_t) -> Result<(), String> {
        // SAFETY: getegid has no preconditions.
        let egid = unsafe { libc::getegid() };
        let same_user = self.user.as_ref().is_none_or(|(_, uid)| *uid == euid);
        if same_user && self.group.1 == egid {
            return Ok(());
        }
        Err(format!(
            "cannot switch to {}: ringlb runs as uid {euid}, gid {egid}, not as root. Start it as \
             root to have it drop privileges, or leave out user and group and let the service \
             manager pick the user (systemd: User= with AmbientCapabilities=CAP_NET_BIND_SERVICE \
             for ports below 1024)",
            self.describe()
        ))
    }

    /// Every thread runs as the new user and group, with no capability.
    fn verify_threads(&self) -> Result<(), String> {
        let tasks = std::fs::read_dir("/proc/self/task")
            .map_err(|e| format!("cannot read /proc/self/task to check the drop: {e}"))?;
        for task in tasks.flatten() {
            let path = task.path().join("status");
            let Ok(status) = std::fs::read_to_string(&path) else {
                // A thread that just ended.
                continue;
            };
            self.verify_status(&status)
                .map_err(|e| format!("thread {}: {e}", task.file_name().to_string_lossy()))?;
        }
        Ok(())
    }

    fn verify_status(&self, status: &str) -> Result<(), String> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or("")
        };
        let all = |name: &str, id: u32| field(name).split_whitespace().all(|v| v == id.to_string());
        if let Some((user, uid)) = &self.user
            && !all("Uid:", *uid)
        {
            return Err(format!("still not user {user}: Uid {}", field("Uid:")));
        }
        if !all("Gid:", self.group.1) || !field("Groups:").is_empty() {
            return Err(format!(
                "still not group {}: Gid {}, Groups {}",
                self.group.0,
                field("Gid:"),
                field("Groups:")
            ));
        }
        for caps in ["CapEff:", "CapPrm:", "CapAmb:"] {
            let value = field(caps);
            if !value.is_empty() && u64::from_str_radix(value, 16) != Ok(0) {
                return Err(format!("capabilities remain: {caps} {value}"));
            }
        }
        Ok(())
    }
}

fn check(rc: libc::c_int, call: &str) -> Result<(), String> {
    if rc == 0 {
        return Ok(());
    }
    Err(format!(
        "{call} failed: {}",
        std::io::Error::last_os_error()
    ))
}

/// The size getpw*_r and getgr*_r buffers start at; doubled on ERANGE.
const NSS_BUFFER: usize = 4096;
const NSS_BUFFER_MAX: usize = 1 << 20;

/// A getpw*_r / getgr*_r lookup. `call(entry, buf, found)` makes the C call;
/// while the entry does not fit (ERANGE) the buffer is doubled, up to
/// NSS_BUFFER_MAX, as directory services with large groups need. `read`
/// takes what the caller needs out of the entry while `buf`, which its
/// strings point into, still lives. `Ok(None)`: no such entry.
///
/// # Safety
/// `call` must behave as those functions do: return 0 or an errno, and on 0
/// leave in `found` either null or `entry`, filled in, with every pointer in
/// it valid while `buf` lives.
unsafe fn nss_lookup<T, R>(
    mut call: impl FnMut(*mut T, &mut [u8], &mut *mut T) -> libc::c_int,
    read: impl FnOnce(&T) -> R,
) -> std::io::Result<Option<R>> {
    let mut size = NSS_BUFFER;
    loop {
        let mut buf = vec![0u8; size];
        let mut entry = MaybeUninit::<T>::uninit();
        let mut found: *mut T = std::ptr::null_mut();
        let rc = call(entry.as_mut_ptr(), &mut buf, &mut found);
        if rc == libc::ERANGE && size < NSS_BUFFER_MAX {
            size *= 2;
            continue;
        }
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        if found.is_null() {
            return Ok(None);
        }
        // SAFETY: by the caller's contract a non-null `found` is `entry`,
        // filled in by the call; buf, which it points into, lives until
        // the end of this iteration.
        return Ok(Some(read(unsafe { &*found })));
    }
}

/// getpwnam_r's and getgrnam_r's signature.
type ByNameCall<T> = unsafe extern "C" fn(
    *const libc::c_char,
    *mut T,
    *mut libc::c_char,
    libc::size_t,
    *mut *mut T,
) -> libc::c_int;

/// A passwd or group entry, with the reentrant call that finds one by name.
trait ByName: Sized {
    /// What it is, for messages.
    const KIND: &'static str;
    /// getpwnam_r or getgrnam_r: both keep nss_lookup's contract.
    const CALL: ByNameCall<Self>;
}

impl ByName for libc::passwd {
    const KIND: &'static str = "user";
    const CALL: ByNameCall<Self> = libc::getpwnam_r;
}

impl ByName for libc::group {
    const KIND: &'static str = "group";
    const CALL: ByNameCall<Self> = libc::getgrnam_r;
}

/// What `read` takes from the entry called `name`; `None` when there is none.
fn lookup_by_name<T: ByName, R>(
    name: &str,
    read: impl FnOnce(&T) -> R,
) -> Result<Option<R>, String> {
    // No entry has a NUL in its name.
    let Ok(cname) = CString::new(name) else {
        return Ok(None);
    };
    let call = |entry: *mut T, buf: &mut [u8], found: &mut *mut T| {
        // SAFETY: cname is a NUL-terminated string; entry, buf (with its
        // length) and found are valid for writes for the whole call.
        unsafe {
            T::CALL(
                cname.as_ptr(),
                entry,
                buf.as_mut_ptr().cast(),
                buf.len(),
                found,
            )
        }
    };
    // SAFETY: T::CALL is getpwnam_r or getgrnam_r, which keep nss_lookup's
    // contract (getpwnam_r(3), getgrnam_r(3)).
    unsafe { nss_lookup(call, read) }
        .map_err(|e| format!("cannot look up {} '{name}': {e}", T::KIND))
}

/// A user by name, or by number when no user has that name: its name,
/// uid and primary gid.
fn lookup_user(name: &str) -> Result<(String, libc::uid_t, libc::gid_t), String> {
    let ids = lookup_by_name(name, |pwd: &libc::passwd| (pwd.pw_uid, pwd.pw_gid))?
        .or_else(|| name.parse::<libc::uid_t>().ok().map(|uid| (uid, uid)));
    let (uid, gid) =
        ids.ok_or_else(|| format!("user '{name}' does not exist (see getent passwd)"))?;
    Ok((name.to_string(), uid, gid))
}

/// A group by name, or by number when no group has that name.
fn lookup_group(name: &str) -> Result<(String, libc::gid_t), String> {
    let gid = lookup_by_name(name, |grp: &libc::group| grp.gr_gid)?
        .or_else(|| name.parse::<libc::gid_t>().ok());
    let gid = gid.ok_or_else(|| format!("group '{name}' does not exist (see getent group)"))?;
    Ok((name.to_string(), gid))
}

/// The name of a gid, or the number.
fn group_name(gid: libc::gid_t) -> String {
    let call = |grp: *mut libc::group, buf: &mut [u8], found: &mut *mut libc::group| {
        // SAFETY: grp, buf (with its length) and found are valid for writes
        // for the whole call.
        unsafe { libc::getgrgid_r(gid, grp, buf.as_mut_ptr().cast(), buf.len(), found) }
    };
    let name = |grp: &libc::group| {
        // SAFETY: a non-null gr_name is a NUL-terminated string in the
        // buffer, which lives while nss_lookup runs this.
        (!grp.gr_name.is_null()).then(|| {
            unsafe { CStr::from_ptr(grp.gr_name) }
                .to_string_lossy()
                .into_owned()
        })
    };
    // SAFETY: getgrgid_r keeps nss_lookup's contract (getgrgid_r(3)).
    match unsafe { nss_lookup(call, name) } {
        Ok(Some(Some(name))) => name,
        _ => gid.to_string(),
    }
}

/// Why a config file (or list file) is a risk: others could rewrite what
/// ringlb runs on its next reload. Empty when it is fine or unreadable
/// (reading it reports that).
pub fn file_warnings(path: &Path) -> Vec<String> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let mode = meta.mode();
    let shown = path.display();
    let mut warnings = Vec::new();
    if mode & 0o022 != 0 {
        let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
            (true, true) => "its group and all users",
            (true, false) => "its group",
            _ => "all users",
        };
        warnings.push(format!(
            "{shown} is writable by {who} (mode {:o}): they could change what ringlb serves on \
             the next reload; chmod go-w {shown}",
            mode & 0o7777
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != euid && mode & 0o200 != 0 {
        warnings.push(format!(
            "{shown} is owned (and writable) by uid {}, neither root nor ringlb's own user: \
             chown root {shown}",
            meta.uid()
        ));
    }
    warnings
}

/// A hint for a listener a reload cannot bind because privileges were
/// dropped at start: `None` for any other failure.
pub fn bind_hint(port: u16, error: &std::io::Error) -> Option<String> {
    if error.raw_os_error() != Some(libc::EACCES) {
        return None;
    }
    let unprivileged = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|v| v.trim().parse::<u16>().ok())
        .unwrap_or(1024);
    (port < unprivileged).then(|| {
        format!(
            "port {port} is below {unprivileged} and ringlb gave up the privilege to bind such \
             ports at start (user/group): list such ports in the config from the start, or run \
             ringlb without user/group as a service user with CAP_NET_BIND_SERVICE (systemd: \
             AmbientCapabilities=CAP_NET_BIND_SERVICE)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_resolve_by_name_or_number() {
        let root = Identity::resolve(Some("root"), None).expect("root exists");
        assert_eq!(
            root,
            Some(Identity {
                user: Some(("root".into(), 0)),
                group: ("root".into(), 0),
            })
        );
        let err = Identity::resolve(Some("no-such-user-ringlb"), None).unwrap_err();
        assert!(
            err.contains("user 'no-such-user-ringlb' does not exist"),
            "{err}"
        );
        let err = Identity::resolve(Some("root"), Some("no-such-group-ringlb")).unwrap_err();
        assert!(
            err.contains("group 'no-such-group-ringlb' does not exist"),
            "{err}"
        );
        let numeric = Identity::resolve(Some("4242"), Some("4343")).expect("numbers");
        assert_eq!(
            numeric.map(|i| (i.user, i.group.1)),
            Some((Some(("4242".into(), 4242)), 4343))
        );
        assert_eq!(Identity::resolve(None, None), Ok(None));
        assert!(Identity::resolve(Some("a\0b"), None).is_err());
    }

    /// What a fake getpw*_r answers once the buffer is large enough.
    #[derive(Clone, Copy)]
    enum Answer {
        Entry,
        NoEntry,
        Errno(libc::c_int),
    }

    /// A fake getpw*_r: ERANGE until the buffer holds `needs` bytes, then
    /// `answer` (the entry is the buffer's size). Records each buffer size.
    fn fake_lookup(
        needs: usize,
        answer: Answer,
        sizes: &mut Vec<usize>,
    ) -> std::io::Result<Option<usize>> {
        let call = |entry: *mut usize, buf: &mut [u8], found: &mut *mut usize| {
            sizes.push(buf.len());
            match answer {
                _ if buf.len() < needs => libc::ERANGE,
                Answer::Entry => {
                    // SAFETY: entry is valid for writes, as nss_lookup
                    // passes it.
                    unsafe { entry.write(buf.len()) };
                    *found = entry;
                    0
                }
                Answer::NoEntry => 0,
                Answer::Errno(e) => e,
            }
        };
        // SAFETY: the fake keeps the contract: it fills entry before
        // pointing found at it, and returns 0 or an errno.
        unsafe { nss_lookup(call, |size: &usize| *size) }
    }

    #[test]
    fn a_lookup_doubles_its_buffer_until_the_entry_fits_up_to_the_cap() {
        let mut sizes = Vec::new();
        let found = fake_lookup(20_000, Answer::Entry, &mut sizes);
        assert_eq!(found.ok(), Some(Some(32768)));
        assert_eq!(sizes, [4096, 8192, 16384, 32768]);

        sizes.clear();
        let err = fake_lookup(usize::MAX, Answer::Entry, &mut sizes).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ERANGE));
        assert_eq!(sizes.first(), Some(&NSS_BUFFER));
        assert_eq!(sizes.last(), Some(&NSS_BUFFER_MAX));
        assert_eq!(sizes.len(), 9, "4 KiB doubled up to 1 MiB: {sizes:?}");

        sizes.clear();
        assert_eq!(fake_lookup(0, Answer::NoEntry, &mut sizes).ok(), Some(None));
        let err = fake_lookup(0, Answer::Errno(libc::EIO), &mut sizes).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert_eq!(sizes, [4096, 4096], "no retry but on ERANGE");
    }

    #[test]
    fn a_status_with_capabilities_left_fails_the_check() {
        let id = Identity {
            user: Some(("nobody".into(), 65534)),
            group: ("nogroup".into(), 65534),
        };
        let good = "Uid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\n\
                    Groups:\t\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n";
        assert_eq!(id.verify_status(good), Ok(()));
        let caps = good.replace("CapEff:\t0000000000000000", "CapEff:\t0000000000000400");
        assert!(id.verify_status(&caps).unwrap_err().contains("CapEff"));
        let uid = good.replace(
            "Uid:\t65534\t65534\t65534\t65534",
            "Uid:\t65534\t0\t65534\t65534",
        );
        assert!(id.verify_status(&uid).is_err());
        let groups = good.replace("Groups:\t", "Groups:\t0");
        assert!(id.verify_status(&groups).is_err());
    }

    #[test]
    fn only_eacces_below_the_unprivileged_start_gets_the_hint() {
        let denied = std::io::Error::from_raw_os_error(libc::EACCES);
        assert!(bind_hint(80, &denied).is_some_and(|h| h.contains("port 80")));
        assert!(bind_hint(8080, &denied).is_none());
        let in_use = std::io::Error::from_raw_os_error(libc::EADDRINUSE);
        assert!(bind_hint(80, &in_use).is_none());
    }
}
