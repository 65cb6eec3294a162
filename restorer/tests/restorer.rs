//! Runs the real `ckpt-restorer` binary in a child process, feeds it plans
//! over a pipe and checks its status messages and exit codes.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use ckpt_wire::Pod;
use ckpt_wire::restore::{
    Op, PLAN_ADDR, PLAN_MAGIC, PLAN_VERSION, PlanHeader, SCRATCH_ADDR, StatusMsg, ZONE_END,
    ZONE_START, flags, op, status,
};

const RESTORER: &str = env!("CARGO_BIN_EXE_ckpt-restorer");

/// The data area of test plans starts here (room for ~740 ops before it).
const DATA_OFF: u64 = 0x1_0000;
const DATA_ADDR: u64 = PLAN_ADDR + DATA_OFF;

const SYS_WRITE: u32 = 1;
const SYS_CLOSE: u32 = 3;
const SYS_MMAP: u32 = 9;
const SYS_MUNMAP: u32 = 11;
const SYS_GETPID: u32 = 39;
const SYS_EXIT_GROUP: u32 = 231;

#[derive(Default)]
struct Plan {
    ops: Vec<Op>,
    data: Vec<u8>,
}

impl Plan {
    fn syscall(&mut self, nr: u32, args: &[u64], fl: u64, expect: u64) -> &mut Self {
        let mut a = [0u64; 10];
        a[..args.len()].copy_from_slice(args);
        a[6] = fl;
        a[7] = expect;
        self.ops.push(Op {
            kind: op::SYSCALL,
            nr,
            a,
        });
        self
    }
    fn op(&mut self, kind: u32, args: &[u64]) -> &mut Self {
        let mut a = [0u64; 10];
        a[..args.len()].copy_from_slice(args);
        self.ops.push(Op { kind, nr: 0, a });
        self
    }
    /// Appends bytes to the data area; returns their address in the restorer.
    fn data(&mut self, bytes: &[u8]) -> u64 {
        while !self.data.len().is_multiple_of(64) {
            self.data.push(0);
        }
        let addr = DATA_ADDR + self.data.len() as u64;
        self.data.extend_from_slice(bytes);
        addr
    }
    fn bytes(&self) -> Vec<u8> {
        let ops_len = size_of::<PlanHeader>() + self.ops.len() * size_of::<Op>();
        assert!(ops_len as u64 <= DATA_OFF);
        let total = DATA_OFF as usize + self.data.len();
        let hdr = PlanHeader {
            magic: PLAN_MAGIC,
            version: PLAN_VERSION,
            nops: self.ops.len() as u32,
            total_len: total as u64,
            _reserved: 0,
        };
        let mut v = hdr.as_bytes().to_vec();
        for o in &self.ops {
            v.extend_from_slice(o.as_bytes());
        }
        v.resize(DATA_OFF as usize, 0);
        v.extend_from_slice(&self.data);
        v
    }
}

/// A running restorer with the driver's ends of its two pipes.
struct Restorer {
    child: Child,
    ctl: Option<std::io::PipeWriter>,
    status: std::io::PipeReader,
    /// Status fd number in the child.
    status_fd: u64,
}

fn clear_cloexec(fd: i32) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd we own; async-signal-safe (used after fork).
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Restorer {
    fn spawn() -> Restorer {
        let (ctl_r, ctl_w) = std::io::pipe().unwrap();
        let (st_r, st_w) = std::io::pipe().unwrap();
        let (cr, sw) = (ctl_r.as_raw_fd(), st_w.as_raw_fd());
        let mut cmd = Command::new(RESTORER);
        cmd.arg(cr.to_string()).arg(sw.to_string());
        // SAFETY: the closure only calls fcntl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                clear_cloexec(cr)?;
                clear_cloexec(sw)
            });
        }
        let child = cmd.spawn().unwrap();
        drop(OwnedFd::from(ctl_r));
        drop(OwnedFd::from(st_w));
        let mut r = Restorer {
            child,
            ctl: Some(ctl_w),
            status: st_r,
            status_fd: sw as u64,
        };
        assert_eq!(
            r.msg(),
            Some(StatusMsg {
                kind: status::READY,
                op: 0,
                value: 0
            })
        );
        r
    }

    fn send(&mut self, bytes: &[u8]) {
        self.ctl.as_mut().unwrap().write_all(bytes).unwrap();
    }

    /// Next status message, None at EOF.
    fn msg(&mut self) -> Option<StatusMsg> {
        let mut b = [0u8; 16];
        let mut got = 0;
        while got < b.len() {
            match self.status.read(&mut b[got..]).unwrap() {
                0 => {
                    assert_eq!(got, 0, "partial status message");
                    return None;
                }
                n => got += n,
            }
        }
        StatusMsg::read_from(&b)
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                self.child.kill().unwrap();
                panic!("restorer did not exit");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Reads all remaining status messages, then waits for the exit code.
    fn finish(&mut self) -> (Vec<StatusMsg>, i32) {
        let mut msgs = Vec::new();
        while let Some(m) = self.msg() {
            msgs.push(m);
        }
        let st = self.wait();
        let code = st
            .code()
            .unwrap_or_else(|| panic!("restorer killed by signal {:?}", st.signal()));
        (msgs, code)
    }
}

fn error(op: u32, value: i64) -> StatusMsg {
    StatusMsg {
        kind: status::ERROR,
        op,
        value,
    }
}

const MMAP_RW_FIXED: [u64; 6] = [
    SCRATCH_ADDR,
    0x1000,
    (libc::PROT_READ | libc::PROT_WRITE) as u64,
    (libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
    u64::MAX,
    0,
];

#[test]
fn binary_is_static_and_linked_in_its_zone() {
    let elf = std::fs::read(RESTORER).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(u16::from_le_bytes([elf[16], elf[17]]), 2, "ET_EXEC");
    let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
    let phentsize = u16::from_le_bytes([elf[54], elf[55]]) as usize;
    let phnum = u16::from_le_bytes([elf[56], elf[57]]) as usize;
    let mut loads = 0;
    for i in 0..phnum {
        let ph = &elf[phoff + i * phentsize..];
        let ptype = u32::from_le_bytes(ph[..4].try_into().unwrap());
        assert_ne!(ptype, 3, "PT_INTERP");
        assert_ne!(ptype, 2, "PT_DYNAMIC");
        if ptype == 1 {
            let vaddr = u64::from_le_bytes(ph[16..24].try_into().unwrap());
            let memsz = u64::from_le_bytes(ph[40..48].try_into().unwrap());
            assert!(
                vaddr >= ZONE_START && vaddr + memsz <= ZONE_END,
                "PT_LOAD at {vaddr:#x}"
            );
            loads += 1;
        }
    }
    assert!(loads > 0);
}

#[test]
fn mmap_copy_barrier_then_exit_42() {
    let mut r = Restorer::spawn();
    let marker = StatusMsg {
        kind: 99,
        op: 1234,
        value: 0x5555_aaaa,
    };
    let mut p = Plan::default();
    let src = p.data(marker.as_bytes());
    p.syscall(SYS_MMAP, &MMAP_RW_FIXED, flags::CHECK_EQ, SCRATCH_ADDR)
        .op(op::COPY, &[SCRATCH_ADDR, src, 16])
        .op(op::BARRIER, &[7])
        // The copy landed: the restorer writes it to the status pipe.
        .syscall(
            SYS_WRITE,
            &[r.status_fd, SCRATCH_ADDR, 16],
            flags::CHECK_EQ,
            16,
        )
        .syscall(SYS_EXIT_GROUP, &[42], 0, 0);
    r.send(&p.bytes());
    assert_eq!(
        r.msg(),
        Some(StatusMsg {
            kind: status::BARRIER,
            op: 2,
            value: 7
        })
    );
    r.send(b"G");
    let (msgs, code) = r.finish();
    assert_eq!(msgs, [marker]);
    assert_eq!(code, 42);
}

#[test]
fn failing_syscall_reports_op_and_errno() {
    let mut r = Restorer::spawn();
    let mut p = Plan::default();
    p.syscall(SYS_CLOSE, &[9999], flags::ALLOW_FAIL, 0) // fine
        .syscall(SYS_CLOSE, &[9999], 0, 0) // not fine
        .syscall(SYS_EXIT_GROUP, &[42], 0, 0);
    r.send(&p.bytes());
    assert_eq!(r.finish(), (vec![error(1, -(libc::EBADF as i64))], 126));
}

#[test]
fn check_eq_mismatch_is_a_failure() {
    let mut r = Restorer::spawn();
    let pid = r.child.id() as i64;
    let mut p = Plan::default();
    p.syscall(SYS_GETPID, &[], flags::CHECK_EQ, pid as u64) // matches
        .syscall(SYS_GETPID, &[], flags::CHECK_EQ, 1)
        .syscall(SYS_EXIT_GROUP, &[42], 0, 0);
    r.send(&p.bytes());
    assert_eq!(r.finish(), (vec![error(1, pid)], 126));
}

#[test]
fn barrier_answered_with_anything_but_g_exits_125() {
    let mut r = Restorer::spawn();
    let mut p = Plan::default();
    p.op(op::BARRIER, &[1])
        .op(op::BARRIER, &[2])
        .syscall(SYS_EXIT_GROUP, &[42], 0, 0);
    r.send(&p.bytes());
    assert_eq!(
        r.msg(),
        Some(StatusMsg {
            kind: status::BARRIER,
            op: 0,
            value: 1
        })
    );
    r.send(b"G");
    assert_eq!(
        r.msg(),
        Some(StatusMsg {
            kind: status::BARRIER,
            op: 1,
            value: 2
        })
    );
    r.send(b"X");
    assert_eq!(r.finish(), (vec![], 125));
}

#[test]
fn barrier_eof_exits_125() {
    let mut r = Restorer::spawn();
    let mut p = Plan::default();
    p.op(op::BARRIER, &[5]).syscall(SYS_EXIT_GROUP, &[42], 0, 0);
    r.send(&p.bytes());
    assert_eq!(
        r.msg(),
        Some(StatusMsg {
            kind: status::BARRIER,
            op: 0,
            value: 5
        })
    );
    r.ctl = None;
    assert_eq!(r.finish(), (vec![], 125));
}

#[test]
fn thread_without_scratch_stack_is_refused() {
    let mut r = Restorer::spawn();
    let mut p = Plan::default();
    p.op(op::THREAD, &[0, 0, 0x1000, 0, 0, 0, 0, 0, 0, 0])
        .syscall(SYS_EXIT_GROUP, &[42], 0, 0);
    r.send(&p.bytes());
    assert_eq!(r.finish(), (vec![error(0, -(libc::EINVAL as i64))], 126));
}

#[test]
fn unknown_op_exits_123() {
    let mut r = Restorer::spawn();
    let mut p = Plan::default();
    p.syscall(SYS_GETPID, &[], 0, 0)
        .op(77, &[])
        .syscall(SYS_EXIT_GROUP, &[42], 0, 0);
    r.send(&p.bytes());
    assert_eq!(r.finish(), (vec![error(1, 77)], 123));
}

#[test]
fn bad_magic_is_rejected() {
    let mut r = Restorer::spawn();
    let mut p = Plan::default();
    p.syscall(SYS_EXIT_GROUP, &[42], 0, 0);
    let mut b = p.bytes();
    b[0] ^= 1;
    r.send(&b[..size_of::<PlanHeader>()]);
    assert_eq!(
        r.finish(),
        (vec![error(u32::MAX, -(libc::EINVAL as i64))], 122)
    );
}

#[test]
fn short_plan_is_rejected() {
    let mut r = Restorer::spawn();
    let mut p = Plan::default();
    p.syscall(SYS_EXIT_GROUP, &[42], 0, 0);
    let b = p.bytes();
    r.send(&b[..b.len() - 1]);
    r.ctl = None;
    assert_eq!(
        r.finish(),
        (vec![error(u32::MAX, -(libc::EPIPE as i64))], 122)
    );
}

#[test]
fn plan_without_resume_is_an_error() {
    let mut r = Restorer::spawn();
    let mut p = Plan::default();
    p.syscall(SYS_GETPID, &[], 0, 0);
    r.send(&p.bytes());
    assert_eq!(r.finish(), (vec![error(1, -(libc::EINVAL as i64))], 122));
}

#[test]
fn survives_unmapping_everything_outside_its_zone() {
    let mut r = Restorer::spawn();
    let mut p = Plan::default();
    // Everything the kernel mapped for the program (stack, vDSO, vvar) is
    // outside the zone; on x86-64 user space ends at 0x7fff_ffff_f000.
    p.syscall(SYS_MUNMAP, &[0x1_0000, ZONE_START - 0x1_0000], 0, 0)
        .syscall(SYS_MUNMAP, &[ZONE_END, 0x7fff_ffff_f000 - ZONE_END], 0, 0)
        .op(op::BARRIER, &[9])
        .syscall(SYS_EXIT_GROUP, &[42], 0, 0);
    r.send(&p.bytes());
    assert_eq!(
        r.msg(),
        Some(StatusMsg {
            kind: status::BARRIER,
            op: 2,
            value: 9
        })
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", r.child.id())).unwrap();
    for line in maps.lines() {
        let start = u64::from_str_radix(line.split('-').next().unwrap(), 16).unwrap();
        assert!(
            (ZONE_START..ZONE_END).contains(&start) || line.contains("[vsyscall]"),
            "left outside the zone: {line}"
        );
    }
    r.send(b"G");
    assert_eq!(r.finish(), (vec![], 42));
}

// Code for the THREAD/RESUME test, copied into the restorer's scratch area
// (position independent, no stack use). Registers come from hand-built
// ucontexts: r15 = status fd, r13 = 16-byte output buffer, r12 = rseq area
// (thread) or clear-child-tid word (main), rbx = rseq area (main).
// Each writes [gettid() u32, rseq cpu_id u32, fs:[0] u64] to the status fd.
std::arch::global_asm!(
    ".pushsection .text.ckpt_restorer_test_code,\"ax\",@progbits",
    ".globl ckpt_restorer_test_thread",
    "ckpt_restorer_test_thread:",
    "mov eax, 186", // gettid
    "syscall",
    "mov dword ptr [r13], eax",
    "mov eax, dword ptr [r12 + 4]",
    "mov dword ptr [r13 + 4], eax",
    "mov rax, qword ptr fs:[0]",
    "mov qword ptr [r13 + 8], rax",
    "mov eax, 1", // write
    "mov rdi, r15",
    "mov rsi, r13",
    "mov edx, 16",
    "syscall",
    "mov eax, 60", // exit (this thread only)
    "xor edi, edi",
    "syscall",
    "ud2",
    ".globl ckpt_restorer_test_main",
    "ckpt_restorer_test_main:",
    // Wait until the thread has exited (the kernel clears its tid word).
    "2:",
    "mov eax, dword ptr [r12]",
    "test eax, eax",
    "jz 3f",
    "mov rdi, r12",
    "xor esi, esi", // FUTEX_WAIT
    "mov edx, eax",
    "xor r10d, r10d",
    "mov eax, 202", // futex
    "syscall",
    "jmp 2b",
    "3:",
    "mov eax, 186",
    "syscall",
    "mov dword ptr [r13], eax",
    "mov eax, dword ptr [rbx + 4]",
    "mov dword ptr [r13 + 4], eax",
    "mov rax, qword ptr fs:[0]",
    "mov qword ptr [r13 + 8], rax",
    "mov eax, 1",
    "mov rdi, r15",
    "mov rsi, r13",
    "mov edx, 16",
    "syscall",
    "mov eax, 231", // exit_group(77)
    "mov edi, 77",
    "syscall",
    "ud2",
    ".globl ckpt_restorer_test_end",
    "ckpt_restorer_test_end:",
    ".popsection",
);

unsafe extern "C" {
    static ckpt_restorer_test_thread: u8;
    static ckpt_restorer_test_main: u8;
    static ckpt_restorer_test_end: u8;
}

/// Offsets in the kernel's x86-64 `struct ucontext` (uc_mcontext at 40).
mod uc {
    pub const MCONTEXT: usize = 40;
    pub const R12: usize = MCONTEXT + 4 * 8;
    pub const R13: usize = MCONTEXT + 5 * 8;
    pub const R15: usize = MCONTEXT + 7 * 8;
    pub const RBX: usize = MCONTEXT + 11 * 8;
    pub const RSP: usize = MCONTEXT + 15 * 8;
    pub const RIP: usize = MCONTEXT + 16 * 8;
    pub const CS: usize = MCONTEXT + 18 * 8;
    pub const SS: usize = CS + 6;
    pub const SIGMASK: usize = MCONTEXT + 256;
    pub const SIZE: usize = SIGMASK + 8;
}

fn put(img: &mut [u8], off: usize, bytes: &[u8]) {
    img[off..off + bytes.len()].copy_from_slice(bytes);
}

fn ucontext(rip: u64, rsp: u64, regs: &[(usize, u64)]) -> Vec<u8> {
    let mut u = vec![0u8; uc::SIZE];
    put(&mut u, uc::RIP, &rip.to_le_bytes());
    put(&mut u, uc::RSP, &rsp.to_le_bytes());
    put(&mut u, uc::CS, &0x33u16.to_le_bytes()); // __USER_CS
    put(&mut u, uc::SS, &0x2bu16.to_le_bytes()); // __USER_DS
    for &(off, v) in regs {
        put(&mut u, off, &v.to_le_bytes());
    }
    u
}

/// A tid nobody uses right now (racy, but pid_max is large and we look high).
fn free_tid() -> u64 {
    let max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (max / 2..max - 1)
        .rev()
        .find(|t| !std::path::Path::new(&format!("/proc/{t}")).exists())
        .unwrap()
}

#[test]
fn thread_and_resume_enter_hand_built_contexts() {
    // Scratch layout.
    const S: u64 = SCRATCH_ADDR;
    const LEN: usize = 0x8000;
    const MAIN_UC: u64 = 0x1000;
    const THREAD_UC: u64 = 0x1400;
    const CLEAR_TID: u64 = 0x2000;
    const MAIN_TID_ADDR: u64 = 0x2040;
    const THREAD_FS: u64 = 0x2100;
    const MAIN_FS: u64 = 0x2200;
    const THREAD_OUT: u64 = 0x2300;
    const MAIN_OUT: u64 = 0x2400;
    const THREAD_ROBUST: u64 = 0x2500;
    const MAIN_ROBUST: u64 = 0x2520;
    const THREAD_RSEQ: u64 = 0x2540;
    const MAIN_RSEQ: u64 = 0x2580;
    const THREAD_STACK: u64 = 0x3000; // scratch stack for the restorer's part
    const RSEQ_SIG: u64 = 0x5305_3053;
    const THREAD_FS_MAGIC: u64 = 0x1111_2222_3333_4444;
    const MAIN_FS_MAGIC: u64 = 0x5555_6666_7777_8888;

    // SAFETY: the three symbols are labels in the global_asm above, in order.
    let code = unsafe {
        let start = &raw const ckpt_restorer_test_thread;
        let main = &raw const ckpt_restorer_test_main;
        let end = &raw const ckpt_restorer_test_end;
        let all = std::slice::from_raw_parts(start, end.offset_from(start) as usize);
        (all.to_vec(), main.offset_from(start) as u64)
    };

    let mut r = Restorer::spawn();
    let pid = r.child.id() as u64;
    let tid = free_tid();
    let fd = r.status_fd;

    let mut img = vec![0u8; LEN];
    put(&mut img, 0, &code.0);
    put(&mut img, CLEAR_TID as usize, &1u32.to_le_bytes());
    put(&mut img, THREAD_FS as usize, &THREAD_FS_MAGIC.to_le_bytes());
    put(&mut img, MAIN_FS as usize, &MAIN_FS_MAGIC.to_le_bytes());
    for head in [THREAD_ROBUST, MAIN_ROBUST] {
        // Empty robust list: head.next = &head.
        put(&mut img, head as usize, &(S + head).to_le_bytes());
    }
    for rseq in [THREAD_RSEQ, MAIN_RSEQ] {
        put(&mut img, rseq as usize + 4, &u32::MAX.to_le_bytes()); // cpu_id uninitialised
    }
    let t_uc = ucontext(
        S,
        S + 0x6000,
        &[
            (uc::R15, fd),
            (uc::R13, S + THREAD_OUT),
            (uc::R12, S + THREAD_RSEQ),
        ],
    );
    put(&mut img, THREAD_UC as usize, &t_uc);
    let m_uc = ucontext(
        S + code.1,
        S + 0x7000,
        &[
            (uc::R15, fd),
            (uc::R13, S + MAIN_OUT),
            (uc::R12, S + CLEAR_TID),
            (uc::RBX, S + MAIN_RSEQ),
        ],
    );
    put(&mut img, MAIN_UC as usize, &m_uc);

    let mut p = Plan::default();
    let src = p.data(&img);
    let mut rwx = MMAP_RW_FIXED;
    rwx[1] = LEN as u64;
    rwx[2] |= libc::PROT_EXEC as u64;
    let rseq_arg = (RSEQ_SIG << 32) | 32;
    p.syscall(SYS_MMAP, &rwx, flags::CHECK_EQ, S)
        .op(op::COPY, &[S, src, LEN as u64])
        .op(
            op::THREAD,
            &[
                tid,
                S + THREAD_FS,
                S + THREAD_UC,
                S + CLEAR_TID,
                S + THREAD_ROBUST,
                24,
                S + THREAD_RSEQ,
                rseq_arg,
                S + THREAD_STACK,
                0x1000,
            ],
        )
        .op(
            op::RESUME,
            &[
                pid,
                S + MAIN_FS,
                S + MAIN_UC,
                S + MAIN_TID_ADDR,
                S + MAIN_ROBUST,
                24,
                S + MAIN_RSEQ,
                rseq_arg,
            ],
        );
    r.send(&p.bytes());

    let (msgs, code) = r.finish();
    if msgs.first() == Some(&error(2, -(libc::EPERM as i64))) {
        eprintln!("skipping: clone3 with set_tid needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN");
        return;
    }
    // Each "message" is the 16 bytes [tid, rseq cpu_id, fs:[0]] a context wrote.
    let decode = |m: &StatusMsg| (m.kind as u64, m.op, m.value as u64);
    assert_eq!(msgs.len(), 2, "{msgs:?}, exit {code}");
    let (t_tid, t_cpu, t_fs) = decode(&msgs[0]);
    let (m_tid, m_cpu, m_fs) = decode(&msgs[1]);
    assert_eq!((t_tid, t_fs), (tid, THREAD_FS_MAGIC), "thread context");
    assert_eq!((m_tid, m_fs), (pid, MAIN_FS_MAGIC), "main context");
    assert_ne!(t_cpu, u32::MAX, "thread's rseq area is registered");
    assert_ne!(m_cpu, u32::MAX, "main rseq area is registered");
    assert_eq!(code, 77);
}
