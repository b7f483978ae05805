//! Scheduling: the embedding batcher (continuous batching for chat comes later).

pub mod embed_batcher;
pub mod scheduler;
