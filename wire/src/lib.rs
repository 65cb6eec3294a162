//! Fixed-layout (`#[repr(C)]`, little-endian, x86-64) messages exchanged by
//! the processes of ckpt that cannot share a serializer:
//!
//! * [`agent`]: the in-process agent (`libckpt_preload.so`) and the
//!   coordinator, over a stream socket;
//! * [`restore`]: the restart driver (`ckpt restart`) and the freestanding
//!   restorer, over two pipes, plus the address-space zone the restorer owns;
//! * [`uapi`]: kernel constants and structs libc lacks (userfaultfd
//!   write-protect, `PAGEMAP_SCAN`), used by the agent and the engine.
//!
//! Both ends of each protocol include this crate, so a layout change breaks
//! the build instead of the restart.
//!
//! This crate is `no_std`, allocates nothing and has no dependencies: it is
//! linked into code that runs inside the user's process and into code that
//! runs with nothing mapped. It must never grow logic beyond plain data and
//! byte views of it.
#![no_std]

pub mod agent;
pub mod restore;
pub mod uapi;

/// Marker for plain-old-data types whose every bit pattern is valid and that
/// have no padding the compiler may leave uninitialised.
///
/// # Safety
/// Implement only for `#[repr(C)]` structs made of integers (and arrays of
/// them) with explicit padding fields.
pub unsafe trait Pod: Copy + 'static {
    /// The value's bytes.
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: `Self: Pod` is repr(C) with no implicit padding, so every
        // byte of the value is initialised.
        unsafe { core::slice::from_raw_parts(self as *const Self as *const u8, core::mem::size_of::<Self>()) }
    }

    /// Reads a value from the start of `bytes`, if there are enough of them.
    fn read_from(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < core::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: length checked; every bit pattern is a valid `Self`;
        // `read_unaligned` has no alignment requirement.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr() as *const Self) })
    }

    /// An all-zero value.
    fn zeroed() -> Self {
        // SAFETY: every bit pattern, including all zeros, is a valid `Self`.
        unsafe { core::mem::zeroed() }
    }
}

/// The kernel's `struct sigaction` as `rt_sigaction(2)` takes it on x86-64
/// (not glibc's: the mask is 8 bytes and the restorer is explicit).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelSigaction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}
// SAFETY: repr(C), four u64, no padding.
unsafe impl Pod for KernelSigaction {}

/// `struct itimerval` (two `timeval`s of two i64 each).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ItimerVal {
    pub interval_sec: i64,
    pub interval_usec: i64,
    pub value_sec: i64,
    pub value_usec: i64,
}
// SAFETY: repr(C), four i64, no padding.
unsafe impl Pod for ItimerVal {}
