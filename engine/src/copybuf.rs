//! The buffers that memory copied out of a stopped process goes into
//! ([`crate::stopcopy`]), kept from one round to the next with their
//! pages in place.
//!
//! A buffer of a few MiB freshly allocated comes from `mmap` (glibc's
//! mmap threshold) with none of its pages faulted in, or from the heap
//! already faulted, depending on what was freed before: the copy while
//! stopped then took a page fault per page it wrote, or none. At 1 GiB
//! with 1% of pages changed that was 2,600 faults and the copy step
//! bimodal (`getrusage` around the copy: 2,607 faults and 18.9 ms, or
//! none and 4.5 ms, the `calloc` taking 0.013 ms or 0.26 ms of `memset`,
//! load 7, 2026-12-07). A kept buffer was written before: no fault, and
//! no `memset` either (the copy overwrites what it reads).
//!
//! A buffer is an anonymous mapping of its own, reserved at its largest
//! size (`MAP_NORESERVE`, never a page until written): two threads fill
//! parts of it at once without it ever moving.

use std::sync::Mutex;

/// The most bytes of written pages the pool keeps between rounds (what
/// the coordinator holds resident for the next round's copies).
const KEPT_BYTES: usize = 64 << 20;

/// The most buffers the pool keeps (one per process copied at once).
const KEPT_BUFFERS: usize = 64;

/// Kept buffers; [`CopyBuf::take`] uses the process's one.
pub struct Pool(Mutex<Vec<Arena>>);

static POOL: Pool = Pool::new();

/// An anonymous mapping of `cap` bytes, the first `touched` of which were
/// written (faulted in).
struct Arena {
    ptr: *mut u8,
    cap: usize,
    touched: usize,
}

// SAFETY: an Arena is a mapping owned by whoever holds it; nothing in it
// is tied to a thread.
unsafe impl Send for Arena {}

impl Arena {
    fn map(cap: usize) -> std::io::Result<Arena> {
        // SAFETY: a new private anonymous mapping; no existing memory is
        // touched. Unmapped in Drop.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), cap, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0) };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Arena { ptr: p as *mut u8, cap, touched: 0 })
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and nothing refers to it any more.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.cap) };
    }
}

impl Default for Pool {
    fn default() -> Pool {
        Pool::new()
    }
}

impl Pool {
    pub const fn new() -> Pool {
        Pool(Mutex::new(Vec::new()))
    }

    /// A buffer that can hold `cap` bytes: the kept one with the most
    /// pages already written among those large enough, else a new one.
    pub fn take(&'static self, cap: usize) -> std::io::Result<CopyBuf> {
        let kept = {
            let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let pick = kept.iter().enumerate().filter(|(_, a)| a.cap >= cap).max_by_key(|(_, a)| a.touched).map(|(i, _)| i);
            pick.map(|i| kept.swap_remove(i))
        };
        let arena = match kept {
            Some(a) => a,
            None => Arena::map(cap.max(1))?,
        };
        Ok(CopyBuf { pool: self, arena: Some(arena), len: 0 })
    }

    fn give_back(&self, arena: Arena) {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        kept.push(arena);
        // Over the bounds: those holding the most pages go first.
        kept.sort_unstable_by_key(|a| std::cmp::Reverse(a.touched));
        while kept.len() > KEPT_BUFFERS || kept.iter().map(|a| a.touched).sum::<usize>() > KEPT_BYTES {
            kept.remove(0);
        }
    }
}

/// A buffer taken from a [`Pool`], given back when dropped. Its bytes
/// are zero or whatever an earlier copy left: the caller overwrites the
/// ones it reads.
pub struct CopyBuf {
    pool: &'static Pool,
    arena: Option<Arena>,
    /// How many bytes from the start are in use ([`Self::set_len`]).
    len: usize,
}

// SAFETY: see Arena; the raw parts of it that threads write are handed
// out by `part` under its own contract.
unsafe impl Send for CopyBuf {}
unsafe impl Sync for CopyBuf {}

impl CopyBuf {
    /// A buffer for up to `cap` bytes from the process's pool.
    pub fn take(cap: usize) -> std::io::Result<CopyBuf> {
        POOL.take(cap)
    }

    fn arena(&self) -> &Arena {
        self.arena.as_ref().expect("a CopyBuf holds its arena until dropped")
    }

    /// The most bytes it holds.
    pub fn capacity(&self) -> usize {
        self.arena().cap
    }

    /// Bytes `[at, at + len)` to write into.
    ///
    /// # Safety
    /// No other live slice of this buffer may overlap `[at, at + len)`
    /// while the one returned is used (threads filling parts of it must be
    /// given disjoint parts), and [`Self::as_slice`] must not be called
    /// until every such slice is gone.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn part(&self, at: usize, len: usize) -> &mut [u8] {
        let a = self.arena();
        assert!(at.checked_add(len).is_some_and(|e| e <= a.cap), "CopyBuf::part: {at}+{len} is past its {} bytes", a.cap);
        // SAFETY: inside the mapping (checked above); disjointness is the
        // caller's promise.
        unsafe { std::slice::from_raw_parts_mut(a.ptr.add(at), len) }
    }

    /// Says that its first `len` bytes hold data (for [`Self::as_slice`]
    /// and for what the pool keeps).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "CopyBuf::set_len: {len} is past its {} bytes", self.capacity());
        self.len = len;
        let a = self.arena.as_mut().expect("a CopyBuf holds its arena until dropped");
        a.touched = a.touched.max(len);
    }

    /// Its first `len` bytes ([`Self::set_len`]).
    pub fn as_slice(&self) -> &[u8] {
        let a = self.arena();
        // SAFETY: inside the mapping (len ≤ cap); the mapping's bytes are
        // always initialized (zero or written), and `&self` with no part
        // outstanding (the contract of `part`) means no writer.
        unsafe { std::slice::from_raw_parts(a.ptr, self.len) }
    }
}

impl Drop for CopyBuf {
    fn drop(&mut self) {
        if let Some(a) = self.arena.take() {
            self.pool.give_back(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_with_their_pages() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new()));
        let mut a = pool.take(3 << 20).unwrap();
        // SAFETY: the only part taken.
        unsafe { a.part(12345, 1)[0] = 7 };
        a.set_len(3 << 20);
        let at = a.as_slice().as_ptr();
        drop(a);
        // The same memory, as it was left (no zeroing: the copy
        // overwrites it), even for a shorter use.
        let mut b = pool.take(1 << 20).unwrap();
        b.set_len(1 << 20);
        assert_eq!((b.as_slice().as_ptr(), b.as_slice()[12345], b.capacity()), (at, 7, 3 << 20));
        // A second buffer while the first is out: a new one.
        let c = pool.take(1 << 20).unwrap();
        assert_ne!(c.as_slice().as_ptr(), at);
        drop((b, c));
        // Larger than any kept: a new one.
        let mut d = pool.take(5 << 20).unwrap();
        assert_eq!(d.capacity(), 5 << 20);
        assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.set_len((5 << 20) + 1))).is_err());
        drop(d);
        // Past the bound, those holding the most go.
        let mut e = pool.take(KEPT_BYTES + 1).unwrap();
        e.set_len(KEPT_BYTES + 1);
        drop(e);
        let kept = pool.0.lock().unwrap();
        assert!(kept.iter().map(|a| a.touched).sum::<usize>() <= KEPT_BYTES, "{:?}", kept.iter().map(|a| a.touched).collect::<Vec<_>>());
        assert_eq!(kept.len(), 3);
    }
}
