//! Command hooks (`ckpt launch --hook KIND=CMD`): shell commands run around
//! the computation's checkpoints, for programs that cannot be changed (the
//! C API, `libckpt/ckpt.h`, is for those that can). The coordinator runs
//! `pre-checkpoint` before a round stops anything and `post-checkpoint`
//! after it, committed or not; `ckpt restart` runs `post-restart` once
//! every process is back. They are stored with each generation (its
//! `info.hooks`), so a restart brings them back.
//!
//! Each runs as `/bin/sh -c CMD` in a process group of its own, with
//! stdin from `/dev/null`, and an environment of its own: `PATH`, `HOME`,
//! `USER`, `LOGNAME`, `LANG` and `TMPDIR` from the coordinator's (when
//! set), and `CKPT_HOOK`, `CKPT_STORE`, `CKPT_COORD`, `CKPT_PIDS`,
//! `CKPT_GENERATION`, `CKPT_OUTCOME`, `CKPT_ERROR` ([`HookEnv`]). One that
//! exits non-zero or does not exit within the timeout (the whole group is
//! killed then) fails: a failed pre-checkpoint refuses the round.

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Default hook timeout (`--hook-timeout`).
pub const DEFAULT_TIMEOUT_S: u64 = 60;
/// The kinds of `--hook KIND=CMD`.
pub const KINDS: [&str; 3] = ["pre-checkpoint", "post-checkpoint", "post-restart"];

/// A computation's command hooks and the timeout of every hook (commands
/// and the program's own callbacks).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    #[serde(rename = "pre-checkpoint", default, skip_serializing_if = "Option::is_none")]
    pub pre_checkpoint: Option<String>,
    #[serde(rename = "post-checkpoint", default, skip_serializing_if = "Option::is_none")]
    pub post_checkpoint: Option<String>,
    #[serde(rename = "post-restart", default, skip_serializing_if = "Option::is_none")]
    pub post_restart: Option<String>,
    /// Seconds each hook may take ([`DEFAULT_TIMEOUT_S`] if unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
}

impl Hooks {
    /// Parses `KIND=CMD` (of `--hook`).
    pub fn parse_arg(s: &str) -> Result<(String, String), String> {
        match s.split_once('=') {
            Some((k, cmd)) if KINDS.contains(&k) && !cmd.trim().is_empty() => Ok((k.to_string(), cmd.to_string())),
            Some((k, _)) if KINDS.contains(&k) => Err(format!("--hook {k}= names no command")),
            _ => Err(format!("{s:?} is not KIND=COMMAND with KIND one of {} (e.g. --hook 'pre-checkpoint=pg_ctl stop')", KINDS.join(", "))),
        }
    }

    /// Sets the hook of `kind` (one of [`KINDS`]).
    pub fn set(&mut self, kind: &str, cmd: String) {
        match kind {
            "pre-checkpoint" => self.pre_checkpoint = Some(cmd),
            "post-checkpoint" => self.post_checkpoint = Some(cmd),
            _ => self.post_restart = Some(cmd),
        }
    }

    /// These hooks with those of `over` put over them (a restart's
    /// `--hook` over the generation's).
    pub fn merged(&self, over: &Hooks) -> Hooks {
        Hooks {
            pre_checkpoint: over.pre_checkpoint.clone().or_else(|| self.pre_checkpoint.clone()),
            post_checkpoint: over.post_checkpoint.clone().or_else(|| self.post_checkpoint.clone()),
            post_restart: over.post_restart.clone().or_else(|| self.post_restart.clone()),
            timeout_s: over.timeout_s.or(self.timeout_s),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Hooks::default()
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S))
    }

    /// Checks the values a request may carry.
    pub fn validate(&self) -> Result<(), String> {
        for c in [&self.pre_checkpoint, &self.post_checkpoint, &self.post_restart].into_iter().flatten() {
            if c.len() > crate::protocol::MAX_STRING || c.contains('\0') {
                return Err(format!("a hook command of {} bytes, or with a NUL byte (at most {})", c.len(), crate::protocol::MAX_STRING));
            }
        }
        match self.timeout_s {
            Some(0) => Err("a hook timeout of 0 s".into()),
            Some(t) if t > 86_400 => Err(format!("a hook timeout of {t} s (at most a day)")),
            _ => Ok(()),
        }
    }
}

/// What a hook command is told (as `CKPT_*` variables).
#[derive(Clone, Debug, Default)]
pub struct HookEnv {
    pub store: String,
    pub coord: String,
    /// The computation's processes (pids as the coordinator knows them).
    pub pids: Vec<i32>,
    /// post-checkpoint: the committed generation (0 if none); post-restart:
    /// the generation restored.
    pub generation: u64,
    /// post-checkpoint: `committed` or `failed`.
    pub outcome: Option<&'static str>,
    /// post-checkpoint of a failed round: why.
    pub error: Option<String>,
}

/// Runs the hook `kind` = `cmd` within `timeout`. Err says what went wrong,
/// naming the hook and its command.
pub fn run(kind: &str, cmd: &str, timeout: Duration, env: &HookEnv) -> Result<(), String> {
    let mut c = std::process::Command::new("/bin/sh");
    c.arg("-c").arg(cmd).env_clear();
    for k in ["PATH", "HOME", "USER", "LOGNAME", "LANG", "TMPDIR"] {
        if let Some(v) = std::env::var_os(k) {
            c.env(k, v);
        }
    }
    if std::env::var_os("PATH").is_none() {
        c.env("PATH", "/usr/local/bin:/usr/bin:/bin");
    }
    let pids: Vec<String> = env.pids.iter().map(|p| p.to_string()).collect();
    c.env("CKPT_HOOK", kind)
        .env("CKPT_STORE", &env.store)
        .env("CKPT_COORD", &env.coord)
        .env("CKPT_PIDS", pids.join(" "))
        .env("CKPT_GENERATION", env.generation.to_string());
    if let Some(o) = env.outcome {
        c.env("CKPT_OUTCOME", o);
    }
    if let Some(e) = &env.error {
        c.env("CKPT_ERROR", e);
    }
    c.stdin(std::process::Stdio::null()).process_group(0);
    let what = format!("the {kind} hook `{cmd}`");
    let mut child = c.spawn().map_err(|e| format!("{what} could not start: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => {
                // The group too: a hook's background children end with it.
                kill_group(child.id());
                return Err(match st.code() {
                    Some(code) => format!("{what} exited with status {code}"),
                    None => format!("{what} was killed ({st})"),
                });
            }
            Ok(None) if Instant::now() >= deadline => {
                kill_group(child.id());
                let _ = child.wait();
                return Err(format!("{what} did not finish within {} s and was killed (raise the limit with --hook-timeout SECS)", timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("{what}: waiting for it: {e}")),
        }
    }
}

fn kill_group(pgid: u32) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid as i32), nix::sys::signal::Signal::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_parse_and_merge() {
        assert_eq!(Hooks::parse_arg("pre-checkpoint=echo a=b").unwrap(), ("pre-checkpoint".into(), "echo a=b".into()));
        assert!(Hooks::parse_arg("pre=echo").unwrap_err().contains("KIND=COMMAND"));
        assert!(Hooks::parse_arg("post-restart=  ").unwrap_err().contains("names no command"));
        let mut a = Hooks::default();
        a.set("pre-checkpoint", "a".into());
        a.set("post-restart", "r".into());
        let mut b = Hooks { timeout_s: Some(5), ..Default::default() };
        b.set("pre-checkpoint", "b".into());
        let m = a.merged(&b);
        assert_eq!((m.pre_checkpoint.as_deref(), m.post_restart.as_deref(), m.timeout_s), (Some("b"), Some("r"), Some(5)));
        let j = serde_json::to_value(&m).unwrap();
        assert_eq!(j["pre-checkpoint"], "b");
        assert_eq!(serde_json::from_value::<Hooks>(j).unwrap(), m);
    }

    #[test]
    fn commands_fail_and_time_out() {
        let env = HookEnv { generation: 4, ..Default::default() };
        run("post-checkpoint", "test \"$CKPT_GENERATION\" = 4 && test -z \"$CKPT_ERROR\"", Duration::from_secs(10), &env).unwrap();
        let e = run("pre-checkpoint", "exit 3", Duration::from_secs(10), &env).unwrap_err();
        assert!(e.contains("pre-checkpoint hook `exit 3` exited with status 3"), "{e}");
        let t0 = Instant::now();
        let e = run("pre-checkpoint", "sleep 30", Duration::from_secs(1), &env).unwrap_err();
        assert!(e.contains("did not finish within 1 s"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
}
