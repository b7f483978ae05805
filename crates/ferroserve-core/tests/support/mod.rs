//! Helpers shared by the scheduler and chat-engine test crates (`mod support;`).

pub mod events;
pub mod fakes;
