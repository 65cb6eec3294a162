//! Kernel uapi constants and structs (x86-64) that Debian 12's libc lacks:
//! userfaultfd write-protect and `PAGEMAP_SCAN` (linux/userfaultfd.h,
//! linux/fs.h). One home for them, shared by the agent and the engine.

use crate::Pod;

pub const SYS_USERFAULTFD: i64 = 323;
pub const UFFD_USER_MODE_ONLY: i32 = 1;
pub const UFFD_API: u64 = 0xAA;
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
pub const UFFDIO_API: u64 = 0xC018_AA3F;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
pub const UFFDIO_REGISTER: u64 = 0xC020_AA00;
/// `_IOWR(0xAA, 0x06, struct uffdio_writeprotect)`.
pub const UFFDIO_WRITEPROTECT: u64 = 0xC018_AA06;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}
// SAFETY: repr(C), three u64.
unsafe impl Pod for UffdioApi {}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioRegister {
    pub start: u64,
    pub len: u64,
    pub mode: u64,
    pub ioctls: u64,
}
// SAFETY: repr(C), four u64.
unsafe impl Pod for UffdioRegister {}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioWriteprotect {
    pub start: u64,
    pub len: u64,
    pub mode: u64,
}
// SAFETY: repr(C), three u64.
unsafe impl Pod for UffdioWriteprotect {}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
pub const PAGEMAP_SCAN: u64 = 0xC060_6610;
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}
// SAFETY: repr(C), three u64.
unsafe impl Pod for PageRegion {}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}
// SAFETY: repr(C), twelve u64.
unsafe impl Pod for PmScanArg {}

/// Bit 55 of a `/proc/PID/pagemap` entry: the page is soft-dirty.
pub const PM_SOFT_DIRTY: u64 = 1 << 55;
pub const PM_PRESENT: u64 = 1 << 63;
/// Page is a file page or shared anonymous (pagemap bit 61).
pub const PM_FILE: u64 = 1 << 61;
pub const PM_SWAPPED: u64 = 1 << 62;

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_match_the_ioctl_numbers() {
        use core::mem::size_of;
        assert_eq!((super::PAGEMAP_SCAN >> 16) & 0x3fff, size_of::<super::PmScanArg>() as u64);
        assert_eq!((super::UFFDIO_API >> 16) & 0x3fff, size_of::<super::UffdioApi>() as u64);
        assert_eq!((super::UFFDIO_REGISTER >> 16) & 0x3fff, size_of::<super::UffdioRegister>() as u64);
        assert_eq!((super::UFFDIO_WRITEPROTECT >> 16) & 0x3fff, size_of::<super::UffdioWriteprotect>() as u64);
    }
}

// ------------------------------------------- userfaultfd MISSING (lazy restart)

pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `_IOWR(0xAA, 0x03, struct uffdio_copy)`.
pub const UFFDIO_COPY: u64 = 0xC028_AA03;
/// `_IOWR(0xAA, 0x04, struct uffdio_zeropage)`.
pub const UFFDIO_ZEROPAGE: u64 = 0xC020_AA04;
/// `_IOR(0xAA, 0x02, struct uffdio_range)`.
pub const UFFDIO_WAKE: u64 = 0x8010_AA02;
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    /// Bytes copied, or a negated errno.
    pub copy: i64,
}
// SAFETY: repr(C), five 8-byte fields.
unsafe impl Pod for UffdioCopy {}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioZeropage {
    pub start: u64,
    pub len: u64,
    pub mode: u64,
    pub zeropage: i64,
}
// SAFETY: repr(C), four 8-byte fields.
unsafe impl Pod for UffdioZeropage {}

/// `struct uffd_msg`: the event, then 24 bytes whose meaning it gives
/// (pagefault: flags, address, ptid; fork: the new uffd; remap: from, to,
/// len; remove/unmap: start, end).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdMsg {
    pub event: u8,
    pub _reserved1: u8,
    pub _reserved2: u16,
    pub _reserved3: u32,
    pub arg: [u64; 3],
}
// SAFETY: repr(C), 8 bytes of header then three u64: 32 bytes, no padding.
unsafe impl Pod for UffdMsg {}
