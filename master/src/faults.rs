//! Fault injection for end-to-end tests of how the master fails, set through the
//! environment so the tests drive the very binary users run. Unset (always, outside tests),
//! it does nothing.
//!
//! - `KVPOOL_FAULT_MASTER_PANIC=OPCODE` (an opcode's name, e.g. `PutStart`): the master
//!   panics while holding its state machine's lock on every such request, as a bug inside
//!   the state machine would. Tests use it to see the master stop serving and exit non-zero.
//! - `KVPOOL_FAULT_MASTER_REFUSE=OPCODE@MARKER` (e.g. `PutEnd@zombie`): requests of that
//!   opcode whose body contains the bytes MARKER (a key carries its bytes verbatim) are
//!   answered `Internal` without being applied. Tests use it to leave a fully written put
//!   uncommitted while the master lives on.

use kvpool_proto::{ErrorCode, Opcode, WireError};

/// The faults this process was asked to inject.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    panic_on: Option<String>,
    refuse: Option<(String, Vec<u8>)>,
}

impl Faults {
    pub(crate) fn from_env() -> Faults {
        let panic_on = std::env::var("KVPOOL_FAULT_MASTER_PANIC").ok();
        if let Some(op) = &panic_on {
            tracing::warn!(
                opcode = op,
                "fault injection on: the master panics on these requests"
            );
        }
        let refuse = std::env::var("KVPOOL_FAULT_MASTER_REFUSE")
            .ok()
            .and_then(|v| {
                let (op, marker) = v.split_once('@')?;
                Some((op.to_string(), marker.as_bytes().to_vec()))
            });
        if let Some((op, marker)) = &refuse {
            tracing::warn!(
                opcode = op,
                marker = %String::from_utf8_lossy(marker),
                "fault injection on: the master refuses these requests unapplied"
            );
        }
        Faults { panic_on, refuse }
    }

    /// Checked before a request is decoded: `Err` answers it without applying it.
    pub(crate) fn admit(&self, opcode: Opcode, body: &[u8]) -> Result<(), WireError> {
        let Some((op, marker)) = &self.refuse else {
            return Ok(());
        };
        let hit = *op == format!("{opcode:?}")
            && !marker.is_empty()
            && body.windows(marker.len()).any(|w| w == marker.as_slice());
        if hit {
            return Err(WireError::new(
                ErrorCode::Internal,
                format!("injected fault: KVPOOL_FAULT_MASTER_REFUSE={op}@..."),
            ));
        }
        Ok(())
    }

    /// Called with the core locked, before a request is applied.
    pub(crate) fn before_apply(&self, opcode: Opcode) {
        if let Some(op) = &self.panic_on {
            if *op == format!("{opcode:?}") {
                panic!("injected fault: KVPOOL_FAULT_MASTER_PANIC={op}");
            }
        }
    }
}
