//! ckpt is installable (issue 15): `scripts/install.sh` puts the command,
//! its agent and its restorer into a PREFIX, as root and as the ordinary
//! account `ckpt-user` (its default prefix, `~/.local`); the installed
//! `PREFIX/bin/ckpt` (not the build tree's, and with no `CKPT_PRELOAD` /
//! `CKPT_RESTORER`) then runs the standard cycle of a test program whose
//! own check must pass, with the installed agent loaded in it. The man
//! pages render, the bash completion completes, `--uninstall` removes
//! what was installed and nothing else.
//!
//! The script is run with `--no-build` on what `cargo build --release`
//! made (the tree of the `ckpt` the other tests use): a build inside a
//! test would wait for the lock of the `cargo test` that runs it.
mod common;
use common::*;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The cargo target dir holding the `ckpt` the tests use (`T/release/ckpt`).
fn target_dir() -> PathBuf {
    let bin = ckpt_bin();
    let profile = bin.parent().unwrap();
    assert!(profile.ends_with("release"), "the install script installs a release build; {} is not one: `cargo build --release`", bin.display());
    profile.parent().unwrap().to_path_buf()
}


/// The files an install puts under PREFIX, and their modes.
const INSTALLED: &[(&str, u32)] = &[
    ("bin/ckpt", 0o755),
    ("lib/ckpt/libckpt_preload.so", 0o755),
    ("lib/ckpt/ckpt-restorer", 0o755),
    ("share/man/man1/ckpt.1", 0o644),
    ("share/bash-completion/completions/ckpt", 0o644),
    ("share/zsh/site-functions/_ckpt", 0o644),
    ("share/fish/vendor_completions.d/ckpt.fish", 0o644),
    ("include/ckpt.h", 0o644),
    ("lib/libckpt.so", 0o755),
    ("lib/ckpt/python/ckpt.py", 0o644),
];

/// The subcommands a user sees (hidden ones, `nsinit` and `generate`,
/// get no page).
const SUBCOMMANDS: &[&str] = &[
    "launch", "run", "checkpoint", "status", "log", "restart", "kill", "quit", "push", "pull", "gc", "verify", "store", "key", "show", "stats", "host", "doctor", "coordinator",
];

/// Every file is there with its mode, owned by `uid`, and neither it nor
/// its directory up to PREFIX is writable by group or others.
fn check_layout(prefix: &Path, uid: u32) {
    for (rel, mode) in INSTALLED {
        let p = prefix.join(rel);
        let m = std::fs::metadata(&p).unwrap_or_else(|e| panic!("the install lacks {}: {e}", p.display()));
        assert!(m.is_file(), "{} is not a file", p.display());
        assert_eq!(m.mode() & 0o7777, *mode, "{} has mode {:o}, not {mode:o}", p.display(), m.mode() & 0o7777);
        assert_eq!(m.uid(), uid, "{} is owned by uid {}, not {uid}", p.display(), m.uid());
        let mut d = p.parent().unwrap();
        while d.starts_with(prefix) && d != prefix {
            let dm = std::fs::metadata(d).unwrap().mode();
            assert_eq!(dm & 0o022, 0, "{} (mode {:o}) is writable by others", d.display(), dm & 0o7777);
            d = d.parent().unwrap();
        }
    }
    // Nothing beside the binary: the installed ckpt must find its agent and
    // restorer in PREFIX/lib/ckpt, not next to itself.
    let bin: Vec<String> = std::fs::read_dir(prefix.join("bin")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(bin, ["ckpt"], "PREFIX/bin holds more than ckpt");
    for sub in SUBCOMMANDS {
        let page = prefix.join(format!("share/man/man1/ckpt-{sub}.1"));
        assert!(page.is_file(), "no man page {}", page.display());
    }
    for hidden in ["nsinit", "generate"] {
        assert!(!prefix.join(format!("share/man/man1/ckpt-{hidden}.1")).exists(), "the hidden subcommand {hidden} got a man page");
    }
}

/// The man pages are roff that `man` renders: ckpt.1 names every
/// subcommand, ckpt-launch.1 its options.
fn check_man(prefix: &Path) {
    let man1 = prefix.join("share/man/man1");
    let main = std::fs::read_to_string(man1.join("ckpt.1")).unwrap();
    assert!(main.lines().any(|l| l.starts_with(".TH ckpt 1")), "ckpt.1 is not a man page (no .TH ckpt 1):\n{main}");
    let render = |page: &str| -> String {
        // From stdin (`man -l -`): man may read files as another user.
        let mut c = Command::new("bash");
        c.args(["-c", "man -l - < \"$1\"", "man"]).arg(man1.join(page)).env("MANPAGER", "cat").env("PAGER", "cat").env("MANWIDTH", "100").env("LC_ALL", "C.UTF-8");
        let out = run_with_timeout(c, CMD_TIMEOUT);
        let s = ok(&out, &format!("man -l {page}"));
        let err = text(&out.stderr);
        assert!(!err.contains("warning") && !err.contains("error"), "man -l {page} complains:\n{err}");
        s
    };
    let shown = render("ckpt.1");
    assert!(shown.contains("NAME") && shown.contains("SYNOPSIS"), "man ckpt.1 lacks NAME/SYNOPSIS:\n{shown}");
    for sub in SUBCOMMANDS {
        assert!(shown.contains(&format!("ckpt-{sub}(1)")) || shown.contains(sub), "man ckpt.1 does not mention {sub}:\n{shown}");
    }
    let launch = render("ckpt-launch.1");
    for opt in ["--interval", "--dirty-tracking", "--store", "--pid-namespace"] {
        assert!(launch.contains(opt), "man ckpt-launch.1 does not show {opt}:\n{launch}");
    }
}

/// The bash completion loads (`complete -p ckpt`) and completes: `ckpt
/// la<TAB>` gives `launch`, `ckpt launch --dirty-t<TAB>` its option.
fn check_completions(prefix: &Path) {
    let bash = prefix.join("share/bash-completion/completions/ckpt");
    let script = format!(
        r#"source {f} || exit 1
complete -p ckpt || exit 1
fn=$(complete -p ckpt | sed -n 's/.*-F \([^ ]*\).*/\1/p')
COMP_WORDS=(ckpt la); COMP_CWORD=1; COMP_LINE='ckpt la'; COMP_POINT=${{#COMP_LINE}}
"$fn" ckpt la ckpt; echo "first: ${{COMPREPLY[*]}}"
COMP_WORDS=(ckpt launch --dirty-t); COMP_CWORD=2; COMP_LINE='ckpt launch --dirty-t'; COMP_POINT=${{#COMP_LINE}}
"$fn" ckpt --dirty-t launch; echo "option: ${{COMPREPLY[*]}}""#,
        f = bash.display()
    );
    let mut c = Command::new("bash");
    c.args(["--norc", "--noprofile", "-c", &script]);
    let out = ok(&run_with_timeout(c, CMD_TIMEOUT), "loading the bash completion");
    assert!(out.lines().any(|l| l.starts_with("complete ") && l.trim_end().ends_with(" ckpt")), "complete -p ckpt printed no completion for ckpt:\n{out}");
    let line = |k: &str| out.lines().find_map(|l| l.strip_prefix(k)).unwrap_or_default().to_string();
    assert_eq!(line("first: ").split_whitespace().collect::<Vec<_>>(), ["launch"], "ckpt la<TAB> should give launch only:\n{out}");
    assert!(line("option: ").split_whitespace().any(|w| w == "--dirty-tracking"), "ckpt launch --dirty-t<TAB> should give --dirty-tracking:\n{out}");
    let zsh = std::fs::read_to_string(prefix.join("share/zsh/site-functions/_ckpt")).unwrap();
    assert!(zsh.starts_with("#compdef ckpt"), "_ckpt is not a zsh completion (#compdef ckpt):\n{}", &zsh[..zsh.len().min(200)]);
    let fish = std::fs::read_to_string(prefix.join("share/fish/vendor_completions.d/ckpt.fish")).unwrap();
    assert!(fish.contains("complete -c ckpt") && fish.contains("launch"), "ckpt.fish is not a fish completion of ckpt");
}

/// The agent in the launched program is the installed one: launch, look
/// at the program's maps, SIGKILL it.
fn check_agent_is_installed(s: &Session, prefix: &Path) {
    let mut p = s.launch(&program("counter_heap"), &["-t", "100", "-m", "8"]);
    p.wait_prefix("READY", LINE_TIMEOUT);
    let pid = p.host_pid();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let agent = prefix.join("lib/ckpt/libckpt_preload.so");
    assert!(maps.lines().any(|l| l.ends_with(agent.to_str().unwrap())), "the launched program does not map the installed agent {}:\n{maps}", agent.display());
    p.kill9();
}

/// The installed API works for a program built against it: hooks.c
/// compiled with the installed header and library, launched by the
/// installed ckpt, runs its callbacks around a checkpoint; the installed
/// Python module finds the installed libckpt.so by itself.
fn check_api(s: &Session, prefix: &Path) {
    let exe = s.path("hooks-installed");
    let mut c = Command::new("gcc");
    c.args(["-O2", "-pthread", "-Wall", "-Werror"])
        .arg(format!("-I{}", prefix.join("include").display()))
        .arg(format!("-I{}", ckpt_tests::SOURCES_DIR))
        .arg(format!("-L{}", prefix.join("lib").display()))
        .arg(format!("-Wl,-rpath,{}", prefix.join("lib").display()))
        .arg("-o")
        .arg(&exe)
        .arg(source("hooks.c"))
        .arg("-lckpt");
    ok(&run_with_timeout(c, CMD_TIMEOUT), "gcc hooks.c against the installed ckpt.h and libckpt.so");
    let mut p = s.launch(&exe, &["-t", "100"]);
    p.wait_prefix("READY", LINE_TIMEOUT);
    let g = s.checkpoint();
    p.wait_line(|l| *l == format!("HOOK post 1 gen {g}"), LINE_TIMEOUT);
    p.kill9();
    let mut c = Command::new(python3());
    c.args(["-c", "import ckpt; print(ckpt.__file__, ckpt._lib._name, ckpt.is_enabled())"]).env("PYTHONPATH", prefix.join("lib/ckpt/python")).env_remove("CKPT_LIBCKPT");
    let said = ok(&run_with_timeout(c, CMD_TIMEOUT), "import ckpt from the install");
    let want = format!("{} {} False", prefix.join("lib/ckpt/python/ckpt.py").display(), prefix.join("lib/libckpt.so").display());
    assert_eq!(said.trim(), want);
}

/// `--uninstall PREFIX` removes every installed file and keeps the rest.
fn check_uninstall(prefix: &Path, run: impl Fn(&[&str]) -> Output) {
    let other = prefix.join("bin/not-ckpt");
    std::fs::write(&other, "keep me\n").unwrap();
    ok(&run(&["--uninstall", prefix.to_str().unwrap()]), "install.sh --uninstall");
    for (rel, _) in INSTALLED {
        assert!(!prefix.join(rel).exists(), "{rel} is still there after --uninstall");
    }
    for sub in SUBCOMMANDS {
        assert!(!prefix.join(format!("share/man/man1/ckpt-{sub}.1")).exists(), "ckpt-{sub}.1 is still there after --uninstall");
    }
    assert!(!prefix.join("lib/ckpt").exists(), "lib/ckpt is still there after --uninstall");
    assert_eq!(std::fs::read_to_string(&other).unwrap(), "keep me\n", "--uninstall touched a file it did not install");
}

fn counter_cycle() -> Cycle<'static> {
    Cycle::new(program("counter_heap"), &["-t", "100", "-m", "64"])
}

/// `bash scripts/install.sh --no-build ARGS` run by `cmd` (root's or the
/// session user's `bash`) with HOME = `home`.
fn install_sh(mut c: Command, home: &Path, args: &[&str]) -> Output {
    c.arg(repo().join("scripts/install.sh")).arg("--no-build").args(args).env("HOME", home).env("CARGO_TARGET_DIR", target_dir());
    run_with_timeout(c, CMD_TIMEOUT)
}

#[test]
fn root_install_into_a_prefix_runs_a_cycle() {
    let s = Session::new("install_root");
    let prefix = s.path("prefix");
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/root".into());
    let dir = s.dir.clone();
    let run = |args: &[&str]| {
        let mut c = Command::new("bash");
        c.current_dir(&dir);
        install_sh(c, &home, args)
    };
    let t = Instant::now();
    let said = ok(&run(&[prefix.to_str().unwrap()]), "install.sh PREFIX");
    eprintln!("install.sh: {} ({:.1} s)", said.trim(), t.elapsed().as_secs_f64());
    check_layout(&prefix, 0);
    check_man(&prefix);
    check_completions(&prefix);

    let s = s.with_ckpt(prefix.join("bin/ckpt"));
    check_agent_is_installed(&s, &prefix);
    check_api(&s, &prefix);
    // The cycle in a session (and coordinator) of its own, as every other
    // standard cycle runs.
    let cycle = standard_cycle_in(Session::new("install_root_cycle").with_ckpt(prefix.join("bin/ckpt")), &counter_cycle());
    drop(cycle);
    // The session's coordinator is the installed ckpt: told to quit while
    // it is still installed (the session's drop runs the same `ckpt quit`,
    // which after the uninstall would not exist, leaving it running).
    s.run("quit", &[]);
    check_uninstall(&prefix, run);
    drop(s);
}

#[test]
fn user_install_into_home_local_runs_a_cycle() {
    let s = Session::as_user(TEST_USER, "install_user");
    let uid = s.user.as_ref().unwrap().uid;
    // The user's HOME is the session dir (its own, 0700): the default
    // prefix, ~/.local, is then the session's, not the account's real one.
    let home = s.dir.clone();
    let prefix = home.join(".local");
    let said = ok(&install_sh(s.user_command("bash"), &home, &[]), "install.sh (as ckpt-user, default prefix)");
    eprintln!("install.sh as {TEST_USER}: {}", said.trim());
    assert!(said.contains(prefix.to_str().unwrap()), "install.sh as a user should install into ~/.local ({}):\n{said}", prefix.display());
    check_layout(&prefix, uid);
    check_man(&prefix);
    check_completions(&prefix);

    let s = s.with_ckpt(prefix.join("bin/ckpt"));
    check_agent_is_installed(&s, &prefix);
    // The cycle in a session of its own (the user's prefix stays readable
    // to it: the session dirs are the user's).
    let cycle = standard_cycle_in(Session::as_user(TEST_USER, "install_user_cycle").with_ckpt(prefix.join("bin/ckpt")), &counter_cycle());
    drop(cycle);
    s.run("quit", &[]);
    check_uninstall(&prefix, |args| install_sh(s.user_command("bash"), &home, args));
}
