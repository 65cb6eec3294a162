//! Everything x86-64 and Linux-specific: syscall numbers, uapi constants,
//! the raw `syscall` instruction, and the few sequences that must be written
//! in assembly (entry, stack switch, thread creation, `rt_sigreturn`).
//!
//! Nothing here touches memory outside the restorer's zone except through
//! the addresses the plan supplies.

use core::arch::{asm, naked_asm};

// Syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl).
pub const SYS_READ: u64 = 0;
pub const SYS_WRITE: u64 = 1;
pub const SYS_MMAP: u64 = 9;
pub const SYS_RT_SIGRETURN: u64 = 15;
pub const SYS_ARCH_PRCTL: u64 = 158;
pub const SYS_SET_TID_ADDRESS: u64 = 218;
pub const SYS_SCHED_YIELD: u64 = 24;
pub const SYS_EXIT_GROUP: u64 = 231;
pub const SYS_SET_ROBUST_LIST: u64 = 273;
pub const SYS_RSEQ: u64 = 334;
pub const SYS_CLONE3: u64 = 435;
pub const SYS_CLOSE: u64 = 3;
pub const SYS_DUP3: u64 = 292;
pub const O_CLOEXEC: u64 = 0o2000000;

// mmap.
pub const PROT_READ: u64 = 0x1;
pub const PROT_WRITE: u64 = 0x2;
pub const MAP_PRIVATE: u64 = 0x02;
pub const MAP_FIXED: u64 = 0x10;
pub const MAP_ANONYMOUS: u64 = 0x20;

// arch_prctl.
pub const ARCH_SET_FS: u64 = 0x1002;

// errno values the restorer reports itself.
pub const EINTR: i64 = 4;
pub const EINVAL: i64 = 22;
pub const EPIPE: i64 = 32;

// clone flags (include/uapi/linux/sched.h).
pub const CLONE_VM: u64 = 0x0000_0100;
pub const CLONE_FS: u64 = 0x0000_0200;
pub const CLONE_FILES: u64 = 0x0000_0400;
pub const CLONE_SIGHAND: u64 = 0x0000_0800;
pub const CLONE_THREAD: u64 = 0x0001_0000;
pub const CLONE_SYSVSEM: u64 = 0x0004_0000;
pub const CLONE_SETTLS: u64 = 0x0008_0000;
pub const CLONE_CHILD_CLEARTID: u64 = 0x0020_0000;

/// Flags of a thread of the restored process (what glibc's `pthread_create`
/// uses, minus the parent/child tid bookkeeping the plan decides on).
pub const THREAD_CLONE_FLAGS: u64 =
    CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM | CLONE_SETTLS;

/// `struct clone_args` (include/uapi/linux/sched.h), `CLONE_ARGS_SIZE_VER2`.
#[repr(C)]
#[derive(Default)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    /// Lowest address of the child's stack; the kernel starts the child at
    /// `stack + stack_size`.
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// Whether a raw syscall result is an error (`-4095..=-1`).
#[inline(always)]
pub fn is_err(ret: i64) -> bool {
    (-4095..=-1).contains(&ret)
}

/// Raw six-argument syscall.
///
/// # Safety
/// The syscall may do anything to the address space; the caller vouches for
/// the arguments (in the restorer: the plan does).
#[inline(always)]
pub unsafe fn syscall6(nr: u64, a0: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64) -> i64 {
    let ret: i64;
    // SAFETY: the `syscall` instruction clobbers only rax, rcx and r11 (and
    // memory, which is not marked `nomem`); the caller is responsible for
    // what the syscall itself does.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as i64 => ret,
            in("rdi") a0,
            in("rsi") a1,
            in("rdx") a2,
            in("r10") a3,
            in("r8") a4,
            in("r9") a5,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// `read(2)`.
///
/// # Safety
/// `buf..buf+len` must be writable memory the caller owns.
#[inline(always)]
pub unsafe fn read(fd: i32, buf: *mut u8, len: usize) -> i64 {
    // SAFETY: forwarded to the caller.
    unsafe { syscall6(SYS_READ, fd as u64, buf as u64, len as u64, 0, 0, 0) }
}

/// `write(2)`.
pub fn write(fd: i32, buf: &[u8]) -> i64 {
    // SAFETY: `write` only reads `buf`, which is a valid slice.
    unsafe {
        syscall6(
            SYS_WRITE,
            fd as u64,
            buf.as_ptr() as u64,
            buf.len() as u64,
            0,
            0,
            0,
        )
    }
}

/// Anonymous private `mmap` at a fixed address in the restorer's zone.
///
/// # Safety
/// Replaces whatever is mapped at `addr..addr+len`: only call it on parts of
/// the zone the restorer does not use yet.
pub unsafe fn mmap_anon_fixed(addr: u64, len: u64) -> i64 {
    // SAFETY: forwarded to the caller.
    unsafe {
        syscall6(
            SYS_MMAP,
            addr,
            len,
            PROT_READ | PROT_WRITE,
            MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS,
            u64::MAX, // fd -1
            0,
        )
    }
}

/// `exit_group(2)`.
pub fn exit_group(code: i32) -> ! {
    loop {
        // SAFETY: exit_group takes no pointers and does not return.
        unsafe { syscall6(SYS_EXIT_GROUP, code as u64, 0, 0, 0, 0, 0) };
    }
}

/// Process entry point. The kernel leaves `rsp` pointing at `argc`,
/// followed by the `argv` pointers; pass that pointer to
/// [`crate::start_rust`] on an aligned stack. `rbp` is cleared to end
/// frame-pointer chains.
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn _start() -> ! {
    naked_asm!(
        "xor ebp, ebp",
        "mov rdi, rsp",
        "and rsp, -16",
        "call {entry}",
        "ud2",
        entry = sym crate::start_rust,
    )
}

/// Switches `rsp` to `stack_top` (must be 16-byte aligned) and calls
/// `f(a0, a1)` there. Never returns.
///
/// # Safety
/// `stack_top` must be the top of a mapped, writable stack that nothing else
/// uses.
pub unsafe fn switch_stack(stack_top: u64, f: extern "C" fn(i32, i32) -> !, a0: i32, a1: i32) -> ! {
    // SAFETY: the caller guarantees the new stack; `f` never returns, so the
    // old stack is never used again. `call` leaves rsp ≡ 8 (mod 16) at
    // `f`'s entry, as the ABI requires.
    unsafe {
        asm!(
            "mov rsp, {top}",
            "xor ebp, ebp",
            "call {f}",
            "ud2",
            top = in(reg) stack_top,
            f = in(reg) f,
            in("edi") a0,
            in("esi") a1,
            options(noreturn),
        )
    }
}

/// `clone3` for a thread of the restored process.
///
/// In the parent, returns the raw result (the new tid or `-errno`). The
/// child starts on the stack described by `args`, never comes back into the
/// Rust frames of this function, and calls `child(arg)` on a 16-byte aligned
/// stack; `child` must never return.
///
/// # Safety
/// `args` must describe a valid thread (`CLONE_VM | CLONE_THREAD` …, a
/// mapped stack that nothing else uses); `arg` must stay valid for the child.
pub unsafe fn clone3_thread(args: &CloneArgs, child: extern "C" fn(u64) -> !, arg: u64) -> i64 {
    let ret: i64;
    // SAFETY: the parent side behaves like a plain syscall (rax, rcx, r11
    // clobbered). The child side runs only on its own stack and keeps `arg`
    // and `child` in callee-saved registers the kernel copies to the child
    // (r12, r13); it then calls `child`, which never returns, so no Rust
    // frame of the parent is ever used by the child.
    unsafe {
        asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            // Child: fresh stack, nothing to return to.
            "xor ebp, ebp",
            "and rsp, -16",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") SYS_CLONE3 as i64 => ret,
            in("rdi") args as *const CloneArgs as u64,
            in("rsi") core::mem::size_of::<CloneArgs>() as u64,
            in("r12") arg,
            in("r13") child,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// `rt_sigreturn` with `rsp` at `ucontext` (what an `SA_SIGINFO` handler
/// gets as its third argument): the kernel reads the `rt_sigframe` at
/// `rsp - 8`, i.e. the ucontext at `rsp`, and restores every register, the
/// signal mask and the FPU state from it.
///
/// # Safety
/// `ucontext` must point at a valid, mapped signal frame of the restored
/// process. On success the calling thread continues wherever the frame says;
/// on a bad frame the kernel kills the process with SIGSEGV.
pub unsafe fn sigreturn(ucontext: u64) -> ! {
    // SAFETY: forwarded to the caller; nothing after the syscall runs.
    unsafe {
        asm!(
            "mov rsp, {uc}",
            "mov eax, {nr}",
            "syscall",
            "ud2",
            uc = in(reg) ucontext,
            nr = const SYS_RT_SIGRETURN,
            options(noreturn),
        )
    }
}
