//! Include with `#[path = "common/users.rs"] mod users;`.
//!
//! A second, ordinary account for the tests that check what other users
//! get: made with `useradd` the first time a test asks for it (the suite
//! runs as root), then reused.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// The account's name.
pub const NAME: &str = "ckpt-test";

/// An ordinary user of this machine.
#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl User {
    /// `cmd`, to be run as this user (real, effective and saved ids, its
    /// groups only, `HOME` and `USER` set, no `XDG_RUNTIME_DIR`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.uid(self.uid).gid(self.gid).env("HOME", &self.home).env("USER", &self.name).env("LOGNAME", &self.name).env_remove("XDG_RUNTIME_DIR");
        let gid = self.gid;
        // SAFETY: setgroups is async-signal-safe; it runs in the child
        // before exec (Command::uid/gid do not drop supplementary groups).
        unsafe {
            // std runs this after its setuid, having already cleared the
            // supplementary groups (setgroups(0)): nothing is left to do then.
            c.pre_exec(move || if libc::geteuid() != 0 || libc::setgroups(1, &gid) == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) });
        }
        c
    }
}

static MAKING: Mutex<()> = Mutex::new(());

/// The test account, made if missing.
pub fn other_user() -> User {
    let _one = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    if lookup().is_none() {
        let out = Command::new("useradd").args(["--create-home", "--shell", "/bin/sh", "--user-group", NAME]).output().expect("running useradd");
        // 9: the name is taken (another test binary made it meanwhile).
        assert!(out.status.success() || out.status.code() == Some(9), "useradd {NAME}: {}", String::from_utf8_lossy(&out.stderr));
    }
    lookup().unwrap_or_else(|| panic!("user {NAME} missing after useradd"))
}

fn lookup() -> Option<User> {
    let u = nix::unistd::User::from_name(NAME).ok().flatten()?;
    Some(User { name: u.name, uid: u.uid.as_raw(), gid: u.gid.as_raw(), home: u.dir })
}
