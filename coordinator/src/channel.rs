//! The secure channel of every TCP connection to the coordinator: a Noise
//! pre-shared-key handshake (`snow`, [`PATTERN`]), then every byte
//! encrypted and authenticated, both ways.
//!
//! Who proves what: the connecting side names its [`Role`] in a cleartext
//! [`PREAMBLE`] (bound into the handshake's prologue, so a changed role
//! fails the handshake). A [`Role::Control`] peer (a `ckpt` command, a
//! capture helper, `ckpt host`) proves the computation's secret itself
//! ([`Secret::bytes`]); a [`Role::Agent`] peer (the agent inside a program
//! on another host, or the restart driver on its behalf) proves only the
//! membership key ([`Secret::agent_key`]) and may only speak the agent
//! protocol. With `NNpsk0` the first message already carries a tag under
//! the key, so the coordinator learns whether its peer holds the key before
//! it answers anything, and its answer proves to the peer that it holds the
//! key too: a fake coordinator gets one message of random-looking bytes and
//! nothing after it. Both sides contribute fresh ephemeral keys: every
//! connection has keys of its own (no replay, forward secrecy).
//!
//! On the wire: the 8-byte preamble, then frames of a 2-byte big-endian
//! length and that many bytes (≤ [`MAX_FRAME`]): the two handshake
//! messages, then transport messages, each a ChaCha20-Poly1305 sealing of
//! at most [`MAX_PLAIN`] bytes of the byte stream under the direction's key
//! and a counter nonce (Noise's transport).
//!
//! [`SecureStream`] is cloned into a reader thread and writers: the two
//! directions have separate states (the stateless transport with a nonce
//! counter per direction), a lock per direction serializes the frames of
//! one direction only, and a reader never waits for a writer.

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::Secret;

/// The Noise protocol of the channel.
pub const PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Version of the channel, in the preamble and the prologue.
pub const VERSION: u8 = 1;
/// First bytes of every TCP connection to the coordinator, followed by the
/// version and the role.
pub const PREAMBLE: [u8; 6] = *b"CKPTNZ";
/// Largest frame (Noise's message limit).
pub const MAX_FRAME: usize = 65535;
/// Authentication tag of a sealed frame.
pub const TAG: usize = 16;
/// Most plaintext bytes in one frame.
pub const MAX_PLAIN: usize = MAX_FRAME - TAG;
/// How long either side waits for the other's handshake message.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames a writer seals before one `write` to the socket.
const FRAMES_PER_WRITE: usize = 8;

/// What the connecting side is, and so which key it proves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// A `ckpt` command or a capture helper: holds the secret itself.
    Control = 1,
    /// An agent of a program of the computation: holds the membership key.
    Agent = 2,
}

impl Role {
    fn from_u8(b: u8) -> Option<Role> {
        match b {
            1 => Some(Role::Control),
            2 => Some(Role::Agent),
            _ => None,
        }
    }

    fn key_name(self) -> &'static str {
        match self {
            Role::Control => "the computation's secret",
            Role::Agent => "the computation's membership key (CKPT_AGENT_KEY, given by `ckpt launch`)",
        }
    }
}

/// The handshake's prologue: binds the channel version and the role.
pub fn prologue(role: Role) -> [u8; 24] {
    let mut p = *b"ckpt secure channel v?r?";
    p[21] = b'0' + VERSION;
    p[23] = b'0' + role as u8;
    p
}

/// The preamble a connecting `role` sends.
pub fn preamble(role: Role) -> [u8; 8] {
    let mut p = [0u8; 8];
    p[..6].copy_from_slice(&PREAMBLE);
    p[6] = VERSION;
    p[7] = role as u8;
    p
}

fn builder<'a>(psk: &'a [u8; 32], prologue: &'a [u8; 24]) -> snow::Builder<'a> {
    let params: snow::params::NoiseParams = PATTERN.parse().expect("a valid Noise pattern");
    snow::Builder::new(params).psk(0, psk).expect("psk0 in an NNpsk0 pattern").prologue(prologue).expect("one prologue")
}

fn refused(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::PermissionDenied, what)
}

fn write_frame(sock: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let mut f = Vec::with_capacity(2 + msg.len());
    f.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    f.extend_from_slice(msg);
    sock.write_all(&f)
}

fn read_frame(sock: &mut TcpStream, max: usize) -> std::io::Result<Vec<u8>> {
    let mut l = [0u8; 2];
    sock.read_exact(&mut l)?;
    let len = u16::from_be_bytes(l) as usize;
    if len > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("the peer sent a handshake message of {len} bytes where at most {max} fit: it is not a ckpt coordinator (or agent) of this version")));
    }
    let mut m = vec![0u8; len];
    sock.read_exact(&mut m)?;
    Ok(m)
}

/// Runs the handshake as the connecting side on `sock` (already
/// connected to `addr`), proving `psk` as `role`. Returns the finished
/// handshake. Every failure is a `PermissionDenied` error that says what to
/// do; `key_hint` names where the key came from.
pub fn initiate(sock: &mut TcpStream, addr: &str, role: Role, psk: &[u8; 32], key_hint: &str) -> std::io::Result<snow::HandshakeState> {
    let pro = prologue(role);
    let mut hs = builder(psk, &pro).build_initiator().map_err(std::io::Error::other)?;
    let old = sock.read_timeout()?;
    sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut buf = [0u8; 256];
    let n = hs.write_message(&[], &mut buf).map_err(std::io::Error::other)?;
    let mut first = preamble(role).to_vec();
    first.extend_from_slice(&(n as u16).to_be_bytes());
    first.extend_from_slice(&buf[..n]);
    sock.write_all(&first)?;
    let fix = format!(
        "copy the secret file from the coordinator's machine to this one ({key_hint}, mode 0600), or point CKPT_SECRET_FILE at a copy"
    );
    let answer = match read_frame(sock, 256) {
        Ok(a) => a,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) => {
            return Err(refused(format!(
                "the coordinator at {addr} closed the connection in the secure handshake: it does not hold the key this machine proves ({}); {fix}",
                role.key_name()
            )));
        }
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            return Err(refused(format!(
                "the peer at {addr} did not answer the secure handshake within {} s: it is not a ckpt coordinator (check the address), or an older ckpt",
                HANDSHAKE_TIMEOUT.as_secs()
            )));
        }
        Err(e) => return Err(e),
    };
    if hs.read_message(&answer, &mut buf).is_err() {
        return Err(refused(format!(
            "the peer at {addr} failed the secure handshake: it is not a coordinator holding the key of this machine ({}); check the address, or {fix}",
            role.key_name()
        )));
    }
    sock.set_read_timeout(old)?;
    Ok(hs)
}

/// The keys a coordinator accepts.
pub struct ServerKeys {
    secret: [u8; 32],
    agent: [u8; 32],
}

impl ServerKeys {
    pub fn new(secret: &Secret) -> ServerKeys {
        ServerKeys { secret: *secret.bytes(), agent: secret.agent_key() }
    }

    fn of(&self, role: Role) -> &[u8; 32] {
        match role {
            Role::Control => &self.secret,
            Role::Agent => &self.agent,
        }
    }
}

/// Runs the handshake as the coordinator on an accepted `sock` from
/// `peer`. A peer that does not speak it, or proves no key of `keys`, is
/// refused: the error says why and nothing of the peer's bytes was parsed
/// beyond the preamble and the handshake.
pub fn respond(mut sock: TcpStream, peer: &str, keys: &ServerKeys) -> std::io::Result<(SecureStream, Role)> {
    let old = sock.read_timeout()?;
    sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut pre = [0u8; 8];
    sock.read_exact(&mut pre).map_err(|e| refused(format!("{peer} sent no secure handshake ({e})")))?;
    if pre[..6] != PREAMBLE {
        return Err(refused(format!("{peer} does not speak ckpt's secure channel (plain TCP, or another program)")));
    }
    if pre[6] != VERSION {
        return Err(refused(format!("{peer} speaks version {} of ckpt's secure channel, this coordinator {VERSION}: run the same ckpt on every host", pre[6])));
    }
    let role = Role::from_u8(pre[7]).ok_or_else(|| refused(format!("{peer} names no known role ({})", pre[7])))?;
    let m1 = read_frame(&mut sock, 256).map_err(|e| refused(format!("{peer} sent no complete handshake ({e})")))?;
    let pro = prologue(role);
    let mut hs = builder(keys.of(role), &pro).build_responder().map_err(std::io::Error::other)?;
    let mut buf = [0u8; 256];
    if hs.read_message(&m1, &mut buf).is_err() {
        return Err(refused(format!("{peer} failed the secure handshake as {role:?}: it does not hold {}", role.key_name())));
    }
    let n = hs.write_message(&[], &mut buf).map_err(std::io::Error::other)?;
    write_frame(&mut sock, &buf[..n])?;
    sock.set_read_timeout(old)?;
    Ok((SecureStream::new(sock, hs)?, role))
}

struct Tx {
    nonce: u64,
    buf: Vec<u8>,
}

struct Rx {
    r: BufReader<TcpStream>,
    nonce: u64,
    /// The frame being read (length prefix included), `have` bytes of it.
    frame: Vec<u8>,
    have: usize,
    plain: Vec<u8>,
    pos: usize,
    broken: bool,
}

struct Chan {
    t: snow::StatelessTransportState,
    tx: Mutex<Tx>,
    rx: Mutex<Rx>,
}

/// An established channel over a TCP connection: `Read` yields the peer's
/// plaintext, `Write` seals. Clones share the channel.
pub struct SecureStream {
    sock: TcpStream,
    chan: Arc<Chan>,
}

impl SecureStream {
    /// The channel of a finished handshake on `sock`.
    pub fn new(sock: TcpStream, hs: snow::HandshakeState) -> std::io::Result<SecureStream> {
        let t = hs.into_stateless_transport_mode().map_err(std::io::Error::other)?;
        let r = BufReader::with_capacity(4 * MAX_FRAME, sock.try_clone()?);
        let rx = Rx { r, nonce: 0, frame: vec![0u8; 2 + MAX_FRAME], have: 0, plain: Vec::with_capacity(MAX_FRAME), pos: 0, broken: false };
        let tx = Tx { nonce: 0, buf: Vec::with_capacity(FRAMES_PER_WRITE * (2 + MAX_FRAME)) };
        Ok(SecureStream { sock, chan: Arc::new(Chan { t, tx: Mutex::new(tx), rx: Mutex::new(rx) }) })
    }

    pub fn try_clone(&self) -> std::io::Result<SecureStream> {
        Ok(SecureStream { sock: self.sock.try_clone()?, chan: self.chan.clone() })
    }

    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// The socket alone (its channel state is lost with the clone).
    pub fn into_socket(self) -> TcpStream {
        self.sock
    }
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("secure channel: {what}"))
}

impl Read for SecureStream {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut guard = self.chan.rx.lock().unwrap();
        let rx = &mut *guard;
        loop {
            if rx.broken {
                return Err(bad("a frame failed authentication earlier; the connection is unusable"));
            }
            if rx.pos < rx.plain.len() {
                let n = out.len().min(rx.plain.len() - rx.pos);
                out[..n].copy_from_slice(&rx.plain[rx.pos..rx.pos + n]);
                rx.pos += n;
                return Ok(n);
            }
            let need = if rx.have < 2 { 2 } else { 2 + u16::from_be_bytes([rx.frame[0], rx.frame[1]]) as usize };
            if need > 2 && need < 2 + TAG {
                rx.broken = true;
                return Err(bad("a frame shorter than its tag"));
            }
            if rx.have < need {
                // A timeout here keeps the part read: the next call goes on.
                let n = rx.r.read(&mut rx.frame[rx.have..need])?;
                if n == 0 {
                    if rx.have == 0 {
                        return Ok(0);
                    }
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "secure channel: the connection closed inside a frame"));
                }
                rx.have += n;
                continue;
            }
            rx.plain.resize(need - 2 - TAG, 0);
            match self.chan.t.read_message(rx.nonce, &rx.frame[2..need], &mut rx.plain) {
                Ok(n) => rx.plain.truncate(n),
                Err(_) => {
                    rx.broken = true;
                    return Err(bad("a frame failed authentication (tampered, or not from the peer of the handshake)"));
                }
            }
            rx.nonce += 1;
            rx.have = 0;
            rx.pos = 0;
        }
    }
}

impl Write for SecureStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut guard = self.chan.tx.lock().unwrap();
        let tx = &mut *guard;
        for batch in buf.chunks(FRAMES_PER_WRITE * MAX_PLAIN) {
            tx.buf.clear();
            for chunk in batch.chunks(MAX_PLAIN) {
                let at = tx.buf.len();
                tx.buf.resize(at + 2 + chunk.len() + TAG, 0);
                let n = self.chan.t.write_message(tx.nonce, chunk, &mut tx.buf[at + 2..]).map_err(std::io::Error::other)?;
                tx.buf[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
                tx.nonce += 1;
            }
            (&self.sock).write_all(&tx.buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where this machine's secret is, for messages.
pub fn secret_hint() -> String {
    match Secret::default_path() {
        Ok(p) => p.display().to_string(),
        Err(_) => "$CKPT_SECRET_FILE".into(),
    }
}

/// Loads this machine's secret for a connection to `addr`, with an error
/// that says what to do when there is none.
pub fn load_secret(addr: &str) -> std::io::Result<Secret> {
    let path = Secret::default_path().map_err(|e| refused(e.to_string()))?;
    Secret::load(&path).map_err(|e| match e {
        crate::secret::SecretError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => refused(format!(
            "the coordinator at {addr} requires its secret and this machine has none at {}: copy the file from the coordinator's machine there (mode 0600), or set CKPT_SECRET_FILE to a copy",
            path.display()
        )),
        e => refused(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(client_key: [u8; 32], role: Role, server: ServerKeys) -> (std::io::Result<snow::HandshakeState>, std::io::Result<(SecureStream, Role)>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            respond(s, "test peer", &server)
        });
        let mut c = TcpStream::connect(a).unwrap();
        let hs = initiate(&mut c, &a.to_string(), role, &client_key, "test");
        (hs, t.join().unwrap(), c)
    }

    #[test]
    fn both_ways_and_concurrently() {
        let s = Secret::from_hex(&"11".repeat(32)).unwrap();
        let (hs, srv, c) = pair(*s.bytes(), Role::Control, ServerKeys::new(&s));
        let mut client = SecureStream::new(c, hs.unwrap()).unwrap();
        let (server, role) = srv.unwrap();
        assert_eq!(role, Role::Control);
        // A big message one way while the other way carries small ones.
        let big: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7) as u8).collect();
        let (mut sr, mut sw) = (server.try_clone().unwrap(), server);
        let b2 = big.clone();
        let t = std::thread::spawn(move || {
            let mut got = vec![0u8; b2.len()];
            sr.read_exact(&mut got).unwrap();
            assert!(got == b2);
        });
        let mut cr = client.try_clone().unwrap();
        let t2 = std::thread::spawn(move || {
            for i in 0..100u8 {
                sw.write_all(&[i; 3]).unwrap();
            }
        });
        client.write_all(&big).unwrap();
        let mut small = [0u8; 300];
        cr.read_exact(&mut small).unwrap();
        assert!(small.chunks(3).enumerate().all(|(i, c)| c == [i as u8; 3]));
        t.join().unwrap();
        t2.join().unwrap();
    }

    /// Throughput of the channel against plain TCP on loopback (run with
    /// `--ignored --nocapture`).
    #[test]
    #[ignore]
    fn throughput() {
        const N: usize = 512 << 20;
        let block = vec![0x5au8; 1 << 20];
        let time = |mut w: Box<dyn Write + Send>, mut r: Box<dyn Read + Send>| {
            let t0 = std::time::Instant::now();
            let t = std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                let mut got = 0;
                while got < N {
                    got += r.read(&mut buf).unwrap();
                }
            });
            for _ in 0..N / block.len() {
                w.write_all(&block).unwrap();
            }
            t.join().unwrap();
            N as f64 / t0.elapsed().as_secs_f64() / (1 << 20) as f64
        };
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        let plain = time(Box::new(c), Box::new(a));
        let s = Secret::from_hex(&"11".repeat(32)).unwrap();
        let (hs, srv, c) = pair(*s.bytes(), Role::Control, ServerKeys::new(&s));
        let secure = time(Box::new(SecureStream::new(c, hs.unwrap()).unwrap()), Box::new(srv.unwrap().0));
        eprintln!("loopback: plain TCP {plain:.0} MiB/s, secure channel {secure:.0} MiB/s (ratio {:.2})", secure / plain);
    }

    #[test]
    fn wrong_key_or_role_refused() {
        let s = Secret::from_hex(&"11".repeat(32)).unwrap();
        let other = [0x22u8; 32];
        let (hs, srv, _c) = pair(other, Role::Control, ServerKeys::new(&s));
        assert_eq!(srv.err().unwrap().kind(), std::io::ErrorKind::PermissionDenied);
        assert_eq!(hs.err().unwrap().kind(), std::io::ErrorKind::PermissionDenied);
        // The membership key does not pass as the secret.
        let (hs, srv, _c) = pair(s.agent_key(), Role::Control, ServerKeys::new(&s));
        assert!(srv.is_err() && hs.is_err());
        let (hs, srv, _c) = pair(s.agent_key(), Role::Agent, ServerKeys::new(&s));
        assert!(hs.is_ok());
        assert_eq!(srv.unwrap().1, Role::Agent);
    }
}
