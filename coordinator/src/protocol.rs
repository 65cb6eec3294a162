//! The control protocol: the CLI's requests to the coordinator and its
//! answers, typed at both ends ([`crate::client`] sends, the server decodes).
//!
//! One request per connection: one JSON object on one line, then one
//! answer on one line, `{"ok": true, ...}` or `{"ok": false, "error":
//! "..."}`. A request names its command in `"cmd"`; every field a command
//! takes is required (none defaults), and a field it does not take is
//! refused. Decoding is bounded: a line is read with a cap
//! ([`MAX_LINE`]), never into an unbounded buffer, and every list and
//! string of a request is capped ([`MAX_LIST`], [`MAX_STRING`]). A bad
//! request is answered with an error naming what was wrong and its
//! connection closed; the coordinator goes on serving.

use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

use ckpt_store::GenerationInfo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest request or answer line, newline included.
pub const MAX_LINE: usize = 64 << 10;
/// Most items in a list of a request (externals' fds, a restart's hosts).
pub const MAX_LIST: usize = 256;
/// Longest string of a request (a path, a host name).
pub const MAX_STRING: usize = 4096;
/// How long the coordinator waits for a client's request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest answer line the CLI reads (a status lists every process).
pub const MAX_ANSWER: usize = 16 << 20;

/// A request of the CLI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Is a coordinator there, and with which store? ([`HelloReply`])
    Hello {},
    /// The coordinator and its processes ([`StatusReply`]).
    Status {},
    /// Checkpoint every process now ([`CheckpointReply`]).
    Checkpoint {},
    /// Kill every process of the computation ([`KillReply`]).
    Kill {},
    /// `ckpt restart`'s stdio: fds given to the computation from outside.
    Externals { fds: Vec<External> },
    /// The restarts of one generation on several hosts meet here: answered
    /// once every host in `hosts` has arrived.
    RestartBarrier { generation: u64, arrived: Vec<String>, hosts: Vec<String> },
    /// Answered once process `pid` has registered.
    WaitProcess { pid: i32 },
    /// Use these command hooks (and hook timeout) from now on, and store
    /// them with every generation (`ckpt launch --hook` with a coordinator
    /// already running, `ckpt restart`).
    SetHooks { hooks: crate::hooks::Hooks },
    /// Stop the coordinator.
    Quit {},
}

/// An fd given to the computation from outside (by `ckpt restart`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct External {
    pub fd: i32,
    /// Its `readlink /proc/self/fd/FD`.
    pub target: String,
}

/// Why a request (or an answer) was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("the line is longer than {max} bytes (one JSON object per line)")]
    TooLong { max: usize },
    #[error("the connection closed before a whole line arrived")]
    Truncated,
    #[error("no whole line arrived within {} s", REQUEST_TIMEOUT.as_secs())]
    Timeout,
    #[error("reading the line: {0}")]
    Io(#[source] std::io::Error),
    #[error("not a request: {0}")]
    Json(#[source] serde_json::Error),
    #[error("bad request: {0}")]
    Invalid(String),
}

/// Reads one line (up to and without its newline) of at most `max` bytes,
/// `first` being bytes of it read already. Never buffers more than `max`
/// bytes of it.
pub fn read_line(r: impl Read, first: &[u8], max: usize) -> Result<Vec<u8>, ProtoError> {
    let mut line = first.to_vec();
    if let Some(end) = line.iter().position(|&b| b == b'\n') {
        line.truncate(end);
        return Ok(line);
    }
    let room = (max + 1).saturating_sub(line.len()) as u64;
    let mut r = BufReader::with_capacity(8192, r.take(room));
    match r.read_until(b'\n', &mut line) {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return Err(ProtoError::Timeout),
        Err(e) => return Err(ProtoError::Io(e)),
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.len() < max {
            return Ok(line);
        }
    }
    if line.len() >= max { Err(ProtoError::TooLong { max }) } else { Err(ProtoError::Truncated) }
}

impl Request {
    /// Decodes and validates a request line.
    pub fn decode(line: &[u8]) -> Result<Request, ProtoError> {
        if line.len() >= MAX_LINE {
            return Err(ProtoError::TooLong { max: MAX_LINE });
        }
        let req: Request = serde_json::from_slice(line).map_err(ProtoError::Json)?;
        req.validate()?;
        Ok(req)
    }

    /// The request as one line (newline included).
    pub fn encode(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("a request serializes");
        line.push(b'\n');
        line
    }

    /// Checks the caps and values a well-formed request may still break.
    pub fn validate(&self) -> Result<(), ProtoError> {
        let bad = |what: String| Err(ProtoError::Invalid(what));
        let list = |name: &str, n: usize| if n > MAX_LIST { bad(format!("{name} lists {n} items (at most {MAX_LIST})")) } else { Ok(()) };
        let string = |name: &str, s: &str| {
            if s.len() > MAX_STRING {
                bad(format!("a {name} of {} bytes (at most {MAX_STRING})", s.len()))
            } else if s.contains('\0') {
                bad(format!("a {name} with a NUL byte"))
            } else {
                Ok(())
            }
        };
        match self {
            Request::Externals { fds } => {
                list("fds", fds.len())?;
                for f in fds {
                    if f.fd < 0 {
                        return bad(format!("fd {} is not an fd", f.fd));
                    }
                    string("target", &f.target)?;
                }
                Ok(())
            }
            Request::RestartBarrier { arrived, hosts, .. } => {
                list("arrived", arrived.len())?;
                list("hosts", hosts.len())?;
                for h in arrived.iter().chain(hosts) {
                    string("host name", h)?;
                }
                Ok(())
            }
            Request::WaitProcess { pid } if *pid <= 0 => bad(format!("pid {pid} is not a process")),
            Request::SetHooks { hooks } => hooks.validate().map_err(ProtoError::Invalid),
            _ => Ok(()),
        }
    }

    /// The command's name, as in `"cmd"`.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello {} => "hello",
            Request::Status {} => "status",
            Request::Checkpoint {} => "checkpoint",
            Request::Kill {} => "kill",
            Request::Externals { .. } => "externals",
            Request::RestartBarrier { .. } => "restart_barrier",
            Request::WaitProcess { .. } => "wait_process",
            Request::SetHooks { .. } => "set_hooks",
            Request::Quit {} => "quit",
        }
    }
}

/// Answer to [`Request::Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    pub store: String,
    pub addr: String,
    pub pid: u32,
}

/// Answer to [`Request::Checkpoint`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointReply {
    pub generation: u64,
    pub info: GenerationInfo,
}

/// Answer to [`Request::Kill`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KillReply {
    pub killed: Vec<i32>,
}

/// Answer to the requests that only say they were done.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {}

/// Answer to [`Request::Status`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    pub coordinator: CoordinatorStatus,
    pub store: String,
    pub processes: Vec<ProcessStatus>,
    pub last_generation: Option<GenerationInfo>,
    pub last_error: Option<String>,
}

/// The coordinator itself, in a [`StatusReply`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorStatus {
    pub pid: u32,
    pub addr: String,
    pub uptime_s: u64,
    pub interval_s: Option<u64>,
}

/// A registered process, in a [`StatusReply`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStatus {
    pub pid: i32,
    pub ppid: i32,
    pub host: String,
    /// Empty for processes of other machines.
    pub comm: String,
    pub restored_from: u64,
    pub since_ms: i64,
    pub dirty_tracking: String,
    pub fork: bool,
}

/// An answer line: `{"ok": true, ...body}` (newline included).
pub fn ok_line<T: Serialize>(body: &T) -> Vec<u8> {
    let mut v = serde_json::to_value(body).unwrap_or_else(|_| Value::Object(Default::default()));
    if let Value::Object(m) = &mut v {
        m.insert("ok".into(), Value::Bool(true));
    }
    let mut line = serde_json::to_vec(&v).expect("a JSON value serializes");
    line.push(b'\n');
    line
}

/// A refusal line: `{"ok": false, "error": ...}` (newline included).
pub fn error_line(error: &str) -> Vec<u8> {
    let mut line = serde_json::to_vec(&serde_json::json!({"ok": false, "error": error})).expect("a JSON value serializes");
    line.push(b'\n');
    line
}

/// What an answer line says: its body, or the coordinator's refusal.
pub fn decode_answer<T: DeserializeOwned>(line: &[u8]) -> Result<Result<T, String>, ProtoError> {
    #[derive(Deserialize)]
    struct Head {
        ok: bool,
        error: Option<String>,
    }
    let head: Head = serde_json::from_slice(line).map_err(ProtoError::Json)?;
    if !head.ok {
        return Ok(Err(head.error.unwrap_or_else(|| "refused without a reason".into())));
    }
    serde_json::from_slice(line).map(Ok).map_err(ProtoError::Json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode(s: &str) -> Result<Request, String> {
        Request::decode(s.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn requests_are_typed_and_strict() {
        assert_eq!(decode(r#"{"cmd":"hello"}"#), Ok(Request::Hello {}));
        assert_eq!(decode(r#"{"cmd":"wait_process","pid":7}"#), Ok(Request::WaitProcess { pid: 7 }));
        let e = decode(r#"{"cmd":"restart_barrier","arrived":[],"hosts":[]}"#).unwrap_err();
        assert!(e.contains("missing field `generation`"), "{e}");
        let e = decode(r#"{"cmd":"format_disk"}"#).unwrap_err();
        assert!(e.contains("unknown variant `format_disk`"), "{e}");
        let e = decode(r#"{"cmd":"checkpoint","generation":3}"#).unwrap_err();
        assert!(e.contains("unknown field `generation`"), "{e}");
        let e = decode(r#"{"cmd":"wait_process","pid":"7"}"#).unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
        assert!(decode(r#"{"cmd":"wait_process","pid":-1}"#).unwrap_err().contains("pid -1 is not a process"));
        assert!(decode(r#"{"pid":1}"#).is_err());
        // Command hooks: known kinds only, no NUL, a timeout of 1 s to a day.
        assert!(decode(r#"{"cmd":"set_hooks","hooks":{"pre-checkpoint":"sync","timeout_s":5}}"#).is_ok());
        assert!(decode(r#"{"cmd":"set_hooks","hooks":{"pre-suspend":"x"}}"#).unwrap_err().contains("unknown field `pre-suspend`"));
        assert!(decode(r#"{"cmd":"set_hooks","hooks":{"post-restart":"a\u0000b"}}"#).unwrap_err().contains("NUL"));
        assert!(decode(r#"{"cmd":"set_hooks","hooks":{"timeout_s":0}}"#).unwrap_err().contains("timeout of 0 s"));
        assert!(decode("[]").is_err());
        assert!(decode("").is_err());
        let many = format!(r#"{{"cmd":"restart_barrier","generation":1,"arrived":[],"hosts":[{}]}}"#, vec!["\"h\""; MAX_LIST + 1].join(","));
        assert!(decode(&many).unwrap_err().contains("hosts lists 257 items"));
        let long = format!(r#"{{"cmd":"externals","fds":[{{"fd":0,"target":"{}"}}]}}"#, "x".repeat(MAX_STRING + 1));
        assert!(decode(&long).unwrap_err().contains("4097 bytes"));
    }

    #[test]
    fn lines_are_read_with_a_cap() {
        let r = |input: &[u8], first: &[u8]| read_line(input, first, 16).map_err(|e| e.to_string());
        assert_eq!(r(b"cd\nrest", b"ab"), Ok(b"abcd".to_vec()));
        assert_eq!(r(b"", b"ab\ncd"), Ok(b"ab".to_vec()));
        assert_eq!(r(&[b'x'; 15], b"").unwrap_err(), ProtoError::Truncated.to_string());
        assert_eq!(r(b"0123456789abcde\n", b""), Ok(b"0123456789abcde".to_vec()));
        assert!(r(b"0123456789abcdef\n", b"").unwrap_err().contains("longer than 16"));
        // A stream that never ends is read no further than the cap.
        let endless = std::io::repeat(b'x');
        assert!(read_line(endless, b"", MAX_LINE).unwrap_err().to_string().contains("longer than 65536"));
    }

    #[test]
    fn answers_round_trip() {
        let line = ok_line(&KillReply { killed: vec![3, 4] });
        assert_eq!(decode_answer::<KillReply>(&line[..line.len() - 1]).unwrap(), Ok(KillReply { killed: vec![3, 4] }));
        let line = error_line("no");
        assert_eq!(decode_answer::<Done>(&line).unwrap(), Err("no".to_string()));
        assert!(decode_answer::<HelloReply>(br#"{"ok":true}"#).is_err(), "a missing field must not default");
    }

    fn arb_string() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[a-z0-9/._ -]{0,40}").unwrap()
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            Just(Request::Hello {}),
            Just(Request::Status {}),
            Just(Request::Checkpoint {}),
            Just(Request::Kill {}),
            Just(Request::Quit {}),
            proptest::collection::vec((0..1024i32, arb_string()).prop_map(|(fd, target)| External { fd, target }), 0..8)
                .prop_map(|fds| Request::Externals { fds }),
            (any::<u64>(), proptest::collection::vec(arb_string(), 0..8), proptest::collection::vec(arb_string(), 0..8))
                .prop_map(|(generation, arrived, hosts)| Request::RestartBarrier { generation, arrived, hosts }),
            (1..i32::MAX).prop_map(|pid| Request::WaitProcess { pid }),
            (proptest::option::of(arb_string()), proptest::option::of(arb_string()), proptest::option::of(1..86_400u64)).prop_map(|(pre, restart, timeout_s)| {
                Request::SetHooks { hooks: crate::hooks::Hooks { pre_checkpoint: pre, post_checkpoint: None, post_restart: restart, timeout_s } }
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn valid_requests_round_trip(req in arb_request()) {
            let line = req.encode();
            let got = read_line(&line[..], b"", MAX_LINE).unwrap();
            prop_assert_eq!(Request::decode(&got).unwrap(), req);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Request::decode(&bytes);
            let _ = read_line(&bytes[..], b"", 64);
            let _ = decode_answer::<StatusReply>(&bytes);
        }

        #[test]
        fn mutated_requests_never_panic(req in arb_request(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let mut line = req.encode();
            line.pop();
            let i = at.index(line.len());
            line[i] = byte;
            let line = &line[..cut.index(line.len() + 1)];
            if let Ok(r) = Request::decode(line) {
                prop_assert!(r.validate().is_ok());
            }
        }
    }
}
