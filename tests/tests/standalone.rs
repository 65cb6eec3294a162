//! The test programs themselves, run without ckpt: each must reach DONE
//! with exit status 0 and no FAIL (so a failure in the checkpoint/restart
//! tests is ckpt's, not the program's). Also checks that the PIE and
//! non-PIE builds really differ in kind.
mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

fn run_plain(prog: &std::path::Path, args: &[&str]) -> Proc {
    let dir = std::env::temp_dir().join(format!(
        "ckpt-standalone-{}-{}",
        prog.file_name().unwrap().to_str().unwrap(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = Command::new(prog);
    c.args(args).current_dir(&dir);
    let mut p = Proc::spawn(format!("{} {}", prog.display(), args.join(" ")), c);
    let line = p.wait_prefix("PID ", LINE_TIMEOUT);
    p.pid = line[4..].parse().unwrap();
    assert_eq!(p.pid, p.child_pid());
    p.wait_prefix("READY", Duration::from_secs(60));
    p.wait_line(|l| l == "DONE", Duration::from_secs(60));
    let st = p.wait_exit(LINE_TIMEOUT);
    assert!(st.success(), "{} exited with {st}\n{}", p.what, p.context());
    assert_eq!(p.first_tick, Some(1));
    let _ = std::fs::remove_dir_all(&dir);
    p
}

#[test]
fn c_programs_run_standalone() {
    for name in ["counter_heap", "threads", "resources", "rseq_vdso", "bad_fd"] {
        for variant in [name.to_string(), format!("{name}-nopie")] {
            let args: &[&str] = match name {
                "counter_heap" => &["-n", "10", "-t", "20", "-m", "32"],
                _ => &["-n", "10", "-t", "20"],
            };
            let p = run_plain(&program(&variant), args);
            assert_eq!(p.last_tick, Some(10), "{variant}");
        }
    }
    run_plain(&program("counter_heap"), &["-n", "5", "-t", "20", "-m", "32", "-i"]);
    run_plain(&program("resources"), &["-n", "25", "-t", "100", "-a"]);
    for kind in ["eventfd", "timerfd", "signalfd", "inotify"] {
        run_plain(&program("bad_fd"), &["-n", "3", "-t", "20", "-k", kind]);
    }
}

#[test]
fn python_program_runs_standalone() {
    let script = source("python_heap.py");
    let p = run_plain(&python3(), &[script.to_str().unwrap(), "-n", "9", "-t", "50", "-m", "110"]);
    assert!(p.lines.iter().any(|l| l.starts_with("READY records=")));
}

#[test]
fn stop_file_ends_a_program() {
    let dir = std::env::temp_dir().join(format!("ckpt-standalone-stop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let stop = dir.join("STOP");
    let mut c = Command::new(program("threads"));
    c.args(["-t", "20", "-s", stop.to_str().unwrap()]);
    let mut p = Proc::spawn("threads with a stop file".into(), c);
    p.wait_ticks(3, LINE_TIMEOUT);
    std::fs::write(&stop, format!("{}\n", p.last_tick.unwrap() + 4)).unwrap();
    p.wait_line(|l| l == "DONE", LINE_TIMEOUT);
    assert!(p.wait_exit(LINE_TIMEOUT).success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pie_and_nopie_builds_differ() {
    fn elf_type(p: &std::path::Path) -> u16 {
        let b = std::fs::read(p).unwrap();
        u16::from_le_bytes([b[16], b[17]])
    }
    for name in ["counter_heap", "threads", "resources", "rseq_vdso", "bad_fd"] {
        assert_eq!(elf_type(&program(name)), 3, "{name} is not PIE (ET_DYN)");
        assert_eq!(elf_type(&program(&format!("{name}-nopie"))), 2, "{name}-nopie is not ET_EXEC");
    }
}
