//! Completion queue with a pollable wake-up fd.
//!
//! Engine threads push finished events here; the Python side watches `fd()` with its
//! event loop, and on wake-up reads the pipe and takes every queued event in one call.
//! At most one wake-up byte is outstanding per batch of events, so the pipe never fills
//! and the consumer crosses into the engine once per wake-up, not once per event.

use std::io::{PipeReader, PipeWriter, Write};
use std::sync::Mutex;

pub struct Notifier<T> {
    queue: Mutex<Vec<T>>,
    writer: Mutex<PipeWriter>,
    reader: PipeReader,
}

impl<T> Notifier<T> {
    pub fn new() -> std::io::Result<Self> {
        let (reader, writer) = std::io::pipe()?;
        Ok(Self { queue: Mutex::new(Vec::new()), writer: Mutex::new(writer), reader })
    }

    /// Queues events; writes a wake-up byte if the queue was empty.
    pub fn push_all(&self, events: impl IntoIterator<Item = T>) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let was_empty = q.is_empty();
        q.extend(events);
        if was_empty && !q.is_empty() {
            // A failed write only means the consumer is gone; nothing to wake.
            let _ = self.writer.lock().unwrap_or_else(|p| p.into_inner()).write_all(&[1]);
        }
    }

    pub fn push(&self, event: T) {
        self.push_all(std::iter::once(event));
    }

    /// Takes every queued event. The consumer must read the wake-up byte(s) from the fd
    /// *before* calling this, so an event pushed afterwards always writes a fresh byte.
    pub fn drain(&self) -> Vec<T> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The read end of the wake-up pipe.
    #[cfg(unix)]
    pub fn fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.reader.as_raw_fd()
    }
}
