//! A shell pipeline of unmodified programs, `lines | python3 | awk`, under
//! `sh`: the C producer fills its pipe (a slow python3 filter reads it), the
//! filter transforms each line and awk checks every line's number and
//! content, so a line lost or repeated across a checkpoint/kill/restart
//! fails the run. The whole pipeline is checkpointed mid-stream, killed
//! with `ckpt kill`, restarted, and must end with awk's DONE.
mod common;
use common::*;

use std::time::Duration;

const LINES: u64 = 4000;

fn script() -> String {
    let filter = "import sys, time\n\
                  for line in sys.stdin:\n    n, w, pad = line.split()\n    time.sleep(0.001)\n    print(n, int(n) * int(n) % 1000003, w.upper(), flush=True)\n";
    let check = format!(
        "{{ if ($1 != NR || $2 != ($1 * $1) % 1000003 || $3 != (\"W\" $1)) {{ print \"FAIL line \" NR \": \" $0; fflush(); exit 1 }} \
         if (NR % 100 == 0) {{ print \"TICK \" NR / 100; fflush() }} }} \
         END {{ if (NR == {LINES}) print \"DONE\"; else print \"FAIL only \" NR \" lines\" }}"
    );
    format!(
        "echo PID $$; {} {LINES} | {} -c '{}' | awk '{}'",
        program("lines").display(),
        python3().display(),
        filter,
        check
    )
}

#[test]
fn shell_pipeline_survives_checkpoint_kill_restart() {
    let s = Session::new("pipeline");
    let mut p = s.launch(std::path::Path::new("/bin/sh"), &["-c", &script()]);
    p.wait_ticks(3, LINE_TIMEOUT);
    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    let gens = s.generations();
    // sh, lines, python3, awk
    assert_eq!(gens[&g2.id].u64_field("nprocs"), 4, "the generation does not hold the 4 processes of the pipeline");
    let out = s.run("kill", &[]);
    assert!(out.status.success(), "ckpt kill: {}", text(&out.stderr));
    p.wait_exit(CMD_TIMEOUT);

    let mut r = s.restart_expect(&g2, p.pid, true);
    r.wait_prefix("DONE", Duration::from_secs(120));
    let st = r.wait_exit(CMD_TIMEOUT);
    assert!(st.success(), "the restored pipeline ended with {st}\n{}", r.context());

    // The older generation too: it replays from its own cut.
    let mut o = s.restart_expect(&g1, p.pid, false);
    o.wait_prefix("DONE", Duration::from_secs(120));
    let st = o.wait_exit(CMD_TIMEOUT);
    assert!(st.success(), "the restored pipeline (generation {}) ended with {st}\n{}", g1.id, o.context());
}
