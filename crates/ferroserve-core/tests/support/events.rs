//! Driving a `ChatEngine` from a test: wait on its notifier, collect every request's
//! choices, and abort a test that hangs.

use std::collections::HashMap;
use std::io::Read;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::time::Duration;

use ferroserve_core::engine::{ChatEngine, ChatEvent, FinishReason, TokenLogprob};
use ferroserve_core::ErrorKind;

/// Aborts the test process if a test hangs (a deadlocked engine would otherwise block the
/// event read forever), unless the returned guard is dropped first: when the test returns or
/// panics. (A watchdog that outlived its test would abort the whole binary `limit` after that
/// test started, killing whichever sibling tests were still running.)
#[must_use = "the watchdog is disarmed when this guard is dropped"]
pub struct Watchdog(#[allow(dead_code)] std::sync::mpsc::Sender<()>);

pub fn watchdog(limit: Duration) -> Watchdog {
    let (disarm, armed) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = armed.recv_timeout(limit) {
            eprintln!("test timed out after {limit:?}");
            std::process::abort();
        }
    });
    Watchdog(disarm)
}

/// Blocks on the notifier's fd, then drains.
pub fn next_events(engine: &ChatEngine) -> Vec<ChatEvent> {
    // SAFETY: the fd stays owned by the notifier; ManuallyDrop never closes it.
    let mut pipe = ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(engine.notifier().fd()) });
    let mut buf = [0u8; 64];
    let _ = pipe.read(&mut buf).unwrap();
    engine.notifier().drain()
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Choice {
    pub text: String,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<FinishReason>,
    pub completion_tokens: usize,
    pub deltas: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub choices: HashMap<(u64, u32), Choice>,
    pub admitted: HashMap<u64, (usize, usize)>,
    pub errors: HashMap<u64, ErrorKind>,
}

/// Collects events until every request has `n` finished choices (or an error).
pub fn collect(engine: &ChatEngine, expected: &HashMap<u64, usize>) -> Outcome {
    let mut out = Outcome::default();
    let done = |out: &Outcome| {
        expected.iter().all(|(&id, &n)| {
            out.errors.contains_key(&id)
                || (0..n as u32).all(|i| {
                    out.choices
                        .get(&(id, i))
                        .is_some_and(|c| c.finish.is_some())
                })
        })
    };
    while !done(&out) {
        for event in next_events(engine) {
            match event {
                ChatEvent::Admitted {
                    request_id,
                    prompt_tokens,
                    cached_tokens,
                } => {
                    assert!(
                        out.admitted
                            .insert(request_id, (prompt_tokens, cached_tokens))
                            .is_none(),
                        "admitted twice"
                    );
                }
                ChatEvent::Delta {
                    request_id,
                    index,
                    text,
                    token_ids,
                    logprobs,
                } => {
                    let c = out.choices.entry((request_id, index)).or_default();
                    assert!(c.finish.is_none(), "delta after finish");
                    c.text.push_str(&text);
                    c.deltas.push(text);
                    c.tokens.extend(token_ids);
                    c.logprobs.extend(logprobs);
                }
                ChatEvent::Finished {
                    request_id,
                    index,
                    finish_reason,
                    usage,
                } => {
                    let c = out.choices.entry((request_id, index)).or_default();
                    assert!(c.finish.replace(finish_reason).is_none(), "finished twice");
                    c.completion_tokens = usage.completion_tokens;
                }
                ChatEvent::Error {
                    request_id, kind, ..
                } => {
                    out.errors.insert(request_id, kind);
                }
            }
        }
    }
    out
}
