//! How a Rust result crosses into Python without raising: batch calls return one entry per
//! item, and a failure is the tuple `(code, name, message)`; the Python layer turns it into
//! the typed exception (`kvpool.Client`) or the Mooncake error code (`kvpool.mooncake`).
//! Raising is the Python layer's choice, so a batch with one bad item still returns the rest.

use kvpool_client::ClientError;
use kvpool_proto::ErrorCode;
use pyo3::{prelude::*, IntoPyObjectExt};

/// The name the Python layer keys its exception classes and code tables on: the stable
/// `ErrorCode` name, except for a caller buffer too small, which has no wire code of its own
/// (it maps to `InvalidArgument`) but a different Mooncake code.
pub const BUFFER_TOO_SMALL: &str = "BufferTooSmall";

/// A failure as the Python layer receives it.
pub fn failure<'py>(
    py: Python<'py>,
    code: ErrorCode,
    name: &str,
    msg: &str,
) -> PyResult<Bound<'py, PyAny>> {
    (code as u16, name, msg).into_bound_py_any(py)
}

/// A client error as a failure tuple.
pub fn error<'py>(py: Python<'py>, e: &ClientError) -> PyResult<Bound<'py, PyAny>> {
    let name = match e {
        ClientError::BufferTooSmall { .. } => BUFFER_TOO_SMALL,
        _ => e.code().name(),
    };
    failure(py, e.code(), name, &e.to_string())
}

/// An invalid argument found before any request was sent.
pub fn invalid<'py>(py: Python<'py>, msg: &str) -> PyResult<Bound<'py, PyAny>> {
    failure(
        py,
        ErrorCode::InvalidArgument,
        ErrorCode::InvalidArgument.name(),
        msg,
    )
}

/// One entry per item: the success value converted, or the failure tuple.
pub fn list<'py, T, I>(py: Python<'py>, items: I) -> PyResult<Vec<Bound<'py, PyAny>>>
where
    I: IntoIterator<Item = Result<T, ClientError>>,
    T: IntoPyObject<'py>,
{
    items
        .into_iter()
        .map(|r| match r {
            Ok(v) => v.into_bound_py_any(py),
            Err(e) => error(py, &e),
        })
        .collect()
}

/// Every code the pool answers with, for the Python layer's tables: `{number: name}`.
#[pyfunction]
pub fn error_codes() -> Vec<(u16, &'static str)> {
    ErrorCode::ALL
        .iter()
        .map(|&c| (c as u16, c.name()))
        .collect()
}
