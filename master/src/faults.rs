//! Fault injection for end-to-end tests of how the master fails, set through the
//! environment so the tests drive the very binary users run. Unset (always, outside tests),
//! it does nothing.
//!
//! `KVPOOL_FAULT_MASTER_PANIC=OPCODE` (an opcode's name, e.g. `PutStart`): the master panics
//! while holding its state machine's lock on every such request, as a bug inside the state
//! machine would. Tests use it to see the master stop serving and exit non-zero.

use kvpool_proto::Opcode;

/// The faults this process was asked to inject.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    panic_on: Option<String>,
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
        Faults { panic_on }
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
