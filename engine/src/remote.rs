//! Reading and writing another process's memory.
//!
//! `process_vm_readv`/`process_vm_writev` move bytes between address spaces
//! without a bounce buffer; `/proc/PID/mem` (which may read pages the process
//! itself cannot, e.g. `PROT_NONE`) is the fallback.

use std::fs::File;
use std::os::unix::fs::FileExt;

pub const PAGE: u64 = 4096;

/// Reads `buf.len()` bytes at `addr` of `pid`; returns how many were read
/// before the first fault (0 if the first page faults).
pub fn read(pid: i32, addr: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0usize;
    while done < buf.len() {
        let local = libc::iovec { iov_base: buf[done..].as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() - done };
        let remote = libc::iovec { iov_base: (addr + done as u64) as *mut libc::c_void, iov_len: buf.len() - done };
        // SAFETY: `local` covers the unread tail of `buf`, which we own;
        // the remote range is only read by the kernel.
        let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if done > 0 || e.raw_os_error() == Some(libc::EFAULT) {
                return Ok(done);
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    Ok(done)
}

/// Writes all of `data` at `addr` of `pid`.
pub fn write(pid: i32, addr: u64, data: &[u8]) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < data.len() {
        let local = libc::iovec { iov_base: data[done..].as_ptr() as *mut libc::c_void, iov_len: data.len() - done };
        let remote = libc::iovec { iov_base: (addr + done as u64) as *mut libc::c_void, iov_len: data.len() - done };
        // SAFETY: `local` is only read by the kernel; the remote range
        // belongs to a process we created and mapped writable.
        let n = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
        if n <= 0 {
            return Err(if n < 0 { std::io::Error::last_os_error() } else { std::io::Error::other("short write") });
        }
        done += n as usize;
    }
    Ok(())
}

/// The most iovecs one `process_vm_writev` takes (the kernel's `UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;

/// Writes each `(addr, bytes)` of `items` into `pid`, as few
/// `process_vm_writev` calls as the kernel allows (up to [`IOV_MAX`] pieces
/// each); a call that stops short goes on from where it stopped.
pub fn write_many(pid: i32, items: &[(u64, &[u8])]) -> std::io::Result<()> {
    let mut i = 0usize;
    while i < items.len() {
        let part = &items[i..(i + IOV_MAX).min(items.len())];
        let local: Vec<libc::iovec> = part.iter().map(|(_, d)| libc::iovec { iov_base: d.as_ptr() as *mut libc::c_void, iov_len: d.len() }).collect();
        let remote: Vec<libc::iovec> = part.iter().map(|(a, d)| libc::iovec { iov_base: *a as *mut libc::c_void, iov_len: d.len() }).collect();
        // SAFETY: every local iovec covers a slice we borrow, only read by
        // the kernel; the remote ranges belong to a process we restore.
        let n = unsafe { libc::process_vm_writev(pid, local.as_ptr(), local.len() as _, remote.as_ptr(), remote.len() as _, 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Skip what was written whole; finish a piece written in part.
        let mut left = n as usize;
        let mut k = 0;
        while k < part.len() && left >= part[k].1.len() {
            left -= part[k].1.len();
            k += 1;
        }
        if k < part.len() {
            let (a, d) = part[k];
            write(pid, a + left as u64, &d[left..])?;
            k += 1;
        }
        i += k;
    }
    Ok(())
}

/// Fills `buf` from `addr`, page by page where a page faults; pages that
/// cannot be read at all (beyond the end of a mapped file) read as zero.
/// `mem` is `/proc/PID/mem`, which can also read non-readable mappings.
pub fn read_tolerant(pid: i32, mem: Option<&File>, addr: u64, buf: &mut [u8]) -> std::io::Result<u64> {
    let mut read_bytes = 0u64;
    let first = read(pid, addr, buf)?;
    read_bytes += first as u64;
    let mut off = first;
    while off < buf.len() {
        let end = (off + PAGE as usize).min(buf.len());
        let page = &mut buf[off..end];
        let n = read(pid, addr + off as u64, page).unwrap_or(0);
        if n < page.len() {
            let got = mem.and_then(|m| m.read_at(&mut page[n..], addr + (off + n) as u64).ok()).unwrap_or(0);
            page[n + got..].fill(0);
            read_bytes += got as u64;
        }
        read_bytes += n as u64;
        off = end;
    }
    Ok(read_bytes)
}

/// [`read_tolerant`] through `mem` (`/proc/PID/mem`) alone, for a
/// process whose anonymous pages are shared copy-on-write with another
/// (a forked snapshot). `process_vm_readv` pins the pages it reads, and
/// since Linux 5.19 pinning a shared anonymous page for reading first
/// unshares it (`gup_must_unshare`): every page read from a snapshot was
/// copied into a new page of the snapshot before being copied to us, a
/// third of the CPU of a 1 GiB first checkpoint. A read of
/// `/proc/PID/mem` takes a reference instead of a pin and copies through
/// a kernel page: no new page, no unsharing (0.26 vs 0.61 s per GiB here).
pub fn read_shared(mem: &File, addr: u64, buf: &mut [u8]) -> std::io::Result<u64> {
    // A read of 0 bytes is the end of the process's address space: it
    // exited (a failed page reads as EIO), and must not read as zeros.
    let gone = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "its address space is gone (the process exited)");
    let mut done = 0usize;
    while done < buf.len() {
        match mem.read_at(&mut buf[done..], addr + done as u64) {
            Ok(0) => return Err(gone()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => return Err(e),
        }
    }
    let mut read_bytes = done as u64;
    // Page by page past the first page that did not read: what cannot be
    // read at all (beyond the end of a mapped file) reads as zero.
    let mut off = done;
    while off < buf.len() {
        let next = ((addr + off as u64) / PAGE + 1) * PAGE - addr;
        let end = (next as usize).min(buf.len());
        let page = &mut buf[off..end];
        let mut got = 0usize;
        while got < page.len() {
            match mem.read_at(&mut page[got..], addr + (off + got) as u64) {
                Ok(0) => return Err(gone()),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
                Err(e) => return Err(e),
            }
        }
        page[got..].fill(0);
        read_bytes += got as u64;
        off += page.len();
    }
    Ok(read_bytes)
}

/// Reads each of `ranges` (address, length) of `pid` into `buf`, one
/// after another, with as few `process_vm_readv` calls as the kernel's
/// iovec limit allows (a scattered set of dirty pages costs a few calls,
/// not one per page). A range that faults is read again with
/// [`read_tolerant`]. Returns the bytes read.
pub fn read_scattered(pid: i32, mem: Option<&File>, ranges: &[(u64, usize)], buf: &mut [u8]) -> std::io::Result<u64> {
    const BATCH: usize = 1024; // IOV_MAX
    assert_eq!(ranges.iter().map(|r| r.1).sum::<usize>(), buf.len(), "read_scattered: the ranges fill the buffer");
    let mut read_bytes = 0u64;
    let mut at = 0usize;
    for batch in ranges.chunks(BATCH) {
        let want: usize = batch.iter().map(|r| r.1).sum();
        let local = libc::iovec { iov_base: buf[at..].as_mut_ptr() as *mut libc::c_void, iov_len: want };
        let remote: Vec<libc::iovec> = batch.iter().map(|&(a, l)| libc::iovec { iov_base: a as *mut libc::c_void, iov_len: l }).collect();
        // SAFETY: `local` covers `want` bytes of `buf` from `at`, which we
        // own; the remote ranges are only read by the kernel.
        let n = unsafe { libc::process_vm_readv(pid, &local, 1, remote.as_ptr(), remote.len() as libc::c_ulong, 0) };
        let n = if n < 0 { 0 } else { n as usize };
        read_bytes += n as u64;
        if n < want {
            // The first range that did not come whole, and all after it.
            let mut off = 0usize;
            for &(a, l) in batch {
                if off + l > n {
                    let skip = n.saturating_sub(off);
                    read_bytes += read_tolerant(pid, mem, a + skip as u64, &mut buf[at + off + skip..at + off + l])?;
                }
                off += l;
            }
        }
        at += want;
    }
    Ok(read_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_a_child() {
        // Our own process is a fine peer for process_vm_*.
        let me = std::process::id() as i32;
        let src = vec![7u8; 3 * PAGE as usize];
        let mut dst = vec![0u8; src.len()];
        assert_eq!(read(me, src.as_ptr() as u64, &mut dst).unwrap(), src.len());
        assert_eq!(dst, src);
        let target = vec![0u8; 100];
        write(me, target.as_ptr() as u64, &[1u8; 100]).unwrap();
        assert_eq!(std::hint::black_box(&target), &vec![1u8; 100]);
        let many = vec![0u8; 3000];
        let pieces: Vec<(u64, Vec<u8>)> = (0..1500u64).map(|k| (many.as_ptr() as u64 + 2 * k, vec![k as u8, 0xee])).collect();
        let refs: Vec<(u64, &[u8])> = pieces.iter().map(|(a, d)| (*a, &d[..])).collect();
        write_many(me, &refs).unwrap();
        let many = std::hint::black_box(&many);
        assert!((0..1500).all(|k| many[2 * k] == k as u8 && many[2 * k + 1] == 0xee));
    }

    #[test]
    fn scattered_reads_fill_in_order_and_survive_a_hole() {
        let me = std::process::id() as i32;
        let len = 8 * PAGE as usize;
        // SAFETY: a private anonymous mapping of ours, unmapped below.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) } as *mut u8;
        for i in 0..8 {
            // SAFETY: inside the mapping.
            unsafe { p.add(i * PAGE as usize).write_bytes(i as u8 + 1, PAGE as usize) };
        }
        // Page 5 unreadable: read as zeros, the others still read.
        // SAFETY: protecting a page of our own mapping.
        unsafe { libc::mprotect(p.add(5 * PAGE as usize) as *mut libc::c_void, PAGE as usize, libc::PROT_NONE) };
        let a = p as u64;
        let ranges: Vec<(u64, usize)> = [6u64, 1, 5, 2].iter().map(|&i| (a + i * PAGE, PAGE as usize)).collect();
        let mut buf = vec![0xffu8; 4 * PAGE as usize];
        let got = read_scattered(me, None, &ranges, &mut buf).unwrap();
        let firsts: Vec<u8> = buf.chunks(PAGE as usize).map(|c| c[0]).collect();
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(p as *mut libc::c_void, len) };
        assert_eq!(firsts, vec![7, 2, 0, 3]);
        assert_eq!(got, 3 * PAGE);
    }

    #[test]
    fn shared_reads_fill_zeros_for_holes_and_refuse_a_gone_process() {
        let len = 6 * PAGE as usize;
        // SAFETY: a private anonymous mapping of ours, unmapped below.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) } as *mut u8;
        for i in 0..6 {
            // SAFETY: inside the mapping.
            unsafe { p.add(i * PAGE as usize).write_bytes(i as u8 + 1, PAGE as usize) };
        }
        // Page 2 PROT_NONE (read anyway), page 4 unmapped (a hole: zeros).
        // SAFETY: changing pages of our own mapping.
        unsafe {
            libc::mprotect(p.add(2 * PAGE as usize) as *mut libc::c_void, PAGE as usize, libc::PROT_NONE);
            libc::munmap(p.add(4 * PAGE as usize) as *mut libc::c_void, PAGE as usize);
        }
        let mem = File::open("/proc/self/mem").unwrap();
        // From the middle of page 0 to the middle of page 5.
        let (a, n) = (p as u64 + 100, 5 * PAGE as usize);
        let mut buf = vec![0xeeu8; n];
        let got = read_shared(&mem, a, &mut buf).unwrap();
        // SAFETY: unmapping what we mapped (the hole is already gone).
        unsafe {
            libc::munmap(p as *mut libc::c_void, 4 * PAGE as usize);
            libc::munmap(p.add(5 * PAGE as usize) as *mut libc::c_void, PAGE as usize);
        }
        let page_of = |i: usize| ((i + 100) / PAGE as usize) as u8;
        assert!((0..n).all(|i| buf[i] == if page_of(i) == 4 { 0 } else { page_of(i) + 1 }), "bytes read from the wrong place");
        assert_eq!(got, (n - PAGE as usize) as u64);

        // A process that exited reads as an error, never as zeros.
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let mem = File::open(format!("/proc/{}/mem", child.id())).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let mut buf = vec![0u8; PAGE as usize];
        assert!(read_shared(&mem, 0x400000, &mut buf).is_err());
    }
}
