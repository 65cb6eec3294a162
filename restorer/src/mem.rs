//! The memory primitives the compiler may call (`memcpy`, `memset`,
//! `memmove`, `memcmp`, `bcmp`): there is no libc to provide them.
//!
//! Written with `rep movsb`/`rep stosb` and volatile loads so that LLVM
//! cannot turn them back into calls to themselves.

use core::arch::asm;

/// # Safety
/// Same contract as C `memcpy`: `src` readable, `dst` writable for `n`
/// bytes, no overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: `rep movsb` copies rcx bytes from rsi to rdi forwards (the
    // direction flag is clear per the ABI); the caller vouches for the ranges.
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags),
        );
    }
    dst
}

/// # Safety
/// Same contract as C `memmove`: `src` readable, `dst` writable for `n`
/// bytes; the ranges may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // dst is below src, or the ranges do not overlap: forward is safe.
        // SAFETY: forwarded to the caller; a forward copy is correct here.
        return unsafe { memcpy(dst, src, n) };
    }
    if n == 0 {
        return dst;
    }
    // SAFETY: backward `rep movsb` from the last byte (direction flag set,
    // then cleared again as the ABI requires); the caller vouches for the
    // ranges.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dst.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack),
        );
    }
    dst
}

/// # Safety
/// Same contract as C `memset`: `dst` writable for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: `rep stosb` stores al rcx times at rdi forwards; the caller
    // vouches for the range.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dst => _,
            in("al") c as u8,
            options(nostack, preserves_flags),
        );
    }
    dst
}

/// # Safety
/// Same contract as C `memcmp`: both ranges readable for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller vouches for both ranges; volatile so
        // the loop is not recognised as a call to `memcmp`.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// Same contract as C `bcmp`: both ranges readable for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}
