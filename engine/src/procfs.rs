//! Readers for `/proc/PID/...`: the memory map, open fds, mm fields, and the
//! other per-process facts a checkpoint records from outside the process.

use std::fs;
use std::path::PathBuf;

use crate::error::{EngineError, Result};
use crate::image::{MmFields, Rlimit};

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    pub inode: u64,
    /// Path or kernel name (`[heap]`, `[stack]`, `[vdso]`, ...); empty for
    /// anonymous memory.
    pub name: String,
}

impl Mapping {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    pub fn prot(&self) -> u32 {
        (if self.read { libc::PROT_READ } else { 0 } | if self.write { libc::PROT_WRITE } else { 0 } | if self.exec { libc::PROT_EXEC } else { 0 })
            as u32
    }
}

fn proc_path(pid: i32, what: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{what}"))
}

fn read_proc(pid: i32, what: &str) -> Result<String> {
    let p = proc_path(pid, what);
    fs::read_to_string(&p).map_err(|e| EngineError::Proc { pid, path: p, source: e })
}

/// `/proc/PID` opened once (`O_PATH`), the files under it opened
/// relative to it (`openat`, `readlinkat`, `fstatat`): each read of a
/// stopped process's file skips the walk of `/proc` and of its pid's
/// directory, and reads without `std::fs`'s `statx` for a size hint
/// (procfs files say 0). A process's capture reads ~25 files of it while
/// it is stopped, and three per fd (issue 13, "Many processes").
///
/// A pid reused meanwhile cannot mislead it: the directory stays the
/// process's it was opened for, and a file under a dead one's cannot be
/// opened.
pub struct ProcDir {
    pid: i32,
    fd: std::os::fd::OwnedFd,
}

/// How a file of [`ProcDir`] is read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Whole {
    /// A `single_open` file of procfs (`status`, `stat`, `fdinfo/N`,
    /// `comm`, `limits`): the kernel makes it whole at the first read, so
    /// a read that does not fill the buffer has all of it.
    InOneRead,
    /// Read until a read returns nothing (`maps`, `children`,
    /// `cmdline`, `environ`, `timers`: made a record or a page at a time).
    UntilEnd,
}

impl ProcDir {
    /// Opens `/proc/PID`.
    pub fn open(pid: i32) -> Result<ProcDir> {
        use std::os::fd::FromRawFd;
        let path = proc_path(pid, "");
        let c = std::ffi::CString::new(format!("/proc/{pid}")).expect("no NUL in a number");
        // SAFETY: a NUL-terminated path; the result is a new fd or -1.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(EngineError::Proc { pid, path, source: std::io::Error::last_os_error() });
        }
        // SAFETY: a new fd nobody else owns.
        Ok(ProcDir { pid, fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) } })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    fn err(&self, what: &str, source: std::io::Error) -> EngineError {
        EngineError::Proc { pid: self.pid, path: proc_path(self.pid, what), source }
    }

    fn cname(&self, what: &str) -> Result<std::ffi::CString> {
        std::ffi::CString::new(what).map_err(|_| self.err(what, std::io::Error::from(std::io::ErrorKind::InvalidInput)))
    }

    /// `what` (relative to `/proc/PID`) opened for reading.
    pub fn open_file(&self, what: &str) -> Result<fs::File> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let c = self.cname(what)?;
        // SAFETY: a NUL-terminated relative path under our directory fd;
        // the result is a new fd or -1.
        let fd = unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(self.err(what, std::io::Error::last_os_error()));
        }
        // SAFETY: a new fd nobody else owns.
        Ok(unsafe { fs::File::from_raw_fd(fd) })
    }

    /// The bytes of `what`.
    pub fn bytes(&self, what: &str, whole: Whole) -> Result<Vec<u8>> {
        use std::io::Read;
        let mut f = self.open_file(what)?;
        let mut buf = vec![0u8; 4096];
        let mut len = 0;
        loop {
            if len == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
            let n = match f.read(&mut buf[len..]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.err(what, e)),
            };
            len += n;
            if n == 0 || (whole == Whole::InOneRead && len < buf.len()) {
                break;
            }
        }
        buf.truncate(len);
        Ok(buf)
    }

    /// The text of `what` (UTF-8, or an error naming it).
    pub fn text(&self, what: &str, whole: Whole) -> Result<String> {
        String::from_utf8(self.bytes(what, whole)?).map_err(|_| self.err(what, std::io::Error::from(std::io::ErrorKind::InvalidData)))
    }

    /// The target of the link `what` (`cwd`, `exe`, `fd/N`, ...).
    pub fn link(&self, what: &str) -> Result<String> {
        use std::os::fd::AsRawFd;
        let c = self.cname(what)?;
        let mut buf = vec![0u8; 512];
        loop {
            // SAFETY: readlinkat writes at most `buf.len()` bytes into `buf`.
            let n = unsafe { libc::readlinkat(self.fd.as_raw_fd(), c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                return Err(self.err(what, std::io::Error::last_os_error()));
            }
            if (n as usize) < buf.len() {
                buf.truncate(n as usize);
                return Ok(String::from_utf8_lossy(&buf).into_owned());
            }
            // Perhaps cut: read again with room to spare.
            buf.resize(buf.len() * 4, 0);
        }
    }

    /// `(st_dev, st_ino)` of what `what` names (links followed: `ns/mnt`,
    /// `root`).
    pub fn dev_ino(&self, what: &str) -> Result<(u64, u64)> {
        use std::os::fd::AsRawFd;
        let c = self.cname(what)?;
        // SAFETY: `struct stat` is plain integers: all zeroes is a value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstatat writes one `struct stat` into `st`; a
        // NUL-terminated path under our directory fd.
        if unsafe { libc::fstatat(self.fd.as_raw_fd(), c.as_ptr(), &mut st, 0) } != 0 {
            return Err(self.err(what, std::io::Error::last_os_error()));
        }
        Ok((st.st_dev, st.st_ino))
    }
}

/// Parses `/proc/PID/maps` text.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut rest = line;
        let mut fields = [""; 5];
        let mut ok = true;
        for f in fields.iter_mut() {
            rest = rest.trim_start();
            match rest.find(' ') {
                Some(i) => {
                    *f = &rest[..i];
                    rest = &rest[i..];
                }
                None => {
                    *f = rest;
                    rest = "";
                }
            }
            if f.is_empty() {
                ok = false;
            }
        }
        if !ok {
            continue;
        }
        let Some((s, e)) = fields[0].split_once('-') else { continue };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) else { continue };
        let perms = fields[1].as_bytes();
        if perms.len() < 4 {
            continue;
        }
        out.push(Mapping {
            start,
            end,
            read: perms[0] == b'r',
            write: perms[1] == b'w',
            exec: perms[2] == b'x',
            shared: perms[3] == b's',
            offset: u64::from_str_radix(fields[2], 16).unwrap_or(0),
            inode: fields[4].parse().unwrap_or(0),
            name: rest.trim_start().to_string(),
        });
    }
    out
}

pub fn maps(pid: i32) -> Result<Vec<Mapping>> {
    Ok(parse_maps(&read_proc(pid, "maps")?))
}

/// [`maps`] through an open [`ProcDir`].
pub fn maps_in(dir: &ProcDir) -> Result<Vec<Mapping>> {
    Ok(parse_maps(&dir.text("maps", Whole::UntilEnd)?))
}

/// mm fields from `/proc/PID/stat` (all but `brk`, which only the process
/// itself can read exactly).
pub fn mm_fields(pid: i32) -> Result<MmFields> {
    Ok(mm_fields_of(&read_proc(pid, "stat")?))
}

/// [`mm_fields`] of a `stat` text.
pub fn mm_fields_of(stat: &str) -> MmFields {
    // Fields after the command name, which may hold spaces and ')'.
    let after = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
    let f: Vec<u64> = after.split_whitespace().map(|x| x.parse::<i64>().unwrap_or(0) as u64).collect();
    // `after` starts at field 3 (state): field N is f[N - 3].
    let get = |n: usize| f.get(n - 3).copied().unwrap_or(0);
    MmFields {
        start_code: get(26),
        end_code: get(27),
        start_stack: get(28),
        start_data: get(45),
        end_data: get(46),
        start_brk: get(47),
        arg_start: get(48),
        arg_end: get(49),
        env_start: get(50),
        env_end: get(51),
        brk: 0,
    }
}

/// The `Umask:` of a status file's text (022 if it has none).
pub fn parse_umask(status: &str) -> u32 {
    status.lines().find_map(|l| l.strip_prefix("Umask:")).and_then(|v| u32::from_str_radix(v.trim(), 8).ok()).unwrap_or(0o022)
}

/// The process's auxv (`/proc/PID/auxv`).
pub fn auxv(dir: &ProcDir) -> Result<Vec<u64>> {
    Ok(parse_auxv(&dir.bytes("auxv", Whole::UntilEnd)?))
}

/// The (type, value) words of an auxv up to and including `AT_NULL`.
fn parse_auxv(bytes: &[u8]) -> Vec<u64> {
    let words: Vec<u64> = bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    // Keep up to and including AT_NULL.
    let mut out = Vec::new();
    for pair in words.chunks_exact(2) {
        out.extend_from_slice(pair);
        if pair[0] == 0 {
            break;
        }
    }
    out
}

pub fn comm(pid: i32) -> Result<String> {
    Ok(read_proc(pid, "comm")?.trim_end_matches('\n').to_string())
}

/// [`comm`] through an open [`ProcDir`].
pub fn comm_in(dir: &ProcDir) -> Result<String> {
    Ok(dir.text("comm", Whole::InOneRead)?.trim_end_matches('\n').to_string())
}

/// The process's arguments (`/proc/PID/cmdline`).
pub fn cmdline(dir: &ProcDir) -> Result<Vec<String>> {
    Ok(parse_cmdline(&dir.bytes("cmdline", Whole::UntilEnd)?))
}

fn parse_cmdline(bytes: &[u8]) -> Vec<String> {
    bytes.split(|&b| b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

/// The SysV shared memory segments of the IPC namespace
/// (`/proc/sysvipc/shm`), by id.
pub fn sysv_shm() -> std::io::Result<std::collections::HashMap<i32, crate::image::SysvShm>> {
    Ok(parse_sysv_shm(&fs::read_to_string("/proc/sysvipc/shm")?))
}

/// Parses `/proc/sysvipc/shm`: key shmid perms(octal) size cpid lpid
/// nattch uid gid ...
pub fn parse_sysv_shm(text: &str) -> std::collections::HashMap<i32, crate::image::SysvShm> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 9 {
                return None;
            }
            Some(crate::image::SysvShm {
                key: f[0].parse().ok()?,
                shmid: f[1].parse().ok()?,
                mode: u32::from_str_radix(f[2], 8).ok()?,
                size: f[3].parse().ok()?,
                uid: f[7].parse().ok()?,
                gid: f[8].parse().ok()?,
            })
        })
        .map(|s| (s.shmid, s))
        .collect()
}

/// The `VmFlags` of each mapping of `pid` that starts at one of `starts`
/// (`/proc/PID/smaps`): `mw` may be made writable, `dc` is not copied by
/// fork, ...
pub fn vm_flags(pid: i32, starts: &[u64]) -> Result<std::collections::HashMap<u64, Vec<String>>> {
    let smaps = read_proc(pid, "smaps")?;
    let mut out = std::collections::HashMap::new();
    let mut current = None;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(start) = current.take() {
                out.insert(start, flags.split_whitespace().map(str::to_string).collect());
            }
        } else if let Some((range, _)) = line.split_once(' ')
            && let Some((s, e)) = range.split_once('-')
            && let (Ok(start), Ok(_)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16))
        {
            current = starts.contains(&start).then_some(start);
        }
    }
    Ok(out)
}

/// A thread's scheduling attributes (any thread the caller may query).
pub fn thread_sched(pid: i32, tid: i32) -> Result<crate::image::ThreadSched> {
    let err = |what: &str| EngineError::Proc { pid, path: format!("{what} of thread {tid}").into(), source: std::io::Error::last_os_error() };
    let mut attr = [0u8; SCHED_ATTR_SIZE];
    // SAFETY: sched_getattr writes at most `size` bytes into `attr`.
    if unsafe { libc::syscall(libc::SYS_sched_getattr, tid, attr.as_mut_ptr(), SCHED_ATTR_SIZE as u32, 0u32) } != 0 {
        return Err(err("sched_getattr"));
    }
    let mut mask = [0u8; 128];
    // SAFETY: sched_getaffinity writes at most `len` bytes into `mask`.
    let n = unsafe { libc::syscall(libc::SYS_sched_getaffinity, tid, mask.len(), mask.as_mut_ptr()) };
    if n < 0 {
        return Err(err("sched_getaffinity"));
    }
    // SAFETY: ioprio_get takes no pointer. IOPRIO_WHO_PROCESS = 1.
    let ioprio = unsafe { libc::syscall(libc::SYS_ioprio_get, 1, tid) };
    if ioprio < 0 {
        return Err(err("ioprio_get"));
    }
    Ok(crate::image::ThreadSched { tid, attr: attr.to_vec(), affinity: mask[..n as usize].to_vec(), ioprio: ioprio as i32 })
}

/// `struct sched_attr` up to the utilization clamps (`SCHED_ATTR_SIZE_VER1`).
pub const SCHED_ATTR_SIZE: usize = 56;

/// The POSIX timers (`timer_create`) the process holds, from
/// `/proc/PID/timers`; their times are the agent's to read
/// ([`crate::image::PosixTimer`]'s times are zero here).
pub fn posix_timers(dir: &ProcDir) -> Result<Vec<crate::image::PosixTimer>> {
    let pid = dir.pid();
    parse_timers(&dir.text("timers", Whole::UntilEnd)?).map_err(|what| EngineError::Unsupported { pid, what: format!("its /proc/{pid}/timers reads oddly ({what})") })
}

fn parse_timers(text: &str) -> std::result::Result<Vec<crate::image::PosixTimer>, String> {
    let mut out: Vec<crate::image::PosixTimer> = Vec::new();
    for line in text.lines() {
        let (key, val) = line.split_once(':').ok_or_else(|| format!("line {line:?}"))?;
        let val = val.trim();
        let bad = || format!("{key}: {val:?}");
        if key == "ID" {
            let id = val.parse().map_err(|_| bad())?;
            out.push(crate::image::PosixTimer { id, clock: 0, notify: 0, signo: 0, value: 0, tid: 0, interval_sec: 0, interval_nsec: 0, left_sec: 0, left_nsec: 0, overrun: 0 });
            continue;
        }
        let t = out.last_mut().ok_or_else(|| format!("{key} before any ID"))?;
        match key {
            // "signal: 14/00000000deadbeef": the signal and sigev_value.
            "signal" => {
                let (signo, value) = val.split_once('/').ok_or_else(bad)?;
                t.signo = signo.parse().map_err(|_| bad())?;
                t.value = u64::from_str_radix(value.trim_start_matches("0x"), 16).map_err(|_| bad())?;
            }
            // "notify: signal/pid.42", "signal/tid.43" (SIGEV_THREAD_ID), "none/pid.42".
            "notify" => {
                let (how, whom) = val.split_once('/').ok_or_else(bad)?;
                let (kind, id) = whom.split_once('.').ok_or_else(bad)?;
                t.notify = match (how, kind) {
                    ("signal", "pid") => libc::SIGEV_SIGNAL,
                    ("signal", "tid") => libc::SIGEV_THREAD_ID,
                    ("none", _) => libc::SIGEV_NONE,
                    _ => return Err(bad()),
                };
                if kind == "tid" {
                    t.tid = id.parse().map_err(|_| bad())?;
                }
            }
            "ClockID" => t.clock = val.parse().map_err(|_| bad())?,
            _ => {}
        }
    }
    Ok(out)
}

/// RLIMIT_CPU ..= RLIMIT_RTTIME on Linux.
const RLIMIT_COUNT: u32 = 16;

pub fn rlimits(pid: i32) -> Result<Vec<Rlimit>> {
    let mut out = Vec::new();
    for resource in 0..RLIMIT_COUNT {
        let mut old = libc::rlimit64 { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: prlimit64 query (new limit null) writing one rlimit64.
        let r = unsafe { libc::prlimit64(pid, resource as _, std::ptr::null(), &mut old) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            // Another uid's process needs CAP_SYS_RESOURCE for prlimit,
            // even to read: its /proc limits file says the same.
            if e.raw_os_error() == Some(libc::EPERM) {
                return rlimits_from_proc(pid);
            }
            return Err(EngineError::Proc { pid, path: proc_path(pid, "limits"), source: e });
        }
        out.push(Rlimit { resource, soft: old.rlim_cur, hard: old.rlim_max });
    }
    Ok(out)
}

/// The limits of `pid` from `/proc/PID/limits` (one line per resource, in
/// resource order: a name in 25 columns, then soft and hard limit).
fn rlimits_from_proc(pid: i32) -> Result<Vec<Rlimit>> {
    let path = proc_path(pid, "limits");
    let text = std::fs::read_to_string(&path).map_err(|e| EngineError::Proc { pid, path: path.clone(), source: e })?;
    parse_limits(&text).ok_or_else(|| EngineError::Proc { pid, path, source: std::io::Error::other("unexpected format") })
}

pub fn parse_limits(text: &str) -> Option<Vec<Rlimit>> {
    let value = |v: &str| if v == "unlimited" { Some(u64::MAX) } else { v.parse().ok() };
    let out: Vec<Rlimit> = text
        .lines()
        .skip(1)
        .take(RLIMIT_COUNT as usize)
        .enumerate()
        .map(|(i, l)| {
            let mut f = l.get(25..)?.split_whitespace();
            Some(Rlimit { resource: i as _, soft: value(f.next()?)?, hard: value(f.next()?)? })
        })
        .collect::<Option<_>>()?;
    (out.len() == RLIMIT_COUNT as usize).then_some(out)
}

/// The TIDs of a process.
pub fn tids(pid: i32) -> Result<Vec<i32>> {
    let p = proc_path(pid, "task");
    let rd = fs::read_dir(&p).map_err(|e| EngineError::Proc { pid, path: p, source: e })?;
    let mut v: Vec<i32> = rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    v.sort_unstable();
    Ok(v)
}

/// A `stat` line from the field after the command name on (the name may
/// hold spaces and parentheses: it ends at the last `)`).
fn after_comm(stat: &str) -> &str {
    stat.rfind(')').map(|i| stat[i + 1..].trim_start()).unwrap_or("")
}

/// The state letter of thread `tid` of `pid` (`T` stopped, `t` traced,
/// ...), `None` if the thread is gone.
pub fn thread_state(pid: i32, tid: i32) -> Option<char> {
    let stat = read_proc(pid, &format!("task/{tid}/stat")).ok()?;
    after_comm(&stat).chars().next()
}

/// Where a process sits in the process tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeIds {
    pub state: char,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// For a zombie: the status `wait` will report.
    pub exit_status: i32,
    /// The controlling terminal's device number (0: none).
    pub tty_nr: i32,
    /// The foreground process group of the controlling terminal (-1: none).
    pub tpgid: i32,
}

impl TreeIds {
    /// The pts number of the controlling terminal, when it is a
    /// pseudo-terminal slave (majors 136-143).
    pub fn ctty_pts(&self) -> Option<u32> {
        let (major, minor) = (((self.tty_nr >> 8) & 0xfff) as u32, ((self.tty_nr & 0xff) | ((self.tty_nr >> 12) & 0xfff00)) as u32);
        (136..144).contains(&major).then(|| (major - 136) * 256 + minor)
    }
}

pub fn tree_ids(pid: i32) -> Result<TreeIds> {
    Ok(tree_ids_of(&read_proc(pid, "stat")?))
}

/// [`tree_ids`] of a `stat` text.
pub fn tree_ids_of(stat: &str) -> TreeIds {
    let f: Vec<&str> = after_comm(stat).split_whitespace().collect();
    let num = |n: usize| f.get(n - 3).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0) as i32;
    TreeIds { state: f.first().and_then(|s| s.chars().next()).unwrap_or('?'), ppid: num(4), pgid: num(5), sid: num(6), exit_status: num(52), tty_nr: num(7), tpgid: num(8) }
}

/// The children of every thread of `pid`.
pub fn children(pid: i32) -> Vec<i32> {
    ProcDir::open(pid).map(|d| children_in(&d)).unwrap_or_default()
}

/// [`children`] through an open [`ProcDir`].
pub fn children_in(dir: &ProcDir) -> Vec<i32> {
    let mut out = Vec::new();
    for tid in tids(dir.pid()).unwrap_or_default() {
        if let Ok(t) = dir.text(&format!("task/{tid}/children"), Whole::UntilEnd) {
            out.extend(t.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_command_name_with_parentheses_is_not_the_state() {
        assert_eq!(super::after_comm("42 (a) T (b)) S 1 42 42").chars().next(), Some('S'));
        assert_eq!(super::after_comm("42 (x) t 1").chars().next(), Some('t'));
        assert_eq!(super::after_comm("garbage"), "");
    }

    #[test]
    fn timers_parse() {
        let t = super::parse_timers("ID: 7\nsignal: 10/00000000deadbeef\nnotify: signal/tid.43\nClockID: 1\nID: 12345\nsignal: 14/0000000000000000\nnotify: none/pid.42\nClockID: 0\n").unwrap();
        assert_eq!((t[0].id, t[0].signo, t[0].value, t[0].notify, t[0].tid, t[0].clock), (7, 10, 0xdeadbeef, libc::SIGEV_THREAD_ID, 43, 1));
        assert_eq!((t[1].id, t[1].notify, t[1].tid), (12345, libc::SIGEV_NONE, 0));
        assert!(super::parse_timers("signal: 1/0\n").is_err());
    }
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let text = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fd:01 1234                       /usr/bin/cat with space
7ffd1e9f0000-7ffd1ea11000 rw-p 00000000 00:00 0                          [stack]
7f0000000000-7f0000001000 rw-s 00000000 00:01 77                         /dev/zero (deleted)
7ffd1eb8e000-7ffd1eb90000 r-xp 00000000 00:00 0                          [vdso]
7f1100000000-7f1100002000 ---p 00000000 00:00 0 
";
        let m = parse_maps(text);
        assert_eq!(m.len(), 5);
        assert_eq!(m[0].name, "/usr/bin/cat with space");
        assert_eq!(m[0].inode, 1234);
        assert!(m[0].read && !m[0].write && !m[0].shared);
        assert_eq!(m[1].name, "[stack]");
        assert!(m[2].shared);
        assert_eq!(m[3].prot(), (libc::PROT_READ | libc::PROT_EXEC) as u32);
        assert_eq!(m[4].name, "");
        assert_eq!(m[4].prot(), 0);
    }

    #[test]
    fn parses_sysvipc_shm() {
        let text = "\
       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap
 305441741          3   640                 12388  1672  1672      6  1000   100     0     0 1795560265          0 1795560265                 12288                     0
         0          4  1600                  8192  1672  1672      2     0     0     0     0 1795560265          0 1795560265                     0                     0
";
        let m = parse_sysv_shm(text);
        assert_eq!(m.len(), 2);
        let k = m[&3];
        assert_eq!((k.key, k.mode, k.size, k.uid, k.gid), (0x1234abcd, 0o640, 12388, 1000, 100));
        assert!(!k.removed());
        assert!(m[&4].removed() && m[&4].key == 0);
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id() as i32;
        let maps = maps(me).unwrap();
        assert!(maps.iter().any(|m| m.name == "[stack]"));
        let mm = mm_fields(me).unwrap();
        assert!(mm.start_code < mm.end_code && mm.arg_start < mm.arg_end);
        assert!(!auxv(&ProcDir::open(me).unwrap()).unwrap().is_empty());
        assert_eq!(rlimits(me).unwrap().len(), RLIMIT_COUNT as usize);
        assert_eq!(rlimits_from_proc(me).unwrap(), rlimits(me).unwrap());
        assert!(tids(me).unwrap().contains(&me));
    }
}

#[cfg(test)]
mod limits_tests {
    #[test]
    fn own_limits_parse_as_prlimit_reads_them() {
        let me = std::process::id() as i32;
        let text = std::fs::read_to_string(format!("/proc/{me}/limits")).unwrap();
        let parsed = super::parse_limits(&text).expect("parses");
        let direct = super::rlimits(me).unwrap();
        assert_eq!(parsed.iter().map(|r| (r.resource, r.soft, r.hard)).collect::<Vec<_>>(), direct.iter().map(|r| (r.resource, r.soft, r.hard)).collect::<Vec<_>>());
    }
}

#[cfg(test)]
mod dir_tests {
    use super::*;

    /// Every read through a [`ProcDir`] gives what the path-based reader
    /// gives (files that do not change while the test runs).
    #[test]
    fn reads_through_the_directory_match_the_paths() {
        let me = std::process::id() as i32;
        let dir = ProcDir::open(me).unwrap();
        let path = |what: &str| format!("/proc/{me}/{what}");
        assert_eq!(cmdline(&dir).unwrap(), parse_cmdline(&fs::read(path("cmdline")).unwrap()));
        assert_eq!(auxv(&dir).unwrap(), parse_auxv(&fs::read(path("auxv")).unwrap()));
        assert_eq!(comm_in(&dir).unwrap(), comm(me).unwrap());
        assert_eq!(dir.link("exe").unwrap(), fs::read_link(path("exe")).unwrap().to_string_lossy());
        assert_eq!(dir.text("limits", Whole::InOneRead).unwrap(), fs::read_to_string(format!("/proc/{me}/limits")).unwrap());
        use std::os::unix::fs::MetadataExt;
        let ns = fs::metadata(format!("/proc/{me}/ns/mnt")).unwrap();
        assert_eq!(dir.dev_ino("ns/mnt").unwrap(), (ns.dev(), ns.ino()));
        // Larger than the first buffer, and made a record at a time.
        let before = maps(me).unwrap();
        let keep: Vec<Vec<u8>> = (0..200).map(|_| vec![1u8; 3 << 20]).collect();
        let many = maps_in(&dir).unwrap();
        assert!(many.len() > before.len());
        drop(keep);
        // A missing file is an error naming it.
        let e = dir.text("no-such-file", Whole::InOneRead).unwrap_err().to_string();
        assert!(e.contains(&format!("/proc/{me}/no-such-file")), "{e}");
    }

    /// A link longer than the first buffer comes whole.
    #[test]
    fn a_long_link_is_read_whole() {
        let me = std::process::id() as i32;
        let base = std::env::temp_dir().join(format!("ckpt-procdir-{me}"));
        let deep = base.join("d".repeat(200)).join("e".repeat(200)).join("f".repeat(200));
        fs::create_dir_all(&deep).unwrap();
        let f = fs::File::open(&deep).unwrap();
        let dir = ProcDir::open(me).unwrap();
        use std::os::fd::AsRawFd;
        assert_eq!(dir.link(&format!("fd/{}", f.as_raw_fd())).unwrap(), deep.to_string_lossy());
        drop(f);
        fs::remove_dir_all(&base).unwrap();
    }
}
