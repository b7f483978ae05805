//! `InteractiveRequest`: an interactive request in flight on this server, from the moment
//! the HTTP layer takes it (before any engine sees it) until it is answered. Batch work on
//! every engine of the process waits while one is open (`ferroserve_core::sched::interactive`).

use std::sync::Mutex;

use ferroserve_core::{InteractiveLoad, InteractiveRequest};
use pyo3::prelude::*;

#[pyclass(name = "InteractiveRequest", module = "ferroserve._core", frozen)]
pub struct PyInteractiveRequest {
    /// `None` once closed.
    inner: Mutex<Option<InteractiveRequest>>,
}

#[pymethods]
impl PyInteractiveRequest {
    /// Counts a request in (until `close()`, or until the object is dropped).
    #[new]
    fn new() -> Self {
        Self { inner: Mutex::new(Some(InteractiveLoad::server().enter())) }
    }

    /// Counts the request out; closing twice does nothing.
    fn close(&self) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Interactive requests in flight on this process's engines (HTTP layer included).
    #[staticmethod]
    fn in_flight() -> usize {
        InteractiveLoad::server().in_flight()
    }
}
