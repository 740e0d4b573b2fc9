//! The one tokio runtime every client and embedded node of the process runs on.
//!
//! Python threads call in concurrently; each call detaches from the interpreter (releasing
//! the GIL) and blocks on its future here, so many Python threads drive many requests at once
//! while the runtime's workers move the bytes.

use std::{future::Future, sync::OnceLock};

use pyo3::{exceptions::PyRuntimeError, PyResult, Python};
use tokio::runtime::Runtime;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The process's runtime, built on first use (so a process that forks before touching kvpool
/// gives each child its own).
pub fn runtime() -> PyResult<&'static Runtime> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kvpool")
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the kvpool runtime: {e}")))?;
    // A racing thread may have won; its runtime is the one kept, ours is dropped unused.
    Ok(RUNTIME.get_or_init(|| rt))
}

/// Runs `fut` to completion with the interpreter released, so other Python threads run
/// meanwhile.
pub fn block_on<F>(py: Python<'_>, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    let rt = runtime()?;
    Ok(py.detach(|| rt.block_on(fut)))
}
