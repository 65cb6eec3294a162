//! Pseudo-terminals: a master (`/dev/ptmx`) and its slaves (`/dev/pts/N`)
//! inside the computation are one new pair after a restart.
//!
//! Capture (from the master, with a duplicate of it): the pts number
//! (`TIOCGPTN`), the slave's terminal settings and window size (which the
//! master's `TCGETS`/`TIOCGWINSZ` report), the slave's mode and owner (an
//! `fstat` of a slave opened with `TIOCGPTPEER`), the lock, and the slave's output
//! not yet read on the master side. A terminal cannot be read without
//! consuming, so those bytes are read out and written straight back
//! through a slave opened with `TIOCGPTPEER`, with output processing
//! (`OPOST`) off for the moment so that they come back unchanged; the
//! program is stopped meanwhile and reads the same bytes when it resumes.
//!
//! Restart: a new master from `/dev/ptmx`, unlocked; the slave's settings
//! with `OPOST` off, the bytes in flight written through the slave, then
//! the real settings and window size; every slave fd of the pair is a new
//! `TIOCGPTPEER` open. The pts number can differ (the kernel picks it): a
//! program that kept the old `ptsname` sees a different name. A session
//! leader whose controlling terminal was the slave takes it back
//! ([`crate::restore`], `TIOCSCTTY` after `setsid`), and its restorer gives
//! the terminal its foreground process group again (`TIOCSPGRP`, once every
//! process group exists; recorded from `/proc/PID/stat`'s `tpgid`). A
//! `/dev/tty` fd of a process whose controlling terminal is the slave is a
//! new slave fd of the pair ([`super::Opener::open`]): the restart
//! command's own terminal is never handed out.
//!
//! Limits: bytes typed into the master but not yet read by the slave's
//! reader (the slave's input queue) are not recorded (a warning gives
//! their count); nor are flow-control stops. Packet mode (`TIOCPKT`) is
//! recorded and set again; its data packets are drained header by header,
//! and a control status the program has not read yet refuses the round (try
//! again: it is gone once the program reads it). A foreground
//! group outside the generation is not made (the leader's group is the
//! foreground one, with a warning). A slave
//! whose master is outside the computation is reopened by its path.
//!
//! Never leave a program's terminal changed: every setting touched at
//! checkpoint is put back before the program resumes.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;

use ckpt_chunker::Hash;
use ckpt_store::Store;

use super::{LiveFd, Round, set_status_flags, take_fd};
use crate::error::{EngineError, Result};
use crate::image::{FdImage, FdKind, ProcessImage, PtyState, Termios};

const TIOCGPTPEER: libc::c_ulong = 0x5441;
/// `_IOR('T', 0x38, int)`: whether the master is in packet mode (Linux ≥ 3.8).
const TIOCGPKT: libc::c_ulong = 0x8004_5438;

/// Which end of a pseudo-terminal `meta` is: Some(true) for a master
/// (the `ptmx` device, 5:2), Some(false) for a slave (majors 136-143).
pub fn end_of(meta: &std::fs::Metadata) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    if !meta.file_type().is_char_device() {
        return None;
    }
    let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
    if (major, minor) == (5, 2) {
        Some(true)
    } else if (136..144).contains(&major) {
        Some(false)
    } else {
        None
    }
}

fn ioctl_int(fd: RawFd, req: libc::c_ulong) -> std::io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    // SAFETY: the terminal ioctls used here write one int.
    if unsafe { libc::ioctl(fd, req, &mut v) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

fn get_termios(fd: RawFd) -> std::io::Result<libc::termios> {
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes one termios.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(t)
}

fn set_termios(fd: RawFd, t: &libc::termios) -> std::io::Result<()> {
    // SAFETY: tcsetattr reads one termios.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn to_image(t: &libc::termios) -> Termios {
    Termios {
        iflag: t.c_iflag,
        oflag: t.c_oflag,
        cflag: t.c_cflag,
        lflag: t.c_lflag,
        line: t.c_line,
        cc: t.c_cc.to_vec(),
        // SAFETY: reading speeds from a termios we hold.
        ispeed: unsafe { libc::cfgetispeed(t) },
        // SAFETY: as above.
        ospeed: unsafe { libc::cfgetospeed(t) },
    }
}

fn from_image(i: &Termios) -> libc::termios {
    // SAFETY: termios is plain data.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    t.c_iflag = i.iflag;
    t.c_oflag = i.oflag;
    t.c_cflag = i.cflag;
    t.c_lflag = i.lflag;
    t.c_line = i.line;
    for (d, s) in t.c_cc.iter_mut().zip(&i.cc) {
        *d = *s;
    }
    // SAFETY: setting speeds in a termios we hold.
    unsafe {
        libc::cfsetispeed(&mut t, i.ispeed);
        libc::cfsetospeed(&mut t, i.ospeed);
    }
    t
}

/// A new slave fd of the pair whose master is `master` (close-on-exec,
/// never a controlling terminal by accident).
fn open_peer(master: RawFd, flags: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: TIOCGPTPEER returns a new fd or -1.
    unsafe { take_fd(libc::ioctl(master, TIOCGPTPEER, flags | libc::O_NOCTTY | libc::O_CLOEXEC).into()) }
}

/// Writes `bytes` into the slave side so that the master reads exactly
/// them: output processing off while writing, then `real` settings.
fn feed(slave: &OwnedFd, bytes: &[u8], real: &libc::termios) -> std::io::Result<()> {
    let mut raw = *real;
    raw.c_oflag &= !libc::OPOST;
    set_termios(slave.as_raw_fd(), &raw)?;
    let mut done = 0;
    let mut r = Ok(());
    while done < bytes.len() {
        // SAFETY: a write from our buffer to our own fd.
        let n = unsafe { libc::write(slave.as_raw_fd(), bytes[done..].as_ptr() as *const libc::c_void, bytes.len() - done) };
        if n <= 0 {
            r = Err(std::io::Error::last_os_error());
            break;
        }
        done += n as usize;
    }
    set_termios(slave.as_raw_fd(), real)?;
    r
}

/// Reads what the master side can read now (the slave's output), waiting
/// a moment for bytes the kernel still moves into the read buffer. In
/// packet mode (`TIOCPKT`) every read starts with a header byte: 0
/// (`TIOCPKT_DATA`) before data, which is stripped; a pending control
/// status (the kernel reports it with `POLLPRI`) would be consumed by the
/// read and cannot be made again, so it refuses the checkpoint first. A
/// writer outside the computation that never stops makes this loop
/// endless: the round's deadline ends it ([`Round::check`]).
/// What was read is in `out` even when this fails (to be put back).
fn drain(round: &Round, master: RawFd, packet: bool, pid: i32, fdn: i32, out: &mut Vec<u8>) -> Result<()> {
    let io = |e| EngineError::io(format!("reading the bytes in flight (pseudo-terminal master, process {pid}, fd {fdn})"), e);
    let mut buf = vec![0u8; 16 * 1024 + 1];
    let header = usize::from(packet);
    loop {
        round.check(
            pid,
            || format!("reading the bytes in flight of the pseudo-terminal master at fd {fdn} ({} bytes so far)", out.len()),
            " (a process outside the computation keeps writing into its slave: stop it, or checkpoint when it is quiet)",
        )?;
        if packet {
            let mut p = libc::pollfd { fd: master, events: libc::POLLPRI, revents: 0 };
            // SAFETY: poll on one pollfd of ours, no wait.
            if unsafe { libc::poll(&mut p, 1, 0) } > 0 && p.revents & libc::POLLPRI != 0 {
                return Err(EngineError::SocketBusy {
                    pid,
                    fd: fdn,
                    what: "the pseudo-terminal master in packet mode has a control status (flush, stop or start) its program has not read yet".into(),
                });
            }
        }
        let avail = ioctl_int(master, libc::FIONREAD).map_err(io)?;
        if avail <= 0 {
            let mut p = libc::pollfd { fd: master, events: libc::POLLIN, revents: 0 };
            // SAFETY: poll on one pollfd of ours.
            let r = unsafe { libc::poll(&mut p, 1, 50) };
            if r <= 0 || p.revents & libc::POLLIN == 0 || ioctl_int(master, libc::FIONREAD).map_err(io)? <= 0 {
                return Ok(());
            }
            continue;
        }
        let want = (avail as usize).min(buf.len() - header) + header;
        // SAFETY: reading at most `want` ≤ buf.len() bytes into `buf`;
        // FIONREAD said they are there, so this does not block.
        let n = unsafe { libc::read(master, buf.as_mut_ptr() as *mut libc::c_void, want) };
        if n <= header as isize {
            return Ok(());
        }
        if packet && buf[0] != 0 {
            return Err(EngineError::SocketBusy { pid, fd: fdn, what: format!("the pseudo-terminal master in packet mode gave control status {:#x} while its bytes in flight were read", buf[0]) });
        }
        out.extend_from_slice(&buf[header..n as usize]);
    }
}

pub fn capture_master(round: &mut Round, live: &LiveFd) -> Result<FdKind> {
    let (pid, fdn) = (live.pid, live.fd);
    let io = |what: &str, e| EngineError::io(format!("{what} of the pseudo-terminal master (process {pid}, fd {fdn})"), e);
    let fd = round.grab(pid, fdn)?;
    let m = fd.as_raw_fd();
    let index = ioctl_int(m, libc::TIOCGPTN).map_err(|e| io("TIOCGPTN", e))? as u32;
    let locked = ioctl_int(m, libc::TIOCGPTLCK).map_err(|e| io("TIOCGPTLCK", e))? != 0;
    let real = get_termios(m).map_err(|e| io("TCGETS", e))?;
    let mut ws: libc::winsize = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize.
    if unsafe { libc::ioctl(m, libc::TIOCGWINSZ, &mut ws) } != 0 {
        return Err(io("TIOCGWINSZ", std::io::Error::last_os_error()));
    }
    let packet = ioctl_int(m, TIOCGPKT).map_err(|e| io("TIOCGPKT", e))? != 0;
    let data = if let Some(d) = round.ptys_read.get(&index) {
        *d
    } else {
        let d = if locked { None } else { capture_output(round, m, packet, &real, pid, fdn)? };
        round.ptys_read.insert(index, d);
        d
    };
    let winsize = [ws.ws_row, ws.ws_col, ws.ws_xpixel, ws.ws_ypixel];
    let slave_file = if locked { None } else { slave_file(m) };
    Ok(FdKind::PtyMaster(PtyState { index, termios: to_image(&real), winsize, locked, data, packet, slave_file }))
}

/// The slave's mode and owner, through a slave opened from the master
/// (`TIOCGPTPEER`, `O_NOCTTY`: it never becomes a controlling terminal).
fn slave_file(m: RawFd) -> Option<crate::image::SocketFile> {
    use std::os::unix::fs::MetadataExt;
    let s = open_peer(m, libc::O_RDONLY | libc::O_NONBLOCK).ok()?;
    let md = std::fs::File::from(s).metadata().ok()?;
    Some(crate::image::SocketFile { mode: md.mode() & 0o7777, uid: md.uid(), gid: md.gid() })
}

/// Gives a new slave the recorded mode and owner.
fn set_slave_file(slave: &OwnedFd, f: &crate::image::SocketFile) -> std::io::Result<()> {
    // SAFETY: fchown/fchmod of our own fd.
    unsafe {
        if libc::fchown(slave.as_raw_fd(), f.uid, f.gid) != 0 || libc::fchmod(slave.as_raw_fd(), f.mode) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The slave's unread output, read out and put back unchanged.
fn capture_output(round: &Round, m: RawFd, packet: bool, real: &libc::termios, pid: i32, fdn: i32) -> Result<Option<Hash>> {
    let io = |what: &str, e| EngineError::io(format!("{what} (pseudo-terminal master, process {pid}, fd {fdn})"), e);
    let slave = open_peer(m, libc::O_RDWR | libc::O_NONBLOCK).ok();
    if let Some(n) = slave.as_ref().and_then(|s| ioctl_int(s.as_raw_fd(), libc::FIONREAD).ok()).filter(|&n| n > 0) {
        tracing::warn!(pid, fd = fdn, "{n} bytes typed into the pseudo-terminal (process {pid}, fd {fdn}) were not read by the slave side yet; a restart of this checkpoint will not have them");
    }
    let mut bytes = Vec::new();
    if let Err(e) = drain(round, m, packet, pid, fdn, &mut bytes) {
        // The round fails: what was read goes back before the program resumes.
        if bytes.is_empty() {
            return Err(e);
        }
        return match slave.as_ref().map(|s| feed(s, &bytes, real)) {
            Some(Ok(())) => Err(e),
            Some(Err(f)) => Err(EngineError::io(format!("{e}; and putting back the {} bytes read meanwhile failed, the program lost them", bytes.len()), f)),
            None => Err(EngineError::Unsupported { pid, what: format!("{e}; and the {} bytes read meanwhile cannot be put back (no slave can be opened)", bytes.len()) }),
        };
    }
    if bytes.is_empty() {
        return Ok(None);
    }
    let Some(slave) = slave else {
        return Err(EngineError::Unsupported { pid, what: format!("the pseudo-terminal at fd {fdn} held {} unread bytes that cannot be put back (no slave can be opened)", bytes.len()) });
    };
    feed(&slave, &bytes, real).map_err(|e| io(&format!("putting back {} bytes in flight", bytes.len()), e))?;
    tracing::debug!(pid, fd = fdn, bytes = bytes.len(), "pseudo-terminal bytes in flight recorded");
    Ok(Some(round.put_blob(&bytes)?))
}

pub fn capture_slave(live: &LiveFd) -> Result<FdKind> {
    use std::os::unix::fs::MetadataExt;
    let rdev = live.meta.rdev();
    let index = (libc::major(rdev) - 136) * 256 + libc::minor(rdev);
    Ok(FdKind::PtySlave { index, path: live.target.to_string() })
}

/// The pseudo-terminals of one restart, made on first use (by old pts
/// number).
pub struct Ptys {
    wanted: HashMap<u32, PtyState>,
    /// Masters made so far: (the fd to hand out once, one kept for slaves).
    made: HashMap<u32, (Option<OwnedFd>, OwnedFd)>,
}

impl Ptys {
    pub fn new(images: &[ProcessImage]) -> Self {
        let wanted = images
            .iter()
            .flat_map(|i| &i.fds)
            .filter_map(|f| match &f.kind {
                FdKind::PtyMaster(s) => Some((s.index, s.clone())),
                _ => None,
            })
            .collect();
        Ptys { wanted, made: HashMap::new() }
    }

    /// The master made for old pts `index`, making it (with its settings
    /// and bytes in flight) on first use.
    fn master(&mut self, store: &Store, generation: u64, index: u32) -> Result<RawFd> {
        let err = |what: String| EngineError::Restore { generation, what: format!("pseudo-terminal (was /dev/pts/{index}): {what}") };
        if let Some((_, kept)) = self.made.get(&index) {
            return Ok(kept.as_raw_fd());
        }
        let st = self.wanted.get(&index).ok_or_else(|| err("internal: no master in the image".into()))?;
        // As the process: the new slave belongs to its fsuid.
        let master = crate::creds::open("/dev/ptmx", libc::O_RDWR | libc::O_NOCTTY, 0).map_err(|e| err(format!("opening /dev/ptmx: {e}")))?;
        let m = master.as_raw_fd();
        let unlock: libc::c_int = 0;
        // SAFETY: TIOCSPTLCK reads one int.
        if unsafe { libc::ioctl(m, libc::TIOCSPTLCK, &unlock) } != 0 {
            return Err(err(format!("unlockpt: {}", std::io::Error::last_os_error())));
        }
        let real = from_image(&st.termios);
        let ws = libc::winsize { ws_row: st.winsize[0], ws_col: st.winsize[1], ws_xpixel: st.winsize[2], ws_ypixel: st.winsize[3] };
        // SAFETY: TIOCSWINSZ reads one winsize.
        if unsafe { libc::ioctl(m, libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(err(format!("TIOCSWINSZ: {}", std::io::Error::last_os_error())));
        }
        let slave = open_peer(m, libc::O_RDWR | libc::O_NONBLOCK).map_err(|e| err(format!("opening the slave: {e}")))?;
        match st.data {
            Some(h) => {
                let bytes = store.read_blob(&h).map_err(|e| EngineError::BadImage { generation, what: format!("the bytes in flight of pseudo-terminal {index} are not readable ({e})") })?;
                feed(&slave, &bytes, &real).map_err(|e| err(format!("writing back {} bytes in flight: {e}", bytes.len())))?;
            }
            None => set_termios(slave.as_raw_fd(), &real).map_err(|e| err(format!("TCSETS: {e}")))?,
        }
        if let Some(f) = &st.slave_file {
            set_slave_file(&slave, f).map_err(|e| err(format!("giving the slave its mode {:o} and owner {}:{}: {e}", f.mode, f.uid, f.gid)))?;
        }
        drop(slave);
        if st.packet {
            let on: libc::c_int = 1;
            // SAFETY: TIOCPKT reads one int.
            if unsafe { libc::ioctl(m, libc::TIOCPKT, &on) } != 0 {
                return Err(err(format!("TIOCPKT (packet mode): {}", std::io::Error::last_os_error())));
            }
        }
        if st.locked {
            let lock: libc::c_int = 1;
            // SAFETY: TIOCSPTLCK reads one int.
            unsafe { libc::ioctl(m, libc::TIOCSPTLCK, &lock) };
        }
        let new = ioctl_int(m, libc::TIOCGPTN).unwrap_or(-1);
        if new != index as i32 {
            tracing::info!("pseudo-terminal /dev/pts/{index} is /dev/pts/{new} after the restart");
        }
        let kept = super::dup(&master)?;
        self.made.insert(index, (Some(master), kept));
        Ok(m)
    }

    /// A new slave fd of the pair that was old pts `index`, for a
    /// controlling terminal; None when its master was not in the image.
    pub fn slave_for_ctty(&mut self, store: &Store, generation: u64, index: u32) -> Result<Option<OwnedFd>> {
        if !self.wanted.contains_key(&index) {
            return Ok(None);
        }
        let m = self.master(store, generation, index)?;
        open_peer(m, libc::O_RDWR).map(Some).map_err(|e| EngineError::Restore { generation, what: format!("opening the slave of pseudo-terminal {index} for a controlling terminal: {e}") })
    }
}

pub fn open(o: &mut super::Opener, pid: i32, f: &FdImage) -> Result<OwnedFd> {
    let generation = o.generation;
    let err = |what: String| EngineError::Restore { generation, what: format!("fd {} of process {pid}: {what}", f.fd) };
    let fd = match &f.kind {
        FdKind::PtyMaster(st) => {
            o.ptys.master(o.store, generation, st.index)?;
            let (first, _) = o.ptys.made.get_mut(&st.index).expect("just made");
            first.take().ok_or_else(|| err(format!("a second open file description of the master of /dev/pts/{} cannot be made", st.index)))?
        }
        FdKind::PtySlave { index, path } => {
            if !o.ptys.wanted.contains_key(index) {
                // The master is outside the computation: the same path.
                tracing::warn!(pid, fd = f.fd, "{path} (fd {} of process {pid}) belongs to a terminal outside the computation; reopened by its path", f.fd);
                let dev = FdImage { kind: FdKind::Device { path: path.clone() }, ..f.clone() };
                return super::file::open(o, pid, &dev);
            }
            let m = o.ptys.master(o.store, generation, *index)?;
            open_peer(m, f.flags & libc::O_ACCMODE).map_err(|e| err(format!("opening the slave of pseudo-terminal {index}: {e}")))?
        }
        other => return Err(err(format!("internal: {other:?} is not a pseudo-terminal"))),
    };
    set_status_flags(&fd, f.flags);
    Ok(fd)
}
