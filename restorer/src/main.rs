//! `ckpt-restorer`: the freestanding program that turns a fresh process into
//! the process being restored.
//!
//! `ckpt restart` (the driver) starts it as `ckpt-restorer CTL_FD STATUS_FD`
//! in a process that already has the right PID. The restorer moves onto its
//! own stack, says [`status::READY`], reads a plan (a [`PlanHeader`], `nops`
//! [`Op`]s and a data area) from `CTL_FD` into [`PLAN_ADDR`], and executes the
//! ops in order: raw syscalls (unmap the old address space, map and fill the
//! image's regions, move the vDSO, `PR_SET_MM_MAP`, …), copies, barriers with
//! the driver, thread creation and finally the jump into the saved context of
//! the restored main thread. The protocol is defined in
//! [`ckpt_wire::restore`]; this program is a dumb executor of it.
//!
//! What it must never do:
//!
//! * use libc or any library that assumes one (it is `no_std`, `no_main`,
//!   linked static with `-nostdlib`): the address space it runs in is being
//!   torn down and rebuilt underneath it;
//! * allocate (there is no allocator), take a lock, or do anything that is not
//!   async-signal-safe: threads of the restored process may start running
//!   while it still executes;
//! * assume anything is mapped outside its zone
//!   `[ZONE_START, ZONE_END)`: not the kernel-provided stack, not the vDSO,
//!   not the argv strings once the plan has started. Its code and data are
//!   linked at [`ZONE_START`], its stack is at [`STACK_ADDR`], the plan at
//!   [`PLAN_ADDR`].
//!
//! Exit codes (when it cannot report anything better, and after an
//! [`status::ERROR`] message when it can): see [`exit`].
#![no_std]
#![no_main]

mod mem;
mod sys;

use core::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use ckpt_wire::Pod;
use ckpt_wire::restore::{
    Op, PLAN_ADDR, PLAN_MAGIC, PLAN_VERSION, PlanHeader, SCRATCH_ADDR, STACK_ADDR, STACK_SIZE,
    StatusMsg, ZONE_END, ZONE_START, flags, op, status,
};

// build.rs links the binary at this address.
const _: () = assert!(ZONE_START == 0x2000_0000_0000);
const _: () = assert!(STACK_ADDR + STACK_SIZE <= ZONE_END && STACK_SIZE.is_multiple_of(16));

/// Exit codes of the restorer.
pub mod exit {
    /// A Rust panic (should not happen: the code is written not to panic).
    pub const PANIC: i32 = 127;
    /// A SYSCALL op (or a THREAD op's `clone3`) failed; an ERROR message
    /// with the op index and the raw result was sent.
    pub const SYSCALL_FAILED: i32 = 126;
    /// A barrier was answered with something other than `b'G'`, or EOF.
    pub const BARRIER_ABORT: i32 = 125;
    /// Setting up a thread's state (robust list, rseq, fs base) failed in a
    /// THREAD child or in RESUME; an ERROR message was sent.
    pub const THREAD_SETUP_FAILED: i32 = 124;
    /// Unknown op kind; an ERROR message with value `kind` was sent.
    pub const UNKNOWN_OP: i32 = 123;
    /// Bad command line, bad plan header, short plan, status pipe broken, or
    /// the plan ended without RESUME. An ERROR message with op `u32::MAX`
    /// (or `nops` for a missing RESUME) is sent when possible.
    pub const BAD_PLAN: i32 = 122;
}

/// Status fd, also needed by THREAD children to report failures.
static STATUS_FD: AtomicI32 = AtomicI32::new(-1);
/// Threads created whose tail has not finished yet (see [`op::JOIN`]).
static PENDING: AtomicU32 = AtomicU32::new(0);

const HEADER_LEN: u64 = core::mem::size_of::<PlanHeader>() as u64;
const OP_LEN: u64 = core::mem::size_of::<Op>() as u64;
const OPS_ADDR: u64 = PLAN_ADDR + HEADER_LEN;
const PAGE: u64 = 4096;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    sys::exit_group(exit::PANIC)
}

/// The prebuilt libcore carries unwind tables that name this symbol. With
/// `panic = "abort"` nothing ever unwinds, so nothing ever calls it.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

/// Called by `_start` (in [`sys`]) on the kernel's stack with a pointer to
/// `argc`. Parses the fds, maps the restorer's own stack and moves onto it.
///
/// # Safety
/// `sp` must be the kernel's initial stack pointer (argc, argv…).
pub(crate) unsafe extern "C" fn start_rust(sp: *const u64) -> ! {
    // SAFETY: per the contract the initial stack holds argc, then argc argv
    // pointers and a NULL; we read argv[1] and argv[2] only when argc >= 3.
    let (ctl, st) = unsafe {
        let argc = *sp;
        if argc < 3 {
            sys::exit_group(exit::BAD_PLAN);
        }
        (
            parse_fd(*sp.add(2) as *const u8),
            parse_fd(*sp.add(3) as *const u8),
        )
    };
    let (Some(ctl), Some(st)) = (ctl, st) else {
        sys::exit_group(exit::BAD_PLAN)
    };
    // SAFETY: STACK_ADDR..+STACK_SIZE is inside our zone and unused so far.
    let r = unsafe { sys::mmap_anon_fixed(STACK_ADDR, STACK_SIZE) };
    if r as u64 != STACK_ADDR {
        sys::exit_group(exit::BAD_PLAN);
    }
    // SAFETY: freshly mapped, 16-byte aligned top; `run` never returns.
    unsafe { sys::switch_stack(STACK_ADDR + STACK_SIZE, run, ctl, st) }
}

/// Parses a non-negative decimal fd from a NUL-terminated string.
///
/// # Safety
/// `s` must point at a NUL-terminated string.
unsafe fn parse_fd(s: *const u8) -> Option<i32> {
    let mut v: i64 = 0;
    let mut i = 0;
    loop {
        // SAFETY: the string is NUL-terminated and we stop at the NUL.
        let c = unsafe { *s.add(i) };
        if c == 0 {
            break;
        }
        if !c.is_ascii_digit() || i >= 9 {
            return None;
        }
        v = v * 10 + (c - b'0') as i64;
        i += 1;
    }
    if i == 0 { None } else { Some(v as i32) }
}

/// Writes one status message; false if the status pipe is broken.
fn send(kind: u32, op: u32, value: i64) -> bool {
    let msg = StatusMsg { kind, op, value };
    let bytes = msg.as_bytes();
    let fd = STATUS_FD.load(Ordering::Relaxed);
    let mut done = 0;
    while done < bytes.len() {
        let r = sys::write(fd, &bytes[done..]);
        if r == -sys::EINTR {
            continue;
        }
        if r <= 0 {
            return false;
        }
        done += r as usize;
    }
    true
}

/// Reports an error for op `op` and exits with `code`.
fn fail(op: u32, value: i64, code: i32) -> ! {
    let _ = send(status::ERROR, op, value);
    sys::exit_group(code)
}

/// Reads exactly `len` bytes; `Err(raw result)` on error, `Err(0)` on EOF.
///
/// # Safety
/// `buf..buf+len` must be writable memory the caller owns.
unsafe fn read_exact(fd: i32, buf: *mut u8, len: u64) -> Result<(), i64> {
    let mut done = 0u64;
    while done < len {
        // SAFETY: within the caller's buffer.
        let r = unsafe { sys::read(fd, buf.add(done as usize), (len - done) as usize) };
        if r == -sys::EINTR {
            continue;
        }
        if r <= 0 {
            return Err(r);
        }
        done += r as u64;
    }
    Ok(())
}

/// Main body, on the restorer's own stack.
extern "C" fn run(ctl: i32, st: i32) -> ! {
    STATUS_FD.store(st, Ordering::Relaxed);
    if !send(status::READY, 0, 0) {
        sys::exit_group(exit::BAD_PLAN);
    }
    let nops = load_plan(ctl);
    let mut i = 0;
    while i < nops {
        // SAFETY: load_plan checked that all `nops` ops lie inside the
        // mapped plan; OPS_ADDR is 8-aligned and so is OP_LEN.
        let o = unsafe { ((OPS_ADDR + i as u64 * OP_LEN) as *const Op).read() };
        if o.kind == op::TAIL {
            // A thread's tail: run by that thread, skipped here.
            if o.a[0] >= (nops - i) as u64 {
                fail(i, -sys::EINVAL, exit::BAD_PLAN);
            }
            i += 1 + o.a[0] as u32;
            continue;
        }
        execute(ctl, i, &o);
        i += 1;
    }
    fail(nops, -sys::EINVAL, exit::BAD_PLAN)
}

/// Reads and maps the plan at PLAN_ADDR; returns `nops`.
fn load_plan(ctl: i32) -> u32 {
    let bad = |v: i64| -> ! { fail(u32::MAX, v, exit::BAD_PLAN) };
    let mut hdr = PlanHeader::zeroed();
    // SAFETY: `hdr` is a local PlanHeader of HEADER_LEN bytes; every bit
    // pattern is valid for it (Pod).
    if let Err(e) = unsafe { read_exact(ctl, &mut hdr as *mut PlanHeader as *mut u8, HEADER_LEN) } {
        bad(if e == 0 { -sys::EPIPE } else { e });
    }
    if hdr.magic != PLAN_MAGIC || hdr.version != PLAN_VERSION {
        bad(-sys::EINVAL);
    }
    let ops_end = HEADER_LEN + hdr.nops as u64 * OP_LEN;
    if hdr.total_len < ops_end || hdr.total_len > SCRATCH_ADDR - PLAN_ADDR {
        bad(-sys::EINVAL);
    }
    let map_len = (hdr.total_len + PAGE - 1) & !(PAGE - 1);
    // SAFETY: PLAN_ADDR..+map_len is inside the zone (checked against
    // SCRATCH_ADDR above) and not used by the restorer's image or stack.
    let r = unsafe { sys::mmap_anon_fixed(PLAN_ADDR, map_len) };
    if r as u64 != PLAN_ADDR {
        bad(r);
    }
    // SAFETY: the plan mapping is at least total_len >= HEADER_LEN bytes,
    // writable, and PLAN_ADDR is page-aligned.
    unsafe { (PLAN_ADDR as *mut PlanHeader).write(hdr) };
    // SAFETY: PLAN_ADDR+HEADER_LEN..PLAN_ADDR+total_len lies in the mapping.
    if let Err(e) = unsafe {
        read_exact(
            ctl,
            (PLAN_ADDR + HEADER_LEN) as *mut u8,
            hdr.total_len - HEADER_LEN,
        )
    } {
        bad(if e == 0 { -sys::EPIPE } else { e });
    }
    hdr.nops
}

/// Executes op number `i`.
fn execute(ctl: i32, i: u32, o: &Op) {
    let a = &o.a;
    match o.kind {
        op::SYSCALL => {
            // SAFETY: the plan is trusted to describe syscalls that rebuild
            // the restored process without touching the restorer's zone.
            let r = unsafe { sys::syscall6(o.nr as u64, a[0], a[1], a[2], a[3], a[4], a[5]) };
            let ok = if a[6] & flags::CHECK_EQ != 0 {
                r as u64 == a[7]
            } else {
                !sys::is_err(r)
            };
            if !ok && a[6] & flags::ALLOW_FAIL == 0 {
                fail(i, r, exit::SYSCALL_FAILED);
            }
            if ok && a[6] & flags::MOVE_FD != 0 && r as u64 != a[8] {
                // SAFETY: dup3 and close of the fd this syscall just made.
                let d = unsafe { sys::syscall6(sys::SYS_DUP3, r as u64, a[8], sys::O_CLOEXEC, 0, 0, 0) };
                // SAFETY: as above.
                unsafe { sys::syscall6(sys::SYS_CLOSE, r as u64, 0, 0, 0, 0, 0) };
                if sys::is_err(d) && a[6] & flags::ALLOW_FAIL == 0 {
                    fail(i, d, exit::SYSCALL_FAILED);
                }
            }
        }
        op::COPY => {
            // SAFETY: the plan vouches that both ranges are mapped
            // (memmove semantics, so overlap is harmless).
            unsafe { mem::memmove(a[0] as *mut u8, a[1] as *const u8, a[2] as usize) };
        }
        op::BARRIER => {
            if !send(status::BARRIER, i, a[0] as i64) {
                sys::exit_group(exit::BARRIER_ABORT);
            }
            let mut answer = 0u8;
            // SAFETY: one byte into a local.
            let r = unsafe { read_exact(ctl, &mut answer, 1) };
            if r.is_err() || answer != b'G' {
                sys::exit_group(exit::BARRIER_ABORT);
            }
        }
        op::THREAD => {
            // Without a stack of its own the child would run on ours.
            PENDING.fetch_add(1, Ordering::AcqRel);
            let r = if a[8] == 0 || a[9] == 0 {
                -sys::EINVAL
            } else {
                spawn_thread(i)
            };
            if sys::is_err(r) {
                fail(i, r, exit::SYSCALL_FAILED);
            }
        }
        op::JOIN => {
            while PENDING.load(Ordering::Acquire) != 0 {
                // SAFETY: sched_yield takes no arguments.
                unsafe { sys::syscall6(sys::SYS_SCHED_YIELD, 0, 0, 0, 0, 0, 0) };
            }
        }
        op::RESUME => {
            // SAFETY: ARCH_SET_FS takes no pointer the kernel dereferences.
            let r =
                unsafe { sys::syscall6(sys::SYS_ARCH_PRCTL, sys::ARCH_SET_FS, a[1], 0, 0, 0, 0) };
            if sys::is_err(r) {
                fail(i, r, exit::THREAD_SETUP_FAILED);
            }
            // SAFETY: the kernel only stores the address (used at exit).
            unsafe { sys::syscall6(sys::SYS_SET_TID_ADDRESS, a[3], 0, 0, 0, 0, 0) };
            become_thread(i, o.nr, a, false)
        }
        kind => fail(i, kind as i64, exit::UNKNOWN_OP),
    }
}

/// THREAD op `i`: `clone3` a thread of the restored process. Returns the raw
/// `clone3` result in the parent.
///
/// `a[0] == 0` (not a valid tid) lets the kernel pick the tid instead of
/// asking for it with `set_tid`. The scratch stack `a[8]`, `a[9]` must be
/// non-empty (checked by the caller); the restorer's code uses well under
/// 1 KiB of it before `rt_sigreturn` leaves it for good.
fn spawn_thread(i: u32) -> i64 {
    let op_addr = OPS_ADDR + i as u64 * OP_LEN;
    // SAFETY: op `i` is inside the mapped plan (checked by load_plan).
    let a = unsafe { (*(op_addr as *const Op)).a };
    // clone3's set_tid is an array of pid_t.
    let tid: [i32; 1] = [a[0] as i32];
    let mut args = sys::CloneArgs {
        flags: sys::THREAD_CLONE_FLAGS,
        tls: a[1],
        stack: a[8],
        stack_size: a[9],
        ..Default::default()
    };
    if a[0] != 0 {
        args.set_tid = tid.as_ptr() as u64;
        args.set_tid_size = 1;
    }
    if a[3] != 0 {
        args.flags |= sys::CLONE_CHILD_CLEARTID;
        args.child_tid = a[3];
    }
    // SAFETY: a thread sharing our VM on the scratch stack the plan gives;
    // the child runs `thread_child(op_addr)` which never returns and reads
    // only the (unchanging) op in the plan.
    unsafe { sys::clone3_thread(&args, thread_child, op_addr) }
}

/// First Rust code of a THREAD child, on the op's scratch stack.
extern "C" fn thread_child(op_addr: u64) -> ! {
    // SAFETY: the parent passed the address of a mapped op of the plan.
    let a = unsafe { (*(op_addr as *const Op)).a };
    let i = ((op_addr - OPS_ADDR) / OP_LEN) as u32;
    // SAFETY: as above.
    let tail = unsafe { (*(op_addr as *const Op)).nr };
    become_thread(i, tail, &a, true)
}

/// Runs the tail whose TAIL op is at index `t` (0: none): SYSCALL ops only.
fn run_tail(i: u32, t: u32) {
    if t == 0 {
        return;
    }
    // SAFETY: PLAN_ADDR holds the header load_plan checked.
    let nops = unsafe { (*(PLAN_ADDR as *const PlanHeader)).nops };
    if t >= nops {
        fail(i, -sys::EINVAL, exit::BAD_PLAN);
    }
    // SAFETY: op `t` is inside the mapped plan (t < nops).
    let head = unsafe { ((OPS_ADDR + t as u64 * OP_LEN) as *const Op).read() };
    if head.kind != op::TAIL || head.a[0] >= (nops - t) as u64 {
        fail(i, -sys::EINVAL, exit::BAD_PLAN);
    }
    for k in t + 1..=t + head.a[0] as u32 {
        // SAFETY: k < nops, checked above.
        let o = unsafe { ((OPS_ADDR + k as u64 * OP_LEN) as *const Op).read() };
        if o.kind != op::SYSCALL {
            fail(k, -sys::EINVAL, exit::BAD_PLAN);
        }
        // The control fd is not read by SYSCALL ops.
        execute(-1, k, &o);
    }
}

/// Common tail of THREAD children and RESUME: robust list, rseq, the
/// thread's own tail (credentials, then seccomp filters: after those only
/// `rt_sigreturn`), then `rt_sigreturn` into the saved context.
fn become_thread(i: u32, tail: u32, a: &[u64; 10], child: bool) -> ! {
    if a[4] != 0 {
        // SAFETY: the kernel only records the address (used at exit).
        let r = unsafe { sys::syscall6(sys::SYS_SET_ROBUST_LIST, a[4], a[5], 0, 0, 0, 0) };
        if sys::is_err(r) {
            fail(i, r, exit::THREAD_SETUP_FAILED);
        }
    }
    if a[6] != 0 {
        // SAFETY: the plan vouches that the rseq area is mapped in the
        // restored image (the kernel writes cpu ids into it).
        let r =
            unsafe { sys::syscall6(sys::SYS_RSEQ, a[6], a[7] & 0xffff_ffff, 0, a[7] >> 32, 0, 0) };
        if sys::is_err(r) {
            fail(i, r, exit::THREAD_SETUP_FAILED);
        }
    }
    run_tail(i, tail);
    if child {
        PENDING.fetch_sub(1, Ordering::AcqRel);
    }
    // SAFETY: a[2] is the ucontext of the thread's saved signal frame.
    unsafe { sys::sigreturn(a[2]) }
}
