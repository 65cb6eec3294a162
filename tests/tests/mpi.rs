//! MPI jobs (issue 15): `ckpt launch -- mpirun -np 4 mpi_ring` with
//! Debian's Open MPI 4.1 (`mpirun.openmpi`: the launcher and its four
//! ranks, talking through vader's shared-memory segments in /dev/shm and
//! CMA for large messages, plus the PMIx/OOB sockets to mpirun) and MPICH
//! 4.0 (`mpiexec.hydra`: the launcher, its `hydra_pmi_proxy` and four
//! ranks, ch4's and UCX's shared memory: POSIX in /dev/shm and SysV, PMI
//! over sockets).
//! tests/programs/mpi/mpi_ring.c checks every message, an `MPI_Allreduce`
//! and its running sum against their closed forms, and its own memory,
//! every tick on every rank; any mismatch is a FAIL.
//!
//! Each job runs to the end without ckpt first (so a failure below is
//! ckpt's), then: checkpointed twice while it runs, killed, its
//! shared-memory files removed as on a fresh host (and Open MPI's session
//! directory: the dry run says its files would be made again), restarted
//! from the latest generation (the segments made again with their sizes,
//! the session directory's files with theirs), checkpointed
//! again, killed, restarted right away (the killed job's files still
//! there), and run to DONE, where rank 0's answer must be the closed form
//! for the tick it stopped at. The same as the ordinary user, and two Open
//! MPI jobs of that user at once.
//!
//! The MPI libraries are installed by scripts/test.sh; tests/build.rs
//! builds `mpi_ring-openmpi` and `mpi_ring-mpich` with `mpicc.openmpi` and
//! `mpicc.mpich` (never the `mpicc` alternative). On a machine without
//! one, its tests print why and return.
mod common;
#[path = "common/mpi.rs"]
mod mpi;
use common::*;
use mpi::{Lib, check_answer};

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const RANKS: usize = 4;

impl Lib {
    /// The launcher and its options for `-np RANKS`.
    fn launcher(self) -> Vec<String> {
        let v: &[&str] = match self {
            // Four ranks on two cores: oversubscribed; no binding to cores.
            Lib::OpenMpi => &["mpirun.openmpi", "--oversubscribe", "--bind-to", "none", "-np"],
            Lib::Mpich => &["mpiexec.hydra", "-np"],
        };
        let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        v.push(RANKS.to_string());
        v
    }

    /// Environment the launcher needs: Open MPI refuses to run as root
    /// unless told it may.
    fn env(self) -> Vec<(&'static str, &'static str)> {
        match self {
            Lib::OpenMpi => vec![("OMPI_ALLOW_RUN_AS_ROOT", "1"), ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")],
            Lib::Mpich => vec![],
        }
    }

    /// Processes of the job: the launcher (and hydra's proxy) and the ranks.
    fn nprocs(self) -> usize {
        match self {
            Lib::OpenMpi => 1 + RANKS,
            Lib::Mpich => 2 + RANKS,
        }
    }
}

/// mpi_ring's options: a tick every 150 ms, a 1 MiB ring message (the
/// CMA / large-message path), 8 MiB of checked heap per rank.
fn ring_args(stop: &std::path::Path) -> Vec<String> {
    ["-t", "150", "-b", "1024", "-m", "8", "-s", stop.to_str().unwrap()].iter().map(|s| s.to_string()).collect()
}

/// Files in /dev/shm the job's processes map (from their maps): those
/// still there (Open MPI's), and how many are unlinked already (MPICH
/// unlinks its segments once every rank has mapped them).
fn shm_files(pids: &[i32]) -> (Vec<PathBuf>, usize) {
    let mut v: Vec<String> = pids
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/maps")).ok())
        .flat_map(|m| m.lines().filter_map(|l| l.splitn(6, char::is_whitespace).nth(5).map(|f| f.trim().to_string())).collect::<Vec<_>>())
        .filter(|f| f.starts_with("/dev/shm/"))
        .collect();
    v.sort();
    v.dedup();
    let deleted = v.iter().filter(|f| f.ends_with(" (deleted)")).count();
    (v.into_iter().filter(|f| !f.ends_with(" (deleted)")).map(PathBuf::from).collect(), deleted)
}

#[test]
fn mpi_ring_runs_without_ckpt() {
    for lib in [Lib::OpenMpi, Lib::Mpich] {
        let Some(prog) = lib.program() else { continue };
        let dir = std::env::temp_dir().join(format!("ckpt-standalone-mpi-{}-{}", lib.name(), std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let l = lib.launcher();
        let mut c = Command::new(&l[0]);
        c.args(&l[1..]).arg(&prog).args(["-n", "12", "-t", "50"]).current_dir(&dir).envs(lib.env());
        let mut p = Proc::spawn(format!("{} {}", l.join(" "), prog.display()), c);
        p.wait_prefix("READY size=4", Duration::from_secs(60));
        assert_eq!(check_answer(&mut p, RANKS as u64), 12);
        p.wait_line(|l| l == "DONE", LINE_TIMEOUT);
        let st = p.wait_exit(LINE_TIMEOUT);
        assert!(st.success(), "{} exited with {st}\n{}", p.what, p.context());
        assert_eq!((p.first_tick, p.last_tick), (Some(1), Some(12)), "{}", p.context());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `ckpt launch -- LAUNCHER -np 4 mpi_ring ...`; the launcher is the
/// program (launch execs it), rank 0 prints the ticks through it. As an
/// ordinary user the job runs in namespaces of its own with `--net
/// private` (its TCP connections among ranks and launcher are repaired
/// there); the launcher is then the computation's first process.
fn launch_job(s: &Session, lib: Lib, prog: &std::path::Path) -> (Proc, Vec<i32>) {
    let l = lib.launcher();
    let mut c = s.cmd("launch");
    if s.in_namespaces() {
        c.args(["--net", "private"]);
    }
    c.arg("--").args(&l).arg(prog).args(ring_args(&s.stop_file())).envs(lib.env());
    let mut p = Proc::spawn(format!("launch {} {}", l.join(" "), prog.display()), c);
    s.track(p.child_pid());
    p.wait_prefix("READY size=4", LINE_TIMEOUT);
    p.wait_ticks(3, LINE_TIMEOUT);
    let pids = s.wait_computation(lib.nprocs());
    assert_eq!(pids.len(), lib.nprocs(), "expected the launcher and {RANKS} ranks in the computation, have {pids:?}\n{}", p.context());
    p.pid = if s.in_namespaces() { pids[0] } else { p.child_pid() };
    assert!(pids.contains(&p.pid), "the launcher {} is not in the computation {pids:?}", p.pid);
    if !s.in_namespaces() {
        for &pid in &pids {
            s.track(pid);
        }
    }
    (p, pids)
}

/// Open MPI's session directory of the job (`/tmp/ompi.HOST.UID/pid.N`,
/// N the pid of mpirun): where its PMIx data store files, which every
/// process maps shared, and hwloc's topology file are.
fn session_dir(s: &Session, launcher: i32) -> Option<PathBuf> {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", s.host_pid(launcher))).ok()?;
    let key = format!("/pid.{launcher}/");
    maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find_map(|f| f.find(&key).map(|i| PathBuf::from(&f[..i + key.len() - 1])))
}

fn checkpoint_kill_restart(s: Session, lib: Lib, prog: &std::path::Path) {
    let (mut p, pids) = launch_job(&s, lib, prog);
    let host_pids: Vec<i32> = pids.iter().map(|&pid| s.host_pid(pid)).collect();
    let (shm, unlinked) = shm_files(&host_pids);
    eprintln!("[{}] processes {pids:?}, shared memory {shm:?} and {unlinked} unlinked", s.name);
    assert!(!shm.is_empty() || unlinked > 0, "the job maps no shared memory in /dev/shm: not the transport this test is about");
    let sizes: Vec<u64> = shm.iter().map(|f| std::fs::metadata(f).unwrap_or_else(|e| panic!("{}: {e}", f.display())).len()).collect();
    let session = match lib {
        Lib::OpenMpi => Some(session_dir(&s, p.pid).unwrap_or_else(|| panic!("mpirun {} maps nothing in a session directory /tmp/ompi.*/pid.{}", p.pid, p.pid))),
        Lib::Mpich => None,
    };

    s.checkpoint_bounded(&mut p);
    p.wait_ticks(3, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    assert_eq!(s.generations()[&g2.id].u64_field("nprocs"), lib.nprocs() as u64, "generation {} does not hold the whole job", g2.id);
    s.kill_all(&pids, &mut p);
    // As on a fresh host: the job's shared-memory files are gone too.
    for f in &shm {
        let _ = std::fs::remove_file(f);
    }

    // Open MPI's session directory goes too (as mpirun removes it when
    // Slurm stops the job): its files, which every process maps shared or
    // keeps open, are kept with the image (engine/src/tmpfiles.rs). The dry
    // run says they would be made again, and the restart makes them.
    let aside = session.as_ref().map(|dir| {
        let aside = dir.with_file_name(format!("aside-{}", dir.file_name().unwrap().to_str().unwrap()));
        std::fs::rename(dir, &aside).unwrap();
        let out = s.dry_run(g2.id);
        let said = text(&out.stdout) + &text(&out.stderr);
        assert!(out.status.success(), "the dry run refused the generation without {}\n{said}", dir.display());
        assert!(said.contains(&format!("{} of process", dir.display())) && said.contains("would be made again"), "the dry run does not say {} would be made again\n{said}", dir.display());
        assert!(!dir.exists(), "the dry run made {}", dir.display());
        aside
    });
    let mut r = s.restart_expect(&g2, p.pid, true);
    for &pid in &pids {
        // In namespaces of its own, host_pid finds it there or panics.
        assert!(pid_alive(s.host_pid(pid)), "process {pid} of the job was not restored\n{}", r.context());
    }
    r.wait_ticks(5, LINE_TIMEOUT);
    if let (Some(dir), Some(aside)) = (&session, &aside) {
        // Made again: the files the job holds (mpirun's topology file and
        // debugger FIFO; the PMIx files all map, which the ranks check).
        for f in ["hwloc.sm", "0/debugger_attach_fifo"] {
            let (was, now) = (std::fs::symlink_metadata(aside.join(f)).unwrap(), dir.join(f));
            let m = std::fs::symlink_metadata(&now).unwrap_or_else(|e| panic!("{} was not made again: {e}\n{}", now.display(), r.context()));
            assert_eq!((m.len(), m.mode(), m.uid()), (was.len(), was.mode(), was.uid()), "{} is not made again as it was", now.display());
        }
        let _ = std::fs::remove_dir_all(aside);
    }
    // Made again from the image, each with the size it had (Open MPI's
    // are not whole pages).
    for (f, &len) in shm.iter().zip(&sizes) {
        let now = std::fs::metadata(f).unwrap_or_else(|e| panic!("{} was not made again: {e}\n{}", f.display(), r.context())).len();
        assert_eq!(now, len, "{} is {now} bytes after the restart, not {len}", f.display());
    }
    let g3 = s.checkpoint_bounded(&mut r);
    s.kill_all(&pids, &mut r);

    // Right after the kill: the files the killed job left are used again.
    let mut r = s.restart_expect(&g3, p.pid, true);
    r.wait_ticks(5, LINE_TIMEOUT);
    let stop = r.last_tick.unwrap() + 3;
    s.stop_at(stop);
    let t = check_answer(&mut r, RANKS as u64);
    assert_eq!(t, stop, "the job stopped at tick {t}, not at {stop}\n{}", r.context());
    s.finish_computation(&pids, &mut r);
}

#[test]
fn open_mpi_job_checkpoint_kill_restart() {
    let Some(prog) = Lib::OpenMpi.program() else { return };
    checkpoint_kill_restart(Session::new("mpi_openmpi"), Lib::OpenMpi, &prog);
}

#[test]
fn mpich_job_checkpoint_kill_restart() {
    let Some(prog) = Lib::Mpich.program() else { return };
    checkpoint_kill_restart(Session::new("mpi_mpich"), Lib::Mpich, &prog);
}

/// The same as the ordinary user `ckpt-user` (tests/tests/unprivileged.rs):
/// the job in user, PID, mount, IPC and network namespaces of ckpt's own.
#[test]
fn open_mpi_job_as_an_ordinary_user() {
    let Some(prog) = Lib::OpenMpi.program() else { return };
    checkpoint_kill_restart(Session::as_user(TEST_USER, "mpi_nr_openmpi"), Lib::OpenMpi, &prog);
}

#[test]
fn mpich_job_as_an_ordinary_user() {
    let Some(prog) = Lib::Mpich.program() else { return };
    checkpoint_kill_restart(Session::as_user(TEST_USER, "mpi_nr_mpich"), Lib::Mpich, &prog);
}

/// Two Open MPI jobs of one user at once, each in namespaces of its own.
/// Open MPI names its /dev/shm segments and its session directory by
/// mpirun's PID; when every namespace numbered its processes from 2, both
/// mpiruns had the same PID, the second job opened the first one's
/// segments and both crashed (SIGSEGV in vader). A launch's PIDs now start
/// after its init's PID on the machine (`ns::start_pids_near`).
#[test]
fn two_open_mpi_jobs_of_one_user_at_once() {
    let Some(prog) = Lib::OpenMpi.program() else { return };
    let a = Session::as_user(TEST_USER, "mpi_nr_two_a");
    let b = Session::as_user(TEST_USER, "mpi_nr_two_b");
    let (mut pa, pids_a) = launch_job(&a, Lib::OpenMpi, &prog);
    let (mut pb, pids_b) = launch_job(&b, Lib::OpenMpi, &prog);
    assert_ne!(pa.pid, pb.pid, "both mpiruns have PID {} in their namespaces", pa.pid);
    pa.wait_ticks(3, LINE_TIMEOUT);
    pb.wait_ticks(3, LINE_TIMEOUT);
    a.checkpoint_bounded(&mut pa);
    b.checkpoint_bounded(&mut pb);
    for (s, p, pids) in [(&a, &mut pa, &pids_a), (&b, &mut pb, &pids_b)] {
        // Its queued lines first: it ran on while the other was handled.
        p.drain();
        p.wait_ticks(1, LINE_TIMEOUT);
        let stop = p.last_tick.unwrap() + 3;
        s.stop_at(stop);
        assert_eq!(check_answer(p, RANKS as u64), stop, "{}", p.context());
        s.finish_computation(pids, p);
    }
}
