//! Scheduling: the embedding batcher, the continuous-batching scheduler for generation,
//! and the request priorities both honour.

pub mod embed_batcher;
pub mod priority;
pub mod scheduler;

pub use priority::Priority;
