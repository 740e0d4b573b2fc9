//! The native half of the `kvpool` Python package (`kvpool._native`): thin PyO3 classes over
//! the Rust client and storage node. Everything Pythonic (typed exceptions, buffer-protocol
//! objects, the Mooncake drop-in, the SGLang backend) lives in `python/kvpool/`.
//!
//! # Layout
//! - [`runtime`]: the process's tokio runtime; every call releases the GIL while it runs.
//! - [`buffers`]: caller memory given by address, checked and turned into slices.
//! - [`outcome`]: per-item results, failures as `(code, name, message)` tuples.
//! - [`client`]: `NativeClient`, batches of put / get / exists / remove / status.
//! - [`node`]: `EmbeddedNode`, a storage node inside the process.

mod buffers;
mod client;
mod connector;
mod node;
mod outcome;
mod runtime;

use pyo3::prelude::*;

#[pymodule]
mod _native {
    #[pymodule_export]
    use crate::client::NativeClient;
    #[pymodule_export]
    use crate::connector::{
        cuda_unavailable, BlockHasher, BlockKey, Connector, KvLayout, LayerwiseLoad, PdConsumer,
        PdProducer,
    };
    #[pymodule_export]
    use crate::node::EmbeddedNode;
    #[pymodule_export]
    use crate::outcome::error_codes;

    use pyo3::prelude::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        crate::init_logging();
        Ok(())
    }
}

/// Log lines from the Rust side go to stderr, filtered by `KVPOOL_LOG` (tracing's env-filter
/// syntax) [warn]; plain text unless stderr is a terminal. Never fails: a host process that
/// installed its own subscriber keeps it.
fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("KVPOOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
