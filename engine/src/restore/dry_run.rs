//! Whether a generation would restore, found without starting any process:
//! the coordinator runs [`check_tree`] on a new generation before it
//! commits it (so a generation that cannot restore is never committed), and
//! `ckpt restart --dry-run` runs [`dry_run`], which adds what depends on the
//! moment of the restart (PIDs free, the caller's rights).
//!
//! Checked, for every process: its ids are unique in the generation, it has
//! a main thread and no memory where the restorer lives; its working
//! directory is there; as the process (its recorded file system identity,
//! as the restart opens them), the files, directories and devices its fds name can be opened, the files of
//! its shared file mappings can be opened with the mapping's access, and the
//! files under its private file mappings are the ones the checkpoint saw.
//! Across the processes: no shared memory whose content a restart makes
//! again (a SysV segment, a POSIX shared memory object, a memfd, a deleted
//! file) is mapped by processes of two hosts ([`shared_across_hosts`]).
//! A temporary file kept with the image ([`crate::tmpfiles`]) may be gone:
//! the dry run says it would be made again, and checks it could be.

use std::collections::HashMap;

use ckpt_wire::restore::{ZONE_END, ZONE_START};

use crate::error::{EngineError, Problem, Result};
use crate::image::*;

/// Every problem of `images` that a restart would meet whenever it ran
/// (empty: the generation restores, PIDs and rights aside).
pub fn problems(generation: u64, images: &[ProcessImage]) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut owner: HashMap<i32, i32> = HashMap::new();
    for image in images {
        let pid = image.pid;
        let mut problem = |what: String| out.push(Problem { pid, what });
        let ids = std::iter::once((pid, "PID"))
            .chain(image.threads.iter().filter(|t| t.tid != pid).map(|t| (t.tid, "TID")))
            .chain(image.zombies.iter().map(|z| (z.pid, "PID of an exited child")));
        for (id, what) in ids {
            if id <= 0 {
                problem(format!("its image names {what} {id}; the store may have been tampered with"));
            } else if let Some(other) = owner.insert(id, pid) {
                problem(format!("its {what} {id} is also an id of process {other} in the image; the store may have been tampered with"));
            }
        }
        if !image.threads.iter().any(|t| t.tid == pid) {
            problem("its image has no main thread".into());
        }
        if let Some(r) = image.regions.iter().find(|r| r.start < ZONE_END && r.end > ZONE_START) {
            problem(format!("it has memory at {:#x}-{:#x}, in [{ZONE_START:#x}, {ZONE_END:#x}) where the restorer lives", r.start, r.end));
        }
        let id = crate::creds::Identity::of(image);
        let open = |path: &str, flags: i32| crate::creds::acting_as(id.clone(), || crate::creds::open(path, flags, 0));
        if let Some(gone) = image.cwd.strip_suffix(" (deleted)") {
            problem(format!("its working directory {gone} had been removed when it was checkpointed"));
        } else if let Err(e) = crate::creds::open(&image.cwd, libc::O_PATH | libc::O_DIRECTORY, 0) {
            // (Entered by the restart's clone child, before any identity
            // is taken: checked as the caller.)
            problem(format!("its working directory {} cannot be entered ({e}); make it again", image.cwd));
        }
        for f in &image.fds {
            let (what, path) = match &f.kind {
                FdKind::File { path } => ("file", path),
                FdKind::Dir { path } => ("directory", path),
                FdKind::Device { path } => ("device", path),
                _ => continue,
            };
            if let Err(e) = open(path, libc::O_PATH) {
                if gone_but_kept(image, path, &e) {
                    continue;
                }
                problem(format!("the {what} {path} of its fd {} cannot be opened ({e}); put it back", f.fd));
            }
        }
        for r in &image.regions {
            match r.kind {
                RegionKind::SharedFile => {
                    let mode = if r.prot & libc::PROT_WRITE as u32 != 0 { libc::O_RDWR } else { libc::O_RDONLY };
                    if let Err(e) = open(&r.name, mode) {
                        if gone_but_kept(image, &r.name, &e) {
                            continue;
                        }
                        problem(format!("the file {} it maps shared at {:#x} cannot be opened ({e}); put it back", r.name, r.start));
                    }
                }
                RegionKind::Private if r.file.is_some() => {
                    if let Err(e) = super::fds::mapped_file(generation, image, r, &id) {
                        let what = match e {
                            EngineError::Restore { what, .. } => what,
                            e => e.to_string(),
                        };
                        problem(what);
                    }
                }
                _ => {}
            }
        }
    }
    out.extend(shared_across_hosts(images));
    out
}

/// The shared memory objects that processes of more than one host map, one
/// problem each. Hosts made of namespaces on one kernel can share such an
/// object (a SysV segment, a file in `/dev/shm`): a library that takes one
/// kernel for one machine does so (UCX's shared memory transports, which
/// MPICH uses, compare the kernel's boot id). A restart brings each host's
/// processes back by themselves, each host with objects of its own, so the
/// processes would no longer share the memory: such a generation is
/// refused. `images` must be of one kernel (an object is known by its SysV
/// id, or by its inode and path).
pub fn shared_across_hosts<'a>(images: impl IntoIterator<Item = &'a ProcessImage>) -> Vec<Problem> {
    use std::collections::{BTreeMap, BTreeSet};
    // object -> host -> pids
    let mut by: BTreeMap<(String, u64), BTreeMap<&str, BTreeSet<i32>>> = BTreeMap::new();
    for image in images {
        for r in image.regions.iter().filter(|r| r.kind == RegionKind::SharedAnon) {
            let key = match r.sysv {
                Some(a) => (format!("SysV shared memory segment {}", a.shmid), 0),
                None if r.shm != 0 => (format!("shared memory {}", r.name), r.shm),
                None => continue,
            };
            by.entry(key).or_default().entry(image.host.as_str()).or_default().insert(image.pid);
        }
    }
    let mut out = Vec::new();
    for ((what, _), hosts) in by.into_iter().filter(|(_, h)| h.len() > 1) {
        let pid = hosts.values().flatten().copied().min().unwrap_or(0);
        let on = hosts
            .iter()
            .map(|(h, pids)| format!("{h} ({})", pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")))
            .collect::<Vec<_>>()
            .join(" and ");
        out.push(Problem {
            pid,
            what: format!(
                "the {what} is mapped by processes on hosts {on}: memory shared across hosts cannot come back shared, since a restart brings \
                 back each host's processes by themselves, with memory of their own (hosts that are namespaces of one machine share its kernel, \
                 and so can share memory); keep the processes that share it on one host, or keep the program from sharing memory across hosts \
                 (MPICH over UCX does on such hosts unless UCX_TLS leaves out UCX's shared memory transports, e.g. UCX_TLS=tcp,self)"
            ),
        });
    }
    out
}

/// A file that is gone but kept with the image ([`crate::tmpfiles`]): the
/// restart makes it again ([`crate::tmpfiles::would_make`] checks it can).
fn gone_but_kept(image: &ProcessImage, path: &str, e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOENT) && crate::tmpfiles::is_kept(image, path)
}

/// Fails, naming every problem, if `images` (of generation `generation`)
/// would not restore (PIDs in use and rights aside).
pub fn check_tree(generation: u64, images: &[ProcessImage]) -> Result<()> {
    let problems = problems(generation, images);
    if problems.is_empty() { Ok(()) } else { Err(EngineError::Unrestorable { problems }) }
}

/// Everything [`problems`] finds, and what would stop a restart right now:
/// PIDs and TIDs in use (unless `in_namespaces`: a restart in namespaces
/// of its own, [`crate::ns`], finds them all free), processes the caller
/// may not restart.
pub fn dry_run(generation: u64, images: &[ProcessImage], in_namespaces: bool) -> Vec<Problem> {
    let mut out = Vec::new();
    if let Err(e) = crate::creds::check_may_restore(generation, images) {
        out.push(Problem { pid: images.first().map_or(0, |i| i.pid), what: e.to_string() });
    }
    for image in images.iter().filter(|_| !in_namespaces) {
        if let Err(e) = super::check_ids_free(generation, image) {
            out.push(Problem { pid: image.pid, what: e.to_string() });
        }
    }
    // Orphans of a session whose leader exited are made by a process that
    // takes the leader's PID: it must be free too.
    let pids: std::collections::HashSet<i32> = images.iter().map(|i| i.pid).collect();
    let mut sids: Vec<(i32, i32)> = images.iter().filter(|i| i.ppid == 1 && i.sid > 0 && i.sid != i.pid && !pids.contains(&i.sid)).map(|i| (i.sid, i.pid)).collect();
    sids.sort_unstable();
    sids.dedup_by_key(|s| s.0);
    for (sid, pid) in sids.into_iter().filter(|_| !in_namespaces) {
        if std::path::Path::new(&format!("/proc/{sid}")).exists() {
            let comm = crate::procfs::comm(sid).unwrap_or_default();
            out.push(Problem { pid, what: format!("the id {sid} of its session, whose leader had exited, is the PID of `{comm}` now (a restart makes the session with that PID)") });
        }
    }
    out.extend(problems(generation, images));
    out.extend(crate::tmpfiles::would_make(generation, images).1);
    out
}
