//! Readers for `/proc/PID/...`: the memory map, open fds, mm fields, and the
//! other per-process facts a checkpoint records from outside the process.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use crate::error::{EngineError, Result};
use crate::image::{FdImage, FdKind, MmFields, Rlimit};

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

/// mm fields from `/proc/PID/stat` (all but `brk`, which only the process
/// itself can read exactly).
pub fn mm_fields(pid: i32) -> Result<MmFields> {
    let stat = read_proc(pid, "stat")?;
    // Fields after the command name, which may hold spaces and ')'.
    let after = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
    let f: Vec<u64> = after.split_whitespace().map(|x| x.parse::<i64>().unwrap_or(0) as u64).collect();
    // `after` starts at field 3 (state): field N is f[N - 3].
    let get = |n: usize| f.get(n - 3).copied().unwrap_or(0);
    Ok(MmFields {
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
    })
}

pub fn umask(pid: i32) -> Result<u32> {
    let status = read_proc(pid, "status")?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .unwrap_or(0o022))
}

pub fn auxv(pid: i32) -> Result<Vec<u64>> {
    let p = proc_path(pid, "auxv");
    let bytes = fs::read(&p).map_err(|e| EngineError::Proc { pid, path: p, source: e })?;
    let words: Vec<u64> = bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    // Keep up to and including AT_NULL.
    let mut out = Vec::new();
    for pair in words.chunks_exact(2) {
        out.extend_from_slice(pair);
        if pair[0] == 0 {
            break;
        }
    }
    Ok(out)
}

pub fn link(pid: i32, what: &str) -> Result<String> {
    let p = proc_path(pid, what);
    fs::read_link(&p).map(|t| t.to_string_lossy().into_owned()).map_err(|e| EngineError::Proc { pid, path: p, source: e })
}

pub fn comm(pid: i32) -> Result<String> {
    Ok(read_proc(pid, "comm")?.trim_end_matches('\n').to_string())
}

pub fn cmdline(pid: i32) -> Result<Vec<String>> {
    let p = proc_path(pid, "cmdline");
    let bytes = fs::read(&p).map_err(|e| EngineError::Proc { pid, path: p, source: e })?;
    Ok(bytes.split(|&b| b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect())
}

/// Number of POSIX timers (`timer_create`) the process holds.
pub fn posix_timer_count(pid: i32) -> usize {
    fs::read_to_string(proc_path(pid, "timers")).map(|t| t.lines().filter(|l| l.starts_with("ID:")).count()).unwrap_or(0)
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
            return Err(EngineError::Proc { pid, path: proc_path(pid, "limits"), source: std::io::Error::last_os_error() });
        }
        out.push(Rlimit { resource: resource as u32, soft: old.rlim_cur, hard: old.rlim_max });
    }
    Ok(out)
}

/// The TIDs of a process.
pub fn tids(pid: i32) -> Result<Vec<i32>> {
    let p = proc_path(pid, "task");
    let rd = fs::read_dir(&p).map_err(|e| EngineError::Proc { pid, path: p, source: e })?;
    let mut v: Vec<i32> = rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    v.sort_unstable();
    Ok(v)
}

/// Reads and classifies every open fd of `pid`. `agent_fd` is the agent's
/// own connection. An fd of a kind ckpt cannot checkpoint yet is an
/// [`EngineError::UnsupportedFd`] naming the process, the fd and its kind.
/// Environment variable in which `ckpt launch` lists the pipes and sockets
/// the program inherited from outside the computation (`FD=TARGET;...`).
pub const ENV_EXTERNAL_FDS: &str = "CKPT_EXTERNAL_FDS";

/// The external fds recorded at launch, from `/proc/PID/environ`.
pub fn external_fds(pid: i32) -> Vec<(i32, String)> {
    let env = fs::read(proc_path(pid, "environ")).unwrap_or_default();
    let prefix = format!("{ENV_EXTERNAL_FDS}=");
    env.split(|&b| b == 0)
        .filter_map(|e| std::str::from_utf8(e).ok()?.strip_prefix(prefix.as_str()).map(str::to_string))
        .flat_map(|v| {
            v.split(';')
                .filter_map(|item| {
                    let (fd, target) = item.split_once('=')?;
                    Some((fd.parse().ok()?, target.to_string()))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Describes this process's inherited pipes, sockets and other non-file fds
/// above 2, for [`ENV_EXTERNAL_FDS`].
pub fn describe_external_fds() -> String {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc/self/fd") {
        for e in rd.flatten() {
            let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            if fd <= 2 {
                continue;
            }
            if let Ok(t) = fs::read_link(e.path()) {
                let t = t.to_string_lossy().into_owned();
                if t.starts_with("pipe:") || t.starts_with("socket:") || t.starts_with("anon_inode:") {
                    out.push(format!("{fd}={t}"));
                }
            }
        }
    }
    out.join(";")
}

pub fn fds(pid: i32, agent_fds: &[i32]) -> Result<Vec<FdImage>> {
    let agent_fd = agent_fds.first().copied().unwrap_or(-1);
    let external = external_fds(pid);
    let dir = proc_path(pid, "fd");
    let rd = fs::read_dir(&dir).map_err(|e| EngineError::Proc { pid, path: dir.clone(), source: e })?;
    let mut nums: Vec<i32> = rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    nums.sort_unstable();
    let mut out = Vec::new();
    for fd in nums {
        let target = match fs::read_link(dir.join(fd.to_string())) {
            Ok(t) => t.to_string_lossy().into_owned(),
            Err(_) => continue, // closed meanwhile
        };
        let info = fs::read_to_string(proc_path(pid, &format!("fdinfo/{fd}"))).unwrap_or_default();
        let field = |name: &str| info.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string());
        let pos = field("pos:").and_then(|v| v.parse().ok()).unwrap_or(0);
        let raw_flags = field("flags:").and_then(|v| i64::from_str_radix(&v, 8).ok()).unwrap_or(0) as i32;
        let cloexec = raw_flags & libc::O_CLOEXEC != 0;
        let flags = raw_flags & !libc::O_CLOEXEC;
        let unsupported = |kind: &str| EngineError::UnsupportedFd { pid, fd, kind: kind.to_string(), target: target.clone() };
        if fd != agent_fd && agent_fds.contains(&fd) {
            continue; // the agent's own userfaultfd: made anew after a restart
        }
        let kind = if fd == agent_fd {
            FdKind::Agent
        } else if fd <= 2 || external.iter().any(|(n, t)| *n == fd && *t == target) {
            FdKind::Inherited { was: target.clone() }
        } else if target.starts_with('/') {
            if target.ends_with(" (deleted)") {
                return Err(unsupported("deleted file"));
            }
            let meta = fs::metadata(dir.join(fd.to_string())).map_err(|e| EngineError::Proc { pid, path: dir.join(fd.to_string()), source: e })?;
            let ft = meta.file_type();
            if ft.is_file() {
                FdKind::File { path: target.clone() }
            } else if ft.is_dir() {
                FdKind::Dir { path: target.clone() }
            } else if ft.is_char_device() {
                FdKind::Device { path: target.clone() }
            } else if ft.is_fifo() {
                return Err(unsupported("named pipe (FIFO)"));
            } else {
                return Err(unsupported("special file"));
            }
        } else if target.starts_with("pipe:") {
            return Err(unsupported("pipe"));
        } else if target.starts_with("socket:") {
            return Err(unsupported("socket"));
        } else if let Some(anon) = target.strip_prefix("anon_inode:") {
            return Err(unsupported(anon.trim_matches(|c| c == '[' || c == ']')));
        } else {
            return Err(unsupported("unknown"));
        };
        out.push(FdImage { fd, kind, flags, cloexec, pos });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
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
    fn reads_own_process() {
        let me = std::process::id() as i32;
        let maps = maps(me).unwrap();
        assert!(maps.iter().any(|m| m.name == "[stack]"));
        let mm = mm_fields(me).unwrap();
        assert!(mm.start_code < mm.end_code && mm.arg_start < mm.arg_end);
        assert!(!auxv(me).unwrap().is_empty());
        assert_eq!(rlimits(me).unwrap().len(), RLIMIT_COUNT as usize);
        assert!(tids(me).unwrap().contains(&me));
    }

    fn spawn_sleeper(script: &str) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", script]).stdin(std::process::Stdio::piped());
        // SAFETY: close_range is async-signal-safe; it drops the fds the
        // test runner leaks to children (e.g. a jobserver pipe).
        unsafe {
            cmd.pre_exec(|| {
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                Ok(())
            })
        };
        let child = cmd.spawn().unwrap();
        let pid = child.id() as i32;
        for _ in 0..500 {
            if comm(pid).map(|c| c == "sleep").unwrap_or(false) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child
    }

    #[test]
    fn classifies_fds() {
        let mut child = spawn_sleeper("exec 5</etc/passwd 6</ 7>/dev/null; exec sleep 30");
        let pid = child.id() as i32;
        let fds = fds(pid, &[-1]).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let kind = |n: i32| fds.iter().find(|f| f.fd == n).map(|f| f.kind.clone());
        assert!(matches!(kind(0), Some(FdKind::Inherited { .. })));
        assert_eq!(kind(5), Some(FdKind::File { path: "/etc/passwd".into() }));
        assert_eq!(kind(6), Some(FdKind::Dir { path: "/".into() }));
        assert_eq!(kind(7), Some(FdKind::Device { path: "/dev/null".into() }));
    }

    #[test]
    fn names_an_unsupported_fd() {
        let mut child = spawn_sleeper("exec 4<&0; exec sleep 30");
        let pid = child.id() as i32;
        let err = fds(pid, &[-1]).unwrap_err();
        child.kill().unwrap();
        child.wait().unwrap();
        let msg = err.to_string();
        assert!(msg.contains(&format!("process {pid}")) && msg.contains("fd 4") && msg.contains("pipe"), "{msg}");
    }
}
