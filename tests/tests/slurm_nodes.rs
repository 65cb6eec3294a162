//! A Slurm job over two nodes under `ckpt run --each-node` (issue 15): a
//! real two-node cluster of Debian's slurm-wlm on this machine
//! (`common/slurm.rs`, `Slurm::start_nodes`): `slurmctld` and `munged`
//! here, one `slurmd` on each of two namespace hosts (`common/netns.rs`),
//! nodes `nodea` at 10.N.0.2 and `nodeb` at 10.N.0.3.
//!
//! The job script is the one a user writes: `--nodes=2`, and `exec ckpt
//! run --each-node --name "$SLURM_JOB_NAME" --interval 2 -- node_pair ...`.
//! `node_pair`'s two pieces, one on each node (srun's tasks), talk TCP
//! across the nodes and check each other's state every message; each
//! prints its answer and checks it against the closed form at the end
//! (FAIL and exit 1 if anything is off; LOST and exit 3 if the other
//! piece goes first, as it may when a requeue kills both).
//!
//! A second job of the same name while it runs is refused. Checkpointed
//! by `scancel --batch --signal=USR1` (what `#SBATCH
//! --signal=B:USR1@N` sends) and by `--interval`, requeued twice with
//! `scontrol requeue`: each start after a requeue restarts both nodes'
//! shares of the latest generation by itself, each piece resumes where
//! the generation was (not at message 1), and the job completes with both
//! answers right.
mod common;
#[path = "common/netns.rs"]
mod netns;
#[path = "common/s3.rs"]
mod s3;
#[path = "common/slurm.rs"]
mod slurm;

use common::*;
use netns::Net;
use slurm::Slurm;

use std::path::Path;
use std::time::{Duration, Instant};

const NODES: [&str; 2] = ["nodea", "nodeb"];

fn read(out: &Path) -> String {
    std::fs::read_to_string(out).unwrap_or_default()
}

/// Waits until the job's output holds a line for which `pred` is true,
/// after the first `skip` lines; returns that line's index.
fn wait_line(slurm: &Slurm, out: &Path, skip: usize, pred: impl Fn(&str) -> bool, what: &str) -> usize {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let t = read(out);
        if let Some((i, _)) = t.lines().enumerate().skip(skip).find(|(_, l)| pred(l)) {
            return i;
        }
        assert!(!t.contains("FAIL"), "the program failed its own check:\n{t}");
        assert!(Instant::now() < until, "no {what} in the job's output after 60 s:\n{t}{}", slurm.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `TICK k node R ...`: (R, k).
fn tick_of(line: &str) -> Option<(usize, u64)> {
    let mut w = line.strip_prefix("TICK ")?.split_whitespace();
    let k = w.next()?.parse().ok()?;
    (w.next()? == "node").then_some(())?;
    Some((w.next()?.parse().ok()?, k))
}

/// Waits for a tick of node `node` of at least `min` after line `skip`.
fn wait_tick(slurm: &Slurm, out: &Path, skip: usize, node: usize, min: u64) -> usize {
    wait_line(slurm, out, skip, |l| tick_of(l).is_some_and(|(r, k)| r == node && k >= min), &format!("TICK {min} of node {node}"))
}

fn last_tick(out: &Path, node: usize) -> u64 {
    read(out).lines().filter_map(tick_of).filter(|(r, _)| *r == node).map(|(_, k)| k).next_back().unwrap_or(0)
}

/// The whole output, checked: no FAIL; both pieces' answers right; each
/// node's ticks from 1 to `ticks`, each following the one before, except
/// the first after a restart (`restarting generation` of `ckpt run`),
/// which is past tick 1 and at most one past the last printed. Returns
/// the ticks each node resumed at.
fn check_output(out: &Path, ticks: u64) -> [Vec<u64>; 2] {
    let t = read(out);
    assert!(!t.contains("FAIL"), "the program failed its own check:\n{t}");
    for node in 0..2 {
        assert!(t.contains(&format!("\nANSWER node {node} sum ")), "no answer of node {node}:\n{t}");
    }
    assert_eq!(t.matches("\nDONE\n").count(), 2, "not two DONE:\n{t}");
    assert!(t.contains("the program ended (exit status 0)"), "ckpt run did not end with the program's status 0:\n{t}");
    // A piece may see the other one go first when a requeue kills both
    // (LOST): only ever right before a restart.
    let lines: Vec<&str> = t.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.starts_with("LOST ") {
            assert!(lines[i..].iter().any(|l| l.contains(": restarting generation ")), "a piece lost the other one, not at a requeue: {l}\n{t}");
        }
    }
    let mut last = [0u64; 2];
    let mut restarting = [false; 2];
    let mut resumed: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    for l in t.lines() {
        if l.contains(": restarting generation ") {
            restarting = [true; 2];
            continue;
        }
        let Some((r, k)) = tick_of(l) else { continue };
        if restarting[r] {
            assert!(k >= 2 && k <= last[r] + 1, "node {r} resumed at tick {k} after tick {}: not where a checkpoint was\n{t}", last[r]);
            resumed[r].push(k);
            restarting[r] = false;
        } else {
            assert_eq!(k, last[r] + 1, "node {r}: tick {k} after tick {}\n{t}", last[r]);
        }
        last[r] = k;
    }
    assert_eq!(last, [ticks; 2], "the pieces did not reach their last tick\n{t}");
    resumed
}

#[test]
fn a_two_node_job_checkpointed_requeued_and_restarted_on_both_nodes() {
    let s = Session::new("slurm-nodes");
    let n = 85;
    let net = Net::new(n, &["a", "b"]);
    let slurm = Slurm::start_nodes(&s.dir, &net.hosts, n, &NODES);
    let name = format!("pair-{}", std::process::id());
    let ticks = 150;
    let port = 47085;
    let script = s.path("pair.sbatch");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\n\
             #SBATCH --nodes=2 --requeue --open-mode=append --signal=B:USR1@60\n\
             exec {ckpt} run --each-node --name \"$SLURM_JOB_NAME\" --store {store} --interval 2 -- {prog} -n {ticks} -t 100 -p {port}\n",
            ckpt = s.ckpt.display(),
            store = s.store_dir.display(),
            prog = program("node_pair").display(),
        ),
    )
    .unwrap();
    let out = s.path("pair.out");
    let job = slurm.sbatch(&s.dir, &["-J", &name, "-o", &out.to_string_lossy()], &script);
    let i = wait_line(&slurm, &out, 0, |l| l.contains("every node's share has joined (nodea, nodeb)"), "join of both nodes");
    // The same job again while it runs: refused on node 0, nothing started.
    let out2 = s.path("pair-again.out");
    let again = slurm.sbatch(&s.dir, &["-J", &name, "-o", &out2.to_string_lossy()], &script);
    slurm.wait_state(again, "FAILED", Duration::from_secs(30));
    assert!(read(&out2).contains(&format!("a computation named {name} already runs on this node")), "{}", read(&out2));
    let i = wait_tick(&slurm, &out, i, 1, 5);
    slurm.signal_batch(job, "USR1");
    let mut skip = wait_line(&slurm, &out, i, |l| l.contains(&format!("ckpt: {name}: SIGUSR1: checkpointed generation ")), "SIGUSR1 checkpoint");
    for round in 1..=2 {
        // An --interval checkpoint of this start, then a few more ticks.
        let i = wait_line(&slurm, &out, skip, |l| l.contains(&format!("ckpt: {name}: --interval: checkpointed generation ")), "--interval checkpoint");
        let i = wait_tick(&slurm, &out, i, 1, last_tick(&out, 1) + 3);
        slurm.requeue(job);
        let i = wait_line(&slurm, &out, i, |l| l.contains(&format!("ckpt: {name}: restarting generation ")) && l.contains("on each of the job's 2 nodes"), "restart after the requeue");
        let i = wait_line(&slurm, &out, i, |l| l.contains("every node's share has joined (nodea, nodeb)"), "join of both restarted shares");
        skip = wait_tick(&slurm, &out, i, 1, 0);
        assert_eq!(slurm.job_field(job, "Restarts"), round.to_string());
    }
    slurm.wait_state(job, "COMPLETED", Duration::from_secs(60));
    assert_eq!(slurm.job_field(job, "ExitCode"), "0:0");
    assert_eq!(slurm.job_field(job, "Restarts"), "2");
    let resumed = check_output(&out, ticks);
    assert_eq!(resumed.each_ref().map(Vec::len), [2, 2], "each node's piece is not restarted twice\n{}", read(&out));
    drop(slurm);
    drop(net);
}
