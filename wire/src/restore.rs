//! The restore protocol: `ckpt restart` (the driver, full std Rust) and the
//! freestanding restorer (no libc, nothing mapped but itself).
//!
//! The restorer is a dumb executor. The driver does all the thinking: it
//! reads the restorer's `/proc/PID/maps` once the restorer says it is
//! [`status::READY`], then sends a [`PlanHeader`] followed by `nops`
//! [`Op`]s and a data area, as one buffer of `total_len` bytes. The restorer
//! maps that buffer at [`PLAN_ADDR`] (so the driver can point syscall
//! arguments at structs in the data area) and runs the ops in order.
//!
//! The restorer is started as `ckpt-restorer CTL_FD STATUS_FD`: it reads the
//! plan and barrier answers from `CTL_FD` and writes [`StatusMsg`]s to
//! `STATUS_FD`.
//!
//! Everything the restorer owns lives in the zone
//! `[ZONE_START, ZONE_END)`; an image with a mapping there cannot be
//! restored (the driver says so before starting anything).

use crate::Pod;

/// Start of the restorer's zone; the restorer ELF is linked at this address.
pub const ZONE_START: u64 = 0x2000_0000_0000;
/// End (exclusive) of the restorer's zone.
pub const ZONE_END: u64 = 0x2001_0000_0000;
/// The restorer's own stack (mapped by the restorer before it reads anything).
pub const STACK_ADDR: u64 = 0x2000_1000_0000;
pub const STACK_SIZE: u64 = 256 * 1024;
/// Where the restorer maps the plan buffer.
pub const PLAN_ADDR: u64 = 0x2000_4000_0000;
/// Scratch area the driver may use (temporary homes for the vDSO and vvar
/// while the old address space is torn down, thread stacks, copies).
pub const SCRATCH_ADDR: u64 = 0x2000_8000_0000;

pub const PLAN_MAGIC: u64 = 0x4e41_4c50_5450_4b43; // "CKPTPLAN"
pub const PLAN_VERSION: u32 = 2;

/// Start of the plan buffer. Ops follow at `size_of::<PlanHeader>()`,
/// then the data area.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanHeader {
    pub magic: u64,
    pub version: u32,
    pub nops: u32,
    /// Length of the whole buffer, this header included.
    pub total_len: u64,
    pub _reserved: u64,
}
// SAFETY: repr(C), no padding.
unsafe impl Pod for PlanHeader {}

/// One step of the plan. The meaning of `a` depends on `kind`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Op {
    pub kind: u32,
    /// Syscall number for [`op::SYSCALL`]; for [`op::THREAD`] and
    /// [`op::RESUME`], the index of the [`op::TAIL`] the thread runs last
    /// (0: none).
    pub nr: u32,
    pub a: [u64; 10],
}
// SAFETY: repr(C), u32+u32 then u64s: no padding.
unsafe impl Pod for Op {}

/// Op kinds and their arguments.
pub mod op {
    /// `syscall(nr, a[0..6])`. `a[6]` holds [`super::flags`]; with
    /// `CHECK_EQ` the result must equal `a[7]`, otherwise any result
    /// outside `-4095..=-1` is success. A failure is reported as
    /// [`super::status::ERROR`] and the restorer exits.
    pub const SYSCALL: u32 = 1;
    /// `memcpy(a[0] = dst, a[1] = src, a[2] = len)`.
    pub const COPY: u32 = 2;
    /// Report [`super::status::BARRIER`] with value `a[0]`, then wait for one
    /// byte on the control fd: `b'G'` goes on, anything else (or EOF) exits.
    pub const BARRIER: u32 = 3;
    /// Create a thread of the restored process and resume it:
    /// `a[0]` tid, `a[1]` fs_base, `a[2]` ucontext address, `a[3]`
    /// clear_child_tid, `a[4]` robust list head, `a[5]` robust list length,
    /// `a[6]` rseq area, `a[7]` rseq length (low 32 bits) and signature
    /// (high 32 bits), `a[8]` base and `a[9]` size of a scratch stack for the
    /// thread's first instructions.
    pub const THREAD: u32 = 4;
    /// Resume the calling (main) thread, same arguments as [`THREAD`]
    /// (`a[8]`, `a[9]` unused). Never returns; must be the last op.
    pub const RESUME: u32 = 5;
    /// `a[0]` = n: the next n ops (SYSCALLs only) are a thread's own last
    /// steps (its credentials, its seccomp filters), run by the THREAD or
    /// RESUME op whose `nr` names this op, after its robust list and rseq,
    /// just before `rt_sigreturn`. The main sequence skips them.
    pub const TAIL: u32 = 6;
    /// Wait until every thread created so far has run its tail (so that a
    /// failure there is reported while the status pipe is open).
    pub const JOIN: u32 = 7;
}

/// Flags in `Op::a[6]` of a SYSCALL op.
pub mod flags {
    /// Failure is fine (e.g. `munmap` of something already gone).
    pub const ALLOW_FAIL: u64 = 1;
    /// The result must equal `a[7]` (e.g. `mmap` with `MAP_FIXED`).
    pub const CHECK_EQ: u64 = 2;
    /// The result is a new fd: move it to fd `a[8]` (`dup3` with
    /// `O_CLOEXEC`, then `close` of the first number), so that the driver
    /// knows where it is (the userfaultfd of a lazy restart).
    pub const MOVE_FD: u64 = 4;
}

/// Restorer → driver, 16 bytes each on the status fd.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusMsg {
    pub kind: u32,
    /// Index of the op concerned.
    pub op: u32,
    /// Barrier id, or the failing syscall's raw result (`-errno`).
    pub value: i64,
}
// SAFETY: repr(C), no padding.
unsafe impl Pod for StatusMsg {}

pub mod status {
    /// The restorer runs on its own stack and waits for the plan.
    pub const READY: u32 = 1;
    pub const BARRIER: u32 = 2;
    pub const ERROR: u32 = 3;
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_are_stable() {
        assert_eq!(size_of::<PlanHeader>(), 32);
        assert_eq!(size_of::<Op>(), 88);
        assert_eq!(size_of::<StatusMsg>(), 16);
    }

    #[test]
    fn zone_is_ordered() {
        const { assert!(ZONE_START < STACK_ADDR && STACK_ADDR + STACK_SIZE <= PLAN_ADDR) };
        const { assert!(PLAN_ADDR < SCRATCH_ADDR && SCRATCH_ADDR < ZONE_END) };
    }
}
