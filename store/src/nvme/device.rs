//! Where the tier's bytes live: a preallocated file or a raw block device, opened O_DIRECT.
//!
//! The device knows nothing of records; it only guarantees that `0..size` is addressable and,
//! for a file, already allocated, so that a write inside it cannot fail for lack of space.

use std::{
    fs::{File, OpenOptions},
    io,
    os::{
        fd::{AsRawFd, RawFd},
        unix::fs::{FileExt, FileTypeExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

use super::{layout::NVME_ALIGN, NvmeError};

/// `BLKGETSIZE64`: the size of a block device in bytes (`_IOR(0x12, 114, size_t)`).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// The file or block device backing a tier.
#[derive(Debug)]
pub struct Device {
    file: File,
    path: PathBuf,
    size: u64,
    block_device: bool,
}

impl Device {
    /// Opens `path` O_DIRECT. A block device is used as is (`size` 0 means all of it); a
    /// regular file is created if missing and preallocated to `size` bytes (rounded down to
    /// 4 KiB). Blocking: preallocating a large file takes a while on some filesystems.
    pub fn open(path: &Path, size: u64) -> Result<Device, NvmeError> {
        let open_err = |source: io::Error| NvmeError::Open {
            path: path.to_path_buf(),
            source,
        };
        let block_device = std::fs::metadata(path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(!block_device)
            .truncate(false)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL) => open_err(io::Error::new(
                    e.kind(),
                    "the filesystem does not support O_DIRECT (tmpfs before Linux 6.6?); \
                     put the tier on a disk-backed filesystem or a block device",
                )),
                _ => open_err(e),
            })?;
        let size = if block_device {
            let dev_size = block_device_size(&file).map_err(open_err)?;
            match size {
                0 => dev_size,
                s if s <= dev_size => s,
                s => {
                    return Err(NvmeError::Config(format!(
                        "size {s} is larger than the block device {} ({dev_size} bytes)",
                        path.display()
                    )))
                }
            }
        } else {
            if size == 0 {
                return Err(NvmeError::Config(
                    "size must be set for a file-backed tier".into(),
                ));
            }
            size
        };
        let size = super::layout::align_down(size, NVME_ALIGN);
        if size == 0 {
            return Err(NvmeError::Config(format!(
                "size is smaller than one {NVME_ALIGN}-byte block"
            )));
        }
        let dev = Device {
            file,
            path: path.to_path_buf(),
            size,
            block_device,
        };
        if !block_device {
            dev.preallocate()?;
        }
        Ok(dev)
    }

    /// Reserves every block of `0..size` now: writes inside the tier then never hit ENOSPC,
    /// and a disk too small for the configured size fails at start-up, not mid-write.
    fn preallocate(&self) -> Result<(), NvmeError> {
        let len = libc::off_t::try_from(self.size)
            .map_err(|_| NvmeError::Config(format!("size {} is too large", self.size)))?;
        // SAFETY: fallocate on an fd we own; no memory is passed.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, 0, len) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) => {
                tracing::warn!(
                    path = %self.path.display(),
                    "filesystem cannot preallocate; the tier file is sparse and a write may \
                     fail with ENOSPC when the disk fills"
                );
                if self.file.metadata().map(|m| m.len()).unwrap_or(0) < self.size {
                    self.file
                        .set_len(self.size)
                        .map_err(|source| NvmeError::Open {
                            path: self.path.clone(),
                            source,
                        })?;
                }
                Ok(())
            }
            Some(libc::ENOSPC) => Err(NvmeError::NoSpace(format!(
                "cannot preallocate {} bytes for the tier at {}: the filesystem is full",
                self.size,
                self.path.display()
            ))),
            _ => Err(NvmeError::Open {
                path: self.path.clone(),
                source: e,
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Usable bytes, a multiple of 4 KiB.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// A second descriptor of the same file, read-only and O_DIRECT: what the node hands
    /// same-host clients so that they read records themselves (never one they could write
    /// through). Opened through `/proc/self/fd`, so it is this file even if its path has
    /// since been replaced.
    pub fn open_read_only(&self) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// Blocking positional read of `buf.len()` bytes; EOF before that is `UnexpectedEof`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Blocking positional write of all of `buf`.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Makes completed writes durable (data, and the metadata needed to read it back, such
    /// as the written state of preallocated extents).
    pub fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live local.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}
