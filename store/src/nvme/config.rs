//! The tier's part of the node's config file.

use std::path::PathBuf;

use kvpool_proto::ByteSize;
use serde::{Deserialize, Serialize};

use super::IoEngineKind;

/// Size of one staging buffer: a 1 MiB value and its header block go out as one write.
pub const STAGING_BUF: usize = 2 << 20;

/// The `[store.nvme]` part of a config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct NvmeConfig {
    /// File (created and preallocated if missing) or block device holding the records
    /// [required].
    pub path: PathBuf,
    /// Bytes of the tier, rounded down to 4 KiB [0: the whole device; required for a file].
    pub size: ByteSize,
    /// I/O engine: "uring" or "psync" ["uring"; falls back to "psync" with a warning when
    /// io_uring cannot be set up].
    pub engine: IoEngineKind,
    /// Requests in flight on the device: the ring depth, or the psync thread count [64].
    pub queue_depth: u32,
    /// Folder of the RocksDB index [unset: "<path>.index"].
    pub index_dir: Option<PathBuf>,
    /// Memory of the staging buffers (2 MiB each) that values are copied through, registered
    /// with io_uring [64MiB]. When all are busy, buffers are allocated per request.
    pub staging: ByteSize,
    /// Most parts one read of a large value (over 512 KiB) is split into, read at once [1:
    /// one read per value; splitting showed no gain on a disk whose throughput does not grow
    /// with queue depth, docs/benchmarks.md; 4 to 8 for devices whose does].
    pub read_parts: u32,
}

impl Default for NvmeConfig {
    fn default() -> Self {
        NvmeConfig {
            path: PathBuf::new(),
            size: ByteSize(0),
            engine: IoEngineKind::Uring,
            queue_depth: 64,
            index_dir: None,
            staging: ByteSize::mib(64),
            read_parts: 1,
        }
    }
}

impl NvmeConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.path.as_os_str().is_empty() {
            return Err("nvme path is not set".into());
        }
        if !(1..=4096).contains(&self.queue_depth) {
            return Err(format!(
                "nvme queue-depth = {} is out of range (1 to 4096)",
                self.queue_depth
            ));
        }
        if !(1..=64).contains(&self.read_parts) {
            return Err(format!(
                "nvme read-parts = {} is out of range (1 to 64)",
                self.read_parts
            ));
        }
        if self.staging.0 < STAGING_BUF as u64 {
            return Err(format!(
                "nvme staging = {} is too small (at least 2MiB)",
                self.staging
            ));
        }
        Ok(())
    }

    /// The index folder: as configured, or next to the data.
    pub fn index_dir(&self) -> PathBuf {
        self.index_dir.clone().unwrap_or_else(|| {
            let mut p = self.path.clone().into_os_string();
            p.push(".index");
            PathBuf::from(p)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_names() {
        let c: NvmeConfig = toml::from_str("path = \"/data/kv\"\nsize = \"4GiB\"").unwrap();
        assert_eq!(c.engine, IoEngineKind::Uring);
        assert_eq!(c.queue_depth, 64);
        assert_eq!(c.size, ByteSize(4 << 30));
        assert_eq!(c.index_dir(), PathBuf::from("/data/kv.index"));
        assert!(c.validate().is_ok());
        let c: NvmeConfig =
            toml::from_str("path = \"x\"\nengine = \"psync\"\nqueue-depth = 8\nindex-dir = \"i\"")
                .unwrap();
        assert_eq!((c.engine, c.queue_depth), (IoEngineKind::Psync, 8));
        assert_eq!(c.index_dir(), PathBuf::from("i"));
        assert!(toml::from_str::<NvmeConfig>("engine = \"aio\"").is_err());
        assert!(toml::from_str::<NvmeConfig>("queue_depth = 8").is_err());
        assert!(NvmeConfig::default().validate().is_err(), "path required");
        let c: NvmeConfig = toml::from_str("path = \"x\"\nread-parts = 1").unwrap();
        assert_eq!(c.read_parts, 1);
        let c: NvmeConfig = toml::from_str("path = \"x\"\nread-parts = 0").unwrap();
        assert!(c.validate().unwrap_err().contains("read-parts = 0"));
    }
}
