//! Interactive requests in flight on this server, and how batch work gives way to them.
//!
//! Each engine orders its own queue by priority, but the engines of one server share its
//! cores: a pass of batch embeddings slows a chat step beside it just as much as the chat
//! engine's own batch sequences would. So batch work also gives way to interactive work on
//! *other* engines: while any interactive request is in flight anywhere on the server
//! (submitted and not yet answered), an engine whose next pass would hold only batch work
//! waits between passes instead of starting it. The in-flight pass is never interrupted, so
//! batch passes are kept short (the embedding batcher caps them).
//!
//! While interactive traffic is recent ([`RECENT_INTERACTIVE`]), batch passes are also made
//! smaller (see the embedding batcher): a request arriving between others waits for less.
//!
//! This is vLLM's priority policy (lower classes run only on what higher ones leave) taken
//! across engines; TEI has no priorities. Unlike vLLM, batch work cannot starve: after
//! [`BATCH_MAX_YIELD`] of waiting in a row, one pass goes anyway.
//!
//! One counter per server, shared by its engines through an `Arc`; each interactive request
//! holds an [`InteractiveRequest`] while in flight, which counts it back out on `Drop`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The longest batch work waits in a row before one pass goes anyway: a server that is
/// never free of interactive requests still gives batch work about one pass in this time.
pub const BATCH_MAX_YIELD: Duration = Duration::from_millis(250);

/// How often a waiting engine looks again (it also wakes at once for a job of its own).
pub const YIELD_POLL: Duration = Duration::from_millis(1);

/// Interactive traffic counts as recent this long after a request was last in flight.
pub const RECENT_INTERACTIVE: Duration = Duration::from_secs(1);

/// How many interactive requests are in flight on the engines sharing this value, and when
/// one last was.
#[derive(Debug)]
pub struct InteractiveLoad {
    in_flight: AtomicUsize,
    /// Nanoseconds from `epoch` to the last time a request entered or left; 0: never.
    last_active_ns: AtomicU64,
    epoch: Instant,
}

impl InteractiveLoad {
    /// A counter of its own (an engine that shares its cores with no other engine).
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            last_active_ns: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// The one counter of this process: the server's engines all live in it.
    pub fn server() -> Arc<Self> {
        static SERVER: OnceLock<Arc<InteractiveLoad>> = OnceLock::new();
        Arc::clone(SERVER.get_or_init(InteractiveLoad::new))
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// When a request last entered or left (`None`: never).
    pub fn last_active(&self) -> Option<Instant> {
        match self.last_active_ns.load(Ordering::Acquire) {
            0 => None,
            ns => Some(self.epoch + Duration::from_nanos(ns)),
        }
    }

    /// Counts a request in until the returned value is dropped.
    pub fn enter(self: &Arc<Self>) -> InteractiveRequest {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.touch();
        InteractiveRequest {
            load: Arc::clone(self),
        }
    }

    fn touch(&self) {
        let ns = self.epoch.elapsed().as_nanos().clamp(1, u64::MAX as u128) as u64;
        self.last_active_ns.fetch_max(ns, Ordering::AcqRel);
    }
}

/// One interactive request in flight; dropping it counts the request out.
#[derive(Debug)]
pub struct InteractiveRequest {
    load: Arc<InteractiveLoad>,
}

impl Drop for InteractiveRequest {
    fn drop(&mut self) {
        self.load.touch();
        self.load.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An engine's side of the rule: asked before each pass that would hold only batch work.
#[derive(Debug)]
pub struct BatchYield {
    load: Arc<InteractiveLoad>,
    max_yield: Duration,
    /// When the current run of waiting began.
    waiting_since: Option<Instant>,
}

impl BatchYield {
    pub fn new(load: Arc<InteractiveLoad>, max_yield: Duration) -> Self {
        Self {
            load,
            max_yield,
            waiting_since: None,
        }
    }

    /// Whether interactive traffic is in flight or was within [`RECENT_INTERACTIVE`] of `now`:
    /// then batch passes are kept small.
    pub fn recently_busy(&self, now: Instant) -> bool {
        self.load.in_flight() > 0
            || self
                .load
                .last_active()
                .is_some_and(|t| now.saturating_duration_since(t) < RECENT_INTERACTIVE)
    }

    /// Whether a batch-only pass may start at `now`: yes when no interactive request is in
    /// flight, or when batch work has waited `max_yield` in a row (then the wait starts
    /// over). Callers holding interactive work of their own run it instead of asking.
    pub fn may_run(&mut self, now: Instant) -> bool {
        if self.load.in_flight() == 0 {
            self.waiting_since = None;
            return true;
        }
        let since = *self.waiting_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= self.max_yield {
            self.waiting_since = None;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_count_in_until_dropped() {
        let load = InteractiveLoad::new();
        let a = load.enter();
        let b = load.enter();
        assert_eq!(load.in_flight(), 2);
        drop(a);
        assert_eq!(load.in_flight(), 1);
        drop(b);
        assert_eq!(load.in_flight(), 0);
        // The server's counter is one value, whoever asks.
        assert!(Arc::ptr_eq(
            &InteractiveLoad::server(),
            &InteractiveLoad::server()
        ));
    }

    #[test]
    fn batch_passes_wait_while_interactive_work_is_in_flight() {
        let load = InteractiveLoad::new();
        let mut rule = BatchYield::new(Arc::clone(&load), Duration::from_millis(100));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(rule.may_run(at(0)), "nothing interactive in flight");
        let chat = load.enter();
        assert!(!rule.may_run(at(1)));
        assert!(!rule.may_run(at(50)));
        drop(chat);
        assert!(rule.may_run(at(51)), "the interactive request ended");
        // A new run of waiting starts from its own beginning, not the earlier one's.
        let embed = load.enter();
        assert!(!rule.may_run(at(120)));
        assert!(!rule.may_run(at(200)));
        drop(embed);
    }

    #[test]
    fn traffic_is_recent_for_a_second_after_the_last_request() {
        let load = InteractiveLoad::new();
        let rule = BatchYield::new(Arc::clone(&load), BATCH_MAX_YIELD);
        let start = Instant::now();
        assert!(!rule.recently_busy(start), "no request yet");
        let request = load.enter();
        assert!(
            rule.recently_busy(start + Duration::from_secs(10)),
            "in flight, however long"
        );
        drop(request);
        let ended = Instant::now();
        assert!(rule.recently_busy(ended + RECENT_INTERACTIVE / 2));
        assert!(!rule.recently_busy(ended + RECENT_INTERACTIVE));
    }

    #[test]
    fn batch_work_is_never_starved() {
        let load = InteractiveLoad::new();
        let mut rule = BatchYield::new(Arc::clone(&load), Duration::from_millis(100));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let _always_busy = load.enter();
        let passes: Vec<u64> = (0..=350).filter(|&ms| rule.may_run(at(ms))).collect();
        // One pass per 100 ms of waiting, each wait counted from the pass before.
        assert_eq!(passes, vec![100, 201, 302]);
    }
}
