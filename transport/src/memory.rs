//! Memory that another party may write while we use it: segment ranges.
//!
//! A storage node's segment is written by its connection tasks and, once shared, by same-host
//! client processes; a client's mapping of a node's segment is written by the node and by
//! other clients. Rust's references promise that nobody else writes the bytes while the
//! reference lives (`&[u8]`) or that nobody else touches them at all (`&mut [u8]`); neither
//! holds here, so this module never forms a reference over such memory. [`SharedRange`] is a
//! raw pointer and a length; its operations copy between it and memory we own (`copy_from`,
//! `copy_to`), checksum it through a small owned buffer, and move it to and from sockets with
//! `recv`/`send` on the raw pointer (the kernel copies, no reference is formed).
//!
//! Why racy copies are acceptable: the bytes of a range are only ever treated as opaque data.
//! A reader that races a writer (space reused after eviction while a stale reader copies)
//! may get torn bytes; nothing interprets them, and the client's lease check and crc32c reject
//! them before the caller is told the get succeeded. The copies go through
//! `ptr::copy_nonoverlapping` on raw pointers, which is what reading a file mapping another
//! process writes has always been in Rust; see `docs/transports.md` for the whole argument.

use std::{io, ptr::NonNull};

/// A range of memory another party may write concurrently: never turned into a slice.
#[derive(Clone, Copy)]
pub struct SharedRange {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a `SharedRange` is an address and a length; every access through it is a raw copy
// whose validity its creator vouched for (`SharedRange::new`), from any thread.
unsafe impl Send for SharedRange {}
// SAFETY: as for `Send`: `&SharedRange` allows nothing more than `SharedRange`.
unsafe impl Sync for SharedRange {}

impl std::fmt::Debug for SharedRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedRange({:p}+{})", self.ptr, self.len)
    }
}

/// Scratch size for checksumming a range through owned memory (stays in L1/L2).
const CRC_SCRATCH: usize = 16 << 10;

impl SharedRange {
    /// A range over `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped readable and writable for as long as this range (or a
    /// copy or sub-range of it) is used, and no Rust reference to any of its bytes may exist
    /// while it is used.
    pub unsafe fn new(ptr: NonNull<u8>, len: usize) -> SharedRange {
        SharedRange { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The address of the first byte: what a device registration names (an address, never
    /// a reference).
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The sub-range `at..at+len`; `None` when it does not fit.
    pub fn sub(&self, at: usize, len: usize) -> Option<SharedRange> {
        let end = at.checked_add(len)?;
        (end <= self.len).then(|| SharedRange {
            // SAFETY: at <= len of the range, so the pointer stays inside (or one past) it.
            ptr: unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(at)) },
            len,
        })
    }

    /// Copies `src` to the start of the range.
    ///
    /// # Panics
    /// When `src` is longer than the range.
    pub fn copy_from(&self, src: &[u8]) {
        assert!(
            src.len() <= self.len,
            "copy of {} into {}",
            src.len(),
            self.len
        );
        // SAFETY: the range is valid for writes of `len` bytes (contract of `new`); `src` is
        // memory we own a reference to, and cannot overlap memory no reference may point at.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr(), src.len()) }
    }

    /// Copies the start of the range into all of `dst`.
    ///
    /// # Panics
    /// When `dst` is longer than the range.
    pub fn copy_to(&self, dst: &mut [u8]) {
        assert!(
            dst.len() <= self.len,
            "copy of {} from {}",
            dst.len(),
            self.len
        );
        // SAFETY: as in `copy_from`, reading instead of writing.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), dst.as_mut_ptr(), dst.len()) }
    }

    /// The crc32c of the range's bytes as they are now (through an owned scratch buffer).
    pub fn crc32c(&self) -> u32 {
        let mut scratch = [0u8; CRC_SCRATCH];
        let mut crc = 0;
        let mut at = 0;
        while at < self.len {
            let n = CRC_SCRATCH.min(self.len - at);
            if let Some(part) = self.sub(at, n) {
                part.copy_to(&mut scratch[..n]);
                crc = kvpool_proto::crc32c::crc32c_append(crc, &scratch[..n]);
            }
            at += n;
        }
        crc
    }

    /// The bytes as an owned vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.copy_to(&mut v);
        v
    }

    /// One `recv` from `fd` into the range (non-blocking socket: may fail `WouldBlock`).
    pub fn recv_from(&self, fd: std::os::fd::RawFd) -> io::Result<usize> {
        // SAFETY: the kernel writes at most `len` bytes at `ptr`, which is valid for writes.
        let n = unsafe { libc::recv(fd, self.ptr.as_ptr().cast(), self.len, 0) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// One `send` of the range to `fd` (non-blocking socket: may fail `WouldBlock`).
    pub fn send_to(&self, fd: std::os::fd::RawFd) -> io::Result<usize> {
        // SAFETY: the kernel reads at most `len` bytes at `ptr`, which is valid for reads.
        // MSG_NOSIGNAL: a peer that closed gives EPIPE, not a process-killing SIGPIPE.
        let n = unsafe { libc::send(fd, self.ptr.as_ptr().cast(), self.len, libc::MSG_NOSIGNAL) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(buf: &mut Vec<u8>) -> SharedRange {
        let p = NonNull::new(buf.as_mut_ptr()).unwrap();
        // SAFETY: the test keeps `buf` alive and forms no reference to it while the range is
        // used (it only reads `buf` after the last use).
        unsafe { SharedRange::new(p, buf.len()) }
    }

    #[test]
    fn copies_subranges_and_checksums() {
        let mut buf = vec![0u8; 100_000];
        let r = owned(&mut buf);
        let src: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
        r.sub(1000, src.len()).unwrap().copy_from(&src);
        let mut back = vec![0u8; src.len()];
        r.sub(1000, src.len()).unwrap().copy_to(&mut back);
        assert_eq!(back, src);
        assert_eq!(
            r.sub(1000, src.len()).unwrap().crc32c(),
            kvpool_proto::crc32c::crc32c(&src)
        );
        assert!(r.sub(99_999, 2).is_none());
        assert!(r.sub(usize::MAX, 2).is_none());
        assert_eq!(r.sub(100_000, 0).unwrap().len(), 0);
        assert_eq!(&buf[1000..1000 + src.len()], &src[..]);
    }
}
