//! Health: an I/O error, a short read or a full disk marks the tier unhealthy; writes are
//! then refused (reads still tried) until the tier is reopened.

use std::{io, sync::atomic::Ordering};

use super::{tier::Shared, NvmeError, NvmeTier};

impl NvmeTier {
    /// False after an I/O error, a short read or a full disk; writes are refused then.
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire)
    }

    /// What made the tier unhealthy, if it is.
    pub fn unhealthy_reason(&self) -> Option<String> {
        self.shared
            .cause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Shared {
    pub(super) fn check_healthy(&self) -> Result<(), NvmeError> {
        if self.healthy.load(Ordering::Acquire) {
            return Ok(());
        }
        let cause = self.cause.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Err(NvmeError::Unhealthy(cause.unwrap_or_default()))
    }

    pub(super) fn mark_unhealthy(&self, cause: &str) {
        let mut c = self.cause.lock().unwrap_or_else(|e| e.into_inner());
        if c.is_none() {
            tracing::error!(cause, "nvme tier marked unhealthy; writes are refused");
            *c = Some(cause.to_string());
        }
        self.healthy.store(false, Ordering::Release);
    }

    /// Turns an engine error into the tier's, marking the tier unhealthy.
    pub(super) fn io_failed(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        e: io::Error,
    ) -> NvmeError {
        let err = match e.kind() {
            io::ErrorKind::UnexpectedEof => NvmeError::ShortRead { offset, len },
            _ if e.raw_os_error() == Some(libc::ENOSPC) => NvmeError::NoSpace(format!(
                "{op} of {len} bytes at offset {offset}: {e} (the filesystem under the tier \
                 file is full)"
            )),
            _ => NvmeError::Io {
                op,
                offset,
                len,
                source: e,
            },
        };
        self.mark_unhealthy(&err.to_string());
        err
    }
}
