//! Passing file descriptors over a Unix socket (`SCM_RIGHTS`): how a node hands its segment
//! memfds to a same-host client. Only a process on the same kernel can receive them, which is
//! what makes the shared-memory path same-host by construction.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use tokio::{io::Interest, net::UnixStream};

/// Most descriptors one message carries (segments per node: a handful).
pub const MAX_FDS: usize = 64;

/// Control-message buffer, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct Cmsg([u8; cmsg_space(MAX_FDS)]);

const fn cmsg_space(n: usize) -> usize {
    // CMSG_SPACE(n * sizeof(int)) on Linux: header rounded up, data rounded up to size_t.
    let align = size_of::<usize>();
    let hdr = (size_of::<libc::cmsghdr>() + align - 1) & !(align - 1);
    let data = (n * size_of::<RawFd>() + align - 1) & !(align - 1);
    hdr + data
}

/// Sends `bytes` with `fds` attached to their first byte; the rest of `bytes`, if the socket
/// took only part, follows as ordinary data.
pub async fn send_with_fds(s: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS || bytes.is_empty() {
        return Err(io::Error::other(format!(
            "{} descriptors with {} bytes",
            fds.len(),
            bytes.len()
        )));
    }
    let sent = loop {
        s.writable().await?;
        match s.try_io(Interest::WRITABLE, || {
            sendmsg_fds(s.as_raw_fd(), bytes, fds)
        }) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    let mut at = sent;
    while at < bytes.len() {
        s.writable().await?;
        match s.try_write(&bytes[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn sendmsg_fds(fd: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut cmsg = Cmsg([0; cmsg_space(MAX_FDS)]);
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let data_len = std::mem::size_of_val(fds);
    // SAFETY: zeroed msghdr is a valid "no name, no flags" header; the pointers set below
    // point at locals that outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if fds.is_empty() {
        // No control message at all (an answer that hands over nothing, as `ShmNvme` from a
        // node without a shared tier).
        // SAFETY: msg is a valid header pointing at `iov`, which outlives the call.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        return usize::try_from(n).map_err(|_| io::Error::last_os_error());
    }
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
    // SAFETY: msg_control points at a buffer of at least CMSG_SPACE(data_len) bytes (MAX_FDS
    // bounds fds.len()), aligned for cmsghdr, so the first header and its data fit.
    unsafe {
        let hdr = libc::CMSG_FIRSTHDR(&msg);
        (*hdr).cmsg_level = libc::SOL_SOCKET;
        (*hdr).cmsg_type = libc::SCM_RIGHTS;
        (*hdr).cmsg_len = libc::CMSG_LEN(data_len as u32) as usize;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr(),
            libc::CMSG_DATA(hdr).cast::<RawFd>(),
            fds.len(),
        );
    }
    // SAFETY: msg is fully initialized above; the kernel reads iov and control only.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Receives up to `buf.len()` bytes and the descriptors attached to them.
pub async fn recv_with_fds(s: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    loop {
        s.readable().await?;
        match s.try_io(Interest::READABLE, || recvmsg_fds(s.as_raw_fd(), buf)) {
            Ok(r) => return Ok(r),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

fn recvmsg_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg = Cmsg([0; cmsg_space(MAX_FDS)]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as in `sendmsg_fds`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.0.len();
    // SAFETY: the kernel writes at most iov_len bytes into buf and msg_controllen into cmsg;
    // MSG_CMSG_CLOEXEC keeps received descriptors from leaking into children.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote, with the libc macros, within
    // msg_controllen; SCM_RIGHTS data is an array of ints each a fresh descriptor we now own.
    unsafe {
        let mut hdr = libc::CMSG_FIRSTHDR(&msg);
        while !hdr.is_null() {
            if (*hdr).cmsg_level == libc::SOL_SOCKET && (*hdr).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(hdr).cast::<RawFd>();
                let count = ((*hdr).cmsg_len - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            hdr = libc::CMSG_NXTHDR(&msg, hdr);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other(
            "descriptors truncated (more than MAX_FDS)",
        ));
    }
    Ok((n, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{ffi::CString, fs::File, io::Write as _};

    /// A descriptor passed over a socket pair names the same file: what the receiver reads
    /// through it is what the sender wrote, and the frame bytes arrive whole beside it.
    #[tokio::test]
    async fn descriptors_cross_a_socket_with_their_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let name = CString::new("kvpool-fds-test").unwrap();
        // SAFETY: a valid NUL-terminated name and memfd_create's own flag.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is fresh and owned by nothing else.
        let mut file = unsafe { File::from_raw_fd(fd) };
        file.write_all(b"segment bytes").unwrap();
        let frame: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let two = [file.as_raw_fd(), file.as_raw_fd()];
        let send = send_with_fds(&a, &frame, &two);
        let recv = async {
            let mut buf = vec![0u8; frame.len()];
            let (mut have, fds) = recv_with_fds(&b, &mut buf).await.unwrap();
            while have < frame.len() {
                b.readable().await.unwrap();
                match b.try_read(&mut buf[have..]) {
                    Ok(n) => have += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            (buf, fds)
        };
        let (sent, (buf, fds)) = tokio::join!(send, recv);
        sent.unwrap();
        assert!(buf == frame, "frame bytes differ");
        assert_eq!(fds.len(), 2);
        let got = std::fs::read(format!("/proc/self/fd/{}", fds[1].as_raw_fd())).unwrap();
        assert_eq!(got, b"segment bytes");
        assert!(send_with_fds(&a, b"x", &[0; MAX_FDS + 1]).await.is_err());
    }
}
