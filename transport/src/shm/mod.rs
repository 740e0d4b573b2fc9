//! The same-host shared-memory transport.
//!
//! A storage node's DRAM segments are memfds. Besides its TCP data port, the node listens on
//! a Unix socket; a client that finds a node on its own host (the node's [`host_id`], asked
//! over TCP with `ShmInfo`, equals the client's) connects to that socket, passes the same
//! `Hello`/token check as over TCP, and asks `ShmAttach`: the node answers with its node id
//! (the client checks it is the node the TCP port named) and the segments' memfds, passed
//! with `SCM_RIGHTS`. The client maps them once and keeps them per node. A get is then one
//! copy from the mapped segment into the caller's buffer and a put one copy in, followed by a
//! small `ShmCommit` on the socket that hands the node the put's object tags (its inventory).
//! Leases, commit and the crc32c keep their meaning: the bytes checked are the ones the
//! caller got.
//!
//! # Layout
//! - this module: the host identity, [`TransportMode`], the default socket path.
//! - `fds`: `SCM_RIGHTS` send and receive.
//! - `mapping`: a client's mapping of one segment memfd.
//! - `board`: the replica board a node publishes, so a client checks a cached location
//!   without a round trip.
//! - `index`: the location index a master publishes, so a client on its host finds a key's
//!   replica without a round trip.
//! - `copy`: the copies in and out, checksummed as they go, on several threads when large.
//! - `disk`: reads of a node's NVMe tier straight off its file (O_DIRECT, io_uring), each
//!   record checked against its header as the node checks it.
//! - `peers`: the client side: attaching to a node, the per-node cache, copies in and out.

pub mod board;
mod copy;
mod disk;
pub mod fds;
pub mod index;
mod mapping;
mod peers;

use std::{path::PathBuf, sync::OnceLock};

pub use board::{BoardReader, BoardWriter};
pub use copy::COPY_THREADS_ENV;
pub use disk::{reads_key, DiskFile};
pub use index::{IndexReader, IndexWriter};
pub use mapping::Mapping;
pub use peers::{Attachment, ShmPeers};

/// Which data transport a client uses to reach a storage node (`transport = "auto" | "tcp" |
/// "shm" | "rdma"` in a config file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportMode {
    /// Shared memory when the node is on this host and shares its memory, else RDMA when
    /// both sides have a device (and this build the `rdma` feature), else TCP.
    #[default]
    Auto,
    /// TCP always.
    Tcp,
    /// Shared memory only: a node this client cannot attach to fails the request
    /// (`InvalidArgument`, naming the node and why).
    Shm,
    /// RDMA only (shared memory is not used either): a node this client cannot reach over
    /// RDMA fails the request (`TransportUnsupported`, naming the node and why: no device
    /// here, a build without the `rdma` feature, or a node without a device).
    Rdma,
}

impl std::str::FromStr for TransportMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(TransportMode::Auto),
            "tcp" => Ok(TransportMode::Tcp),
            "shm" => Ok(TransportMode::Shm),
            "rdma" => Ok(TransportMode::Rdma),
            other => Err(format!(
                "transport {other:?}: expected \"auto\", \"tcp\", \"shm\" or \"rdma\""
            )),
        }
    }
}

impl std::fmt::Display for TransportMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportMode::Auto => "auto",
            TransportMode::Tcp => "tcp",
            TransportMode::Shm => "shm",
            TransportMode::Rdma => "rdma",
        })
    }
}

/// A new memory file (memfd) named `name` (shown in `/proc/PID/fd`), close-on-exec, with
/// extra `flags` (`MFD_HUGETLB` ...): what a node's segments and its replica board live in.
pub fn memfd(name: &str, flags: libc::c_uint) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: `name` is a valid NUL-terminated string; the flags are memfd_create's.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// This host's identity: the kernel's boot id and the host name. Two processes with the same
/// identity run on the same kernel (a memfd passed between them maps the same pages); a
/// container with its own host name counts as another host, and then TCP is used.
pub fn host_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        format!(
            "{}/{}",
            read("/proc/sys/kernel/random/boot_id"),
            read("/proc/sys/kernel/hostname")
        )
    })
}

/// This host's identity and the calling thread's network namespace: what a client must
/// share with a server to reach it through its Unix socket (`Local`). A process in another
/// network namespace counts as another host there, so a Unix socket never bypasses the
/// network between them (the multi-host tests' partitions, a container's own network).
pub fn net_host_id() -> String {
    let ns = std::fs::read_link("/proc/thread-self/ns/net")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    format!("{}/{ns}", host_id())
}

/// Removes the default-named sockets of `role` ("store", "master") in `dir`
/// (`kvpool-<role>-<pid>-<port>.sock`) whose process is gone: a process killed with SIGKILL
/// cannot remove its own. Returns how many.
pub fn remove_stale_sockets(dir: &std::path::Path, role: &str) -> usize {
    left_by_dead(dir, &format!("kvpool-{role}-"), ".sock")
        .into_iter()
        .filter(|p| std::fs::remove_file(p).is_ok())
        .count()
}

/// The files in `dir` named `<prefix><pid>-<port><suffix>` whose process `pid` is gone: what
/// a killed server left behind (its socket, a master's location index).
fn left_by_dead(dir: &std::path::Path, prefix: &str, suffix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            name.to_str()
                .and_then(|n| n.strip_prefix(prefix))
                .and_then(|n| n.strip_suffix(suffix))
                .and_then(|n| n.split_once('-'))
                .and_then(|(pid, _port)| pid.parse::<u32>().ok())
                .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        })
        .map(|e| e.path())
        .collect()
}

/// Where a server of `role` ("store": a node's; "master") puts its Unix socket when its
/// config names none: `$XDG_RUNTIME_DIR`, else the system's temporary directory, named for
/// the process and its TCP port so that several servers on one host never collide.
pub fn default_socket_path(role: &str, port: u16) -> PathBuf {
    default_socket_dir().join(format!("kvpool-{role}-{}-{port}.sock", std::process::id()))
}

/// The folder of [`default_socket_path`].
pub fn default_socket_dir() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_sockets_of_dead_nodes_are_removed_and_live_ones_kept() {
        let dir = std::env::temp_dir().join(format!("kvpool-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A pid above the kernel's maximum (4194304) never runs.
        let dead = dir.join("kvpool-store-4194399-5000.sock");
        let live = dir.join(format!("kvpool-store-{}-5001.sock", std::process::id()));
        let other = dir.join("unrelated-4194399-5000.sock");
        for p in [&dead, &live, &other] {
            std::fs::write(p, b"").unwrap();
        }
        assert_eq!(remove_stale_sockets(&dir, "master"), 0, "another role's");
        assert_eq!(remove_stale_sockets(&dir, "store"), 1);
        assert!(!dead.exists() && live.exists() && other.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn transport_modes_parse_and_refuse_others() {
        assert_eq!("SHM".parse::<TransportMode>(), Ok(TransportMode::Shm));
        assert_eq!(" tcp ".parse::<TransportMode>(), Ok(TransportMode::Tcp));
        assert_eq!("auto".parse::<TransportMode>(), Ok(TransportMode::Auto));
        assert_eq!("Rdma".parse::<TransportMode>(), Ok(TransportMode::Rdma));
        let e = "ib".parse::<TransportMode>().unwrap_err();
        assert!(e.contains("\"ib\"") && e.contains("\"rdma\""), "{e}");
        for m in [
            TransportMode::Auto,
            TransportMode::Tcp,
            TransportMode::Shm,
            TransportMode::Rdma,
        ] {
            assert_eq!(m.to_string().parse::<TransportMode>(), Ok(m));
        }
    }
}
