//! Scheduling: the embedding batcher, the continuous-batching scheduler for generation,
//! the request priorities both honour, and how batch work gives way to interactive work
//! across the engines of one server.

pub mod compute_priority;
pub mod embed_batcher;
pub mod interactive;
pub mod priority;
pub mod scheduler;

pub use interactive::{BatchYield, InteractiveLoad, InteractiveRequest};
pub use priority::Priority;
pub use scheduler::SeqChunk;
