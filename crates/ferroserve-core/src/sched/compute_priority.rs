//! The engines' threads compute at a lower CPU priority than the HTTP layer.
//!
//! A server's compute threads (the rayon pool every kernel splits its work over, the chat
//! engine's step loop, the embedding batcher) keep the cores busy whenever there is work,
//! while the HTTP layer (the Python event loop, granian's I/O threads) needs a core for a
//! fraction of a millisecond at a time: to refuse a request at capacity, to answer a probe,
//! to write a token. At equal priority such a wake-up waits behind the compute threads'
//! time slices, so a 503 that takes 0.2 ms of work took tens of ms at full load (bench/NOTES.md,
//! "Overload"). Running compute at nice `FERROSERVE_COMPUTE_NICE` (default
//! [`DEFAULT_COMPUTE_NICE`]; 0 turns this off) lets the scheduler run every short wake-up of
//! the HTTP layer first. It costs nothing when the machine has a core to spare, and compute
//! loses only the time the HTTP layer really uses. This is per thread (Linux `setpriority`
//! on a thread id); raising one's own nice value needs no privilege.

use std::sync::Once;

/// The nice value compute threads run at unless `FERROSERVE_COMPUTE_NICE` says otherwise.
pub const DEFAULT_COMPUTE_NICE: i32 = 10;

/// The environment variable that sets the compute threads' nice value (0 to 19).
pub const COMPUTE_NICE_ENV: &str = "FERROSERVE_COMPUTE_NICE";

/// The nice value compute threads get: the environment's, clamped to 0..=19, else the default.
pub fn compute_nice() -> i32 {
    parse_nice(std::env::var(COMPUTE_NICE_ENV).ok().as_deref())
}

fn parse_nice(value: Option<&str>) -> i32 {
    value
        .and_then(|v| v.trim().parse::<i32>().ok())
        .map_or(DEFAULT_COMPUTE_NICE, |n| n.clamp(0, 19))
}

/// Lowers the calling thread to [`compute_nice`] (only ever lowers: a thread already nicer
/// stays as it is). Errors are ignored: priority is an optimisation, never a failure.
pub fn lower_this_thread() {
    #[cfg(target_os = "linux")]
    {
        let nice = compute_nice();
        // SAFETY: plain syscalls on the calling thread's own id; no memory is shared.
        unsafe {
            let tid = libc::gettid() as libc::id_t;
            *libc::__errno_location() = 0;
            let current = libc::getpriority(libc::PRIO_PROCESS, tid);
            if *libc::__errno_location() == 0 && current < nice {
                libc::setpriority(libc::PRIO_PROCESS, tid, nice);
            }
        }
    }
}

/// The name rayon's global pool threads get (`/proc/PID/task/TID/comm`, `top -H`): without it
/// they inherit the embedding process's name (`python`), which per-thread CPU accounting
/// cannot tell from the event loop.
pub const POOL_THREAD_NAME: &str = "ferroserve-pool";

/// Lowers every thread of rayon's global pool, and names it [`POOL_THREAD_NAME`], once per
/// process (engines call it when they load; the pool's threads live as long as the process).
pub fn lower_compute_pool() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        rayon::broadcast(|_| {
            lower_this_thread();
            name_this_thread(POOL_THREAD_NAME);
        });
    });
}

/// Sets the calling thread's kernel-visible name (at most 15 bytes are kept). Errors are
/// ignored, as for the priority.
fn name_this_thread(name: &str) {
    #[cfg(target_os = "linux")]
    if let Ok(name) = std::ffi::CString::new(name) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string, which `name` is, for the call only.
        unsafe {
            libc::prctl(libc::PR_SET_NAME, name.as_ptr());
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn own_nice() -> i32 {
        // SAFETY: as above.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn a_thread_is_lowered_to_the_compute_nice_value_and_never_raised() {
        // A fresh thread, so the test runner's own threads keep their priority.
        let (before, after, again) = std::thread::spawn(|| {
            let before = own_nice();
            lower_this_thread();
            let after = own_nice();
            lower_this_thread();
            (before, after, own_nice())
        })
        .join()
        .unwrap();
        let expected = compute_nice().max(before);
        assert_eq!(after, expected, "nice {before} -> {after}, expected {expected}");
        assert_eq!(again, after, "a second call changes nothing");
    }

    #[test]
    fn the_pool_threads_are_lowered_and_named() {
        lower_compute_pool();
        let seen = rayon::broadcast(|_| {
            let comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
            (comm.trim().to_string(), own_nice())
        });
        assert_eq!(seen.len(), rayon::current_num_threads());
        for (comm, nice) in seen {
            assert_eq!(comm, POOL_THREAD_NAME);
            assert!(nice >= compute_nice(), "pool thread at nice {nice}");
        }
    }

    #[test]
    fn the_environment_value_is_clamped_to_the_nice_range() {
        // The parser `compute_nice` uses (the variable itself is not set here: tests run in
        // parallel and share the environment).
        assert_eq!(parse_nice(Some("25")), 19);
        assert_eq!(parse_nice(Some("-5")), 0);
        assert_eq!(parse_nice(Some(" 7 ")), 7);
        assert_eq!(parse_nice(Some("0")), 0);
        assert_eq!(parse_nice(Some("high")), DEFAULT_COMPUTE_NICE);
        assert_eq!(parse_nice(None), DEFAULT_COMPUTE_NICE);
    }
}
