//! The CLI side of the coordinator protocol: one JSON request per line, one
//! JSON answer per line, `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use serde_json::{Value, json};

use crate::{Address, CoordError};

/// Sends `cmd` (with extra fields) and returns the answer's fields. A
/// refusal becomes [`CoordError::Refused`] carrying the coordinator's message.
pub fn request(addr: &Address, cmd: &str, extra: Value, timeout: Duration) -> Result<Value, CoordError> {
    let mut s = addr.connect(timeout).map_err(|e| connect_error(addr, e))?;
    let mut req = json!({ "cmd": cmd });
    if let (Some(obj), Value::Object(more)) = (req.as_object_mut(), extra) {
        obj.extend(more);
    }
    let mut line = serde_json::to_vec(&req).expect("json");
    line.push(b'\n');
    let proto = |e: std::io::Error| CoordError::Protocol { addr: addr.to_string(), source: e };
    s.write_all(&line).map_err(proto)?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).map_err(proto)?;
    if answer.is_empty() {
        return Err(proto(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no answer")));
    }
    let v: Value = serde_json::from_str(&answer).map_err(|e| proto(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    if v.get("ok").and_then(Value::as_bool) == Some(true) {
        Ok(v)
    } else {
        Err(CoordError::Refused(v.get("error").and_then(Value::as_str).unwrap_or("refused without a reason").to_string()))
    }
}

/// A failed connection: no coordinator there, or one that this machine
/// and it do not trust each other (a failed secure handshake).
pub fn connect_error(addr: &Address, e: std::io::Error) -> CoordError {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        CoordError::Untrusted(e.to_string())
    } else {
        CoordError::Unreachable { addr: addr.to_string(), source: e }
    }
}

/// True if a coordinator answers at `addr`.
pub fn is_up(addr: &Address) -> bool {
    request(addr, "hello", json!({}), Duration::from_secs(2)).is_ok()
}
