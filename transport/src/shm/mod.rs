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
//! - `peers`: the client side: attaching to a node, the per-node cache, copies in and out.

pub mod fds;
mod mapping;
mod peers;

use std::{path::PathBuf, sync::OnceLock};

pub use mapping::Mapping;
pub use peers::{Attachment, ShmPeers};

/// Which data transport a client uses to reach a storage node (`transport = "auto" | "tcp" |
/// "shm"` in a config file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportMode {
    /// Shared memory when the node is on this host and shares its memory, else TCP.
    #[default]
    Auto,
    /// TCP always.
    Tcp,
    /// Shared memory only: a node this client cannot attach to fails the request
    /// (`InvalidArgument`, naming the node and why).
    Shm,
}

impl std::str::FromStr for TransportMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(TransportMode::Auto),
            "tcp" => Ok(TransportMode::Tcp),
            "shm" => Ok(TransportMode::Shm),
            other => Err(format!(
                "transport {other:?}: expected \"auto\", \"tcp\" or \"shm\""
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
        })
    }
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

/// Where a node's Unix socket goes when its config names none: `$XDG_RUNTIME_DIR`, else the
/// system's temporary directory, named for the process and its TCP port so that several
/// nodes on one host never collide.
pub fn default_socket_path(port: u16) -> PathBuf {
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    dir.join(format!("kvpool-store-{}-{port}.sock", std::process::id()))
}
