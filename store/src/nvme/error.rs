//! Why a tier operation failed, and the wire code each failure is reported with.

use std::{io, path::PathBuf};

use kvpool_proto::ErrorCode;

/// Why a tier operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    #[error("invalid nvme tier config: {0}")]
    Config(String),
    #[error("invalid nvme request: {0}")]
    InvalidArgument(String),
    #[error("record {offset}+{len} does not fit in the nvme tier of {capacity} bytes")]
    OutOfRange {
        offset: u64,
        len: u64,
        capacity: u64,
    },
    #[error("cannot open the nvme tier at {path}: {source}", path = path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("nvme tier full: {0}")]
    NoSpace(String),
    #[error("nvme {op} of {len} bytes at offset {offset} failed: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        len: u64,
        source: io::Error,
    },
    #[error("short nvme read at offset {offset}: the device ended before {len} bytes (was the file truncated?)")]
    ShortRead { offset: u64, len: u64 },
    #[error(
        "value at offset {offset}: crc32c {actual:#010x}, expected {expected:#010x}; not served"
    )]
    ChecksumMismatch {
        offset: u64,
        expected: u32,
        actual: u32,
    },
    #[error("record at offset {offset} is not the one asked for: {reason}")]
    Corrupt { offset: u64, reason: String },
    #[error("nvme tier is unhealthy ({0}); writes are refused until it is reopened")]
    Unhealthy(String),
    #[error("nvme index: {0}")]
    Index(String),
}

impl NvmeError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            NvmeError::Config(_) | NvmeError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            NvmeError::OutOfRange { .. } => ErrorCode::OutOfRange,
            NvmeError::NoSpace(_) => ErrorCode::NoSpace,
            NvmeError::Open { source, .. } | NvmeError::Io { source, .. }
                if source.raw_os_error() == Some(libc::ENOSPC) =>
            {
                ErrorCode::NoSpace
            }
            NvmeError::Open { .. }
            | NvmeError::Io { .. }
            | NvmeError::ShortRead { .. }
            | NvmeError::Unhealthy(_)
            | NvmeError::Index(_) => ErrorCode::Io,
            NvmeError::ChecksumMismatch { .. } | NvmeError::Corrupt { .. } => {
                ErrorCode::ChecksumMismatch
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes() {
        let io = |n| io::Error::from_raw_os_error(n);
        let e = |n| NvmeError::Io {
            op: "write",
            offset: 0,
            len: 1,
            source: io(n),
        };
        assert_eq!(e(libc::ENOSPC).code(), ErrorCode::NoSpace);
        assert_eq!(e(libc::EIO).code(), ErrorCode::Io);
        assert_eq!(
            NvmeError::ShortRead { offset: 0, len: 1 }.code(),
            ErrorCode::Io
        );
        assert_eq!(
            NvmeError::OutOfRange {
                offset: 0,
                len: 1,
                capacity: 0
            }
            .code(),
            ErrorCode::OutOfRange
        );
    }
}
