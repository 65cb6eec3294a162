//! Files under `/proc/PID/` that a process holds open (`/proc/self/stat`,
//! `/proc/self/status`, `/proc/self/maps`, `/proc/self/mem`, an
//! `opendir("/proc/self/fd")`, the same of a child of the computation).
//!
//! The restart driver cannot open them: the processes they name do not
//! exist yet (or, worse, another process has the number). The restored
//! process opens them itself, in its plan, once every process of the
//! restart exists (after the memory barrier): `/proc/PID/...` then names
//! the restored process, which has its old PID. The plan fills every free
//! fd number below the highest such fd in ascending order (`/proc` files at
//! theirs, `/dev/null` in the gaps, closed again afterwards), so each
//! `openat` returns exactly the number the program had; then its offset.
//!
//! Limits: a file of a thread other than the main one
//! (`/proc/PID/task/TID/...`) is opened before the threads exist and fails
//! the restart, naming it; fds sharing one open file description get one
//! each (their offsets no longer move together). Paths from an image are
//! checked: only `/proc/N/NAME` and `/proc/N/task/T/NAME`, NAME not a link
//! out of `/proc` (`root`, `cwd`, `exe`) and, unless it is the directory
//! itself, not a directory of links (`fd`, `map_files`, `ns`, ...).

use super::LiveFd;
use crate::error::{EngineError, Result};
use crate::image::{FdKind, ProcessImage};
use crate::plan::PlanBuilder;

/// Whether an fd's target is under `/proc/PID/`.
pub fn is_procfile(target: &str) -> bool {
    target.strip_prefix("/proc/").and_then(|r| r.split('/').next()).is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

pub fn capture(live: &LiveFd) -> Result<FdKind> {
    let dir = live.meta.is_dir();
    check_path(live.target, dir).map_err(|why| live.unsupported(&format!("/proc file ckpt does not reopen ({why})")))?;
    Ok(FdKind::ProcFile { path: live.target.to_string(), dir })
}

/// Checks a `/proc` path of an image (see the module doc).
fn check_path(path: &str, dir: bool) -> std::result::Result<(), &'static str> {
    if path.len() > 256 || path.contains('\0') {
        return Err("too long or holds a NUL");
    }
    let parts: Vec<&str> = path.strip_prefix("/proc/").ok_or("not under /proc")?.split('/').collect();
    let num = |s: &str| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
    let rest: &[&str] = match parts.as_slice() {
        [p, rest @ ..] if num(p) => match rest {
            ["task", t, rest @ ..] if num(t) => rest,
            _ => rest,
        },
        _ => return Err("not under /proc/PID"),
    };
    match rest {
        [] => Ok(()),
        [name] if ["root", "cwd", "exe"].contains(name) => Err("a link out of /proc"),
        [name] if !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') => {
            if !dir && ["fd", "fdinfo", "map_files", "ns", "net", "attr", "task"].contains(name) {
                return Err("a directory of links");
            }
            Ok(())
        }
        _ => Err("deeper than /proc/PID/NAME"),
    }
}

/// Adds to `p` the ops that open `image`'s `/proc` files at their fd
/// numbers. Call after the first barrier (every process exists), before
/// anything touches those fds.
pub fn plan(p: &mut PlanBuilder, generation: u64, image: &ProcessImage) -> Result<()> {
    let files: Vec<_> = image.fds.iter().filter(|f| matches!(f.kind, FdKind::ProcFile { .. })).collect();
    let Some(max) = files.iter().map(|f| f.fd).max() else { return Ok(()) };
    if !(0..=65536).contains(&max) {
        return Err(EngineError::BadImage { generation, what: format!("process {} has a /proc file at fd {max}", image.pid) });
    }
    let null = p.data(b"/dev/null\0");
    let mut gaps = Vec::new();
    for n in 0..=max {
        match image.fds.iter().find(|f| f.fd == n) {
            Some(f) => {
                let FdKind::ProcFile { path, dir } = &f.kind else { continue };
                check_path(path, *dir).map_err(|why| EngineError::BadImage { generation, what: format!("fd {n} of process {} names {path:?}, which ckpt does not open ({why})", image.pid) })?;
                let keep = libc::O_ACCMODE | libc::O_NONBLOCK | libc::O_APPEND;
                let flags = (f.flags & keep) | if *dir { libc::O_DIRECTORY } else { 0 } | if f.cloexec { libc::O_CLOEXEC } else { 0 };
                let mut c = path.as_bytes().to_vec();
                c.push(0);
                let at = p.data(&c);
                p.syscall(libc::SYS_openat, &[(libc::AT_FDCWD as i64 as u64).into(), at.into(), (flags as u64).into(), 0u64.into()], Some(n as u64), false, format!("open {path} again as fd {n} (as the restored process)"));
                if f.pos > 0 && !*dir {
                    p.syscall(libc::SYS_lseek, &[(n as u64).into(), (f.pos as u64).into(), (libc::SEEK_SET as u64).into()], None, true, format!("offset {} of {path}", f.pos));
                }
            }
            None => {
                p.syscall(libc::SYS_openat, &[(libc::AT_FDCWD as i64 as u64).into(), null.into(), (libc::O_RDONLY as u64).into(), 0u64.into()], Some(n as u64), false, format!("fill fd {n} while /proc files are opened"));
                gaps.push(n);
            }
        }
    }
    for n in gaps {
        p.syscall(libc::SYS_close, &[(n as u64).into()], None, false, format!("close filler fd {n}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_proc_files_pass() {
        for ok in ["/proc/12/stat", "/proc/12/task/13/status", "/proc/12/mem", "/proc/12/maps"] {
            assert!(check_path(ok, false).is_ok(), "{ok}");
        }
        assert!(check_path("/proc/12/fd", true).is_ok());
        for bad in ["/proc/12/root", "/proc/12/cwd", "/proc/12/fd/3", "/proc/12/root/etc/shadow", "/proc/12/fd", "/proc/x/stat", "/proc/12/../1/stat", "/etc/passwd", "/proc/12/map_files"] {
            assert!(check_path(bad, false).is_err(), "{bad}");
        }
    }
}
