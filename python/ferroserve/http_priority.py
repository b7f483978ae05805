"""Real-time priority for the HTTP layer's threads, when the operator allows it (Linux).

A refusal at capacity is 0.2 ms of work inside the handler, but it needs four thread wake-ups
in a row: granian's I/O thread (the request's bytes), its blocking thread (takes the GIL and
hands the request to the event loop), the event loop thread (the handler), granian's I/O thread
again (the answer's bytes). The engines' compute threads run at a higher nice value
(`FERROSERVE_COMPUTE_NICE`), which puts the HTTP threads first among *this process's* threads
only: with autogroups on (`/proc/sys/kernel/sched_autogroup_enabled`, the default of most
distributions) the scheduler first shares a CPU between sessions, and the server's session,
its compute threads always runnable, has used its share whenever an HTTP thread wakes, so the
wake-up waits for other sessions' time slices (bench/NOTES.md, "The prober's tail": 10-25 ms at
p99 with the machine at load 11). A real-time policy is outside that sharing: the thread runs as
soon as it wakes.

`FERROSERVE_HTTP_RT_PRIORITY=N` (1-99; default 0, off) puts those threads in SCHED_RR at
priority N. It needs CAP_SYS_NICE or an RLIMIT_RTPRIO of at least N (systemd: `LimitRTPRIO=`,
`AmbientCapabilities=CAP_SYS_NICE`); without it the server logs one warning and runs as before.
What gets it: the event loop thread (with SCHED_RESET_ON_FORK, so the executor threads it starts
for file I/O and batch tokenizing do not) and granian's threads (started after the engines: the
threads *they* start inherit it). Never the engines' compute threads. The HTTP threads use
≈ 1-3 % of a CPU under overload; the kernel's RT throttling (95 % of each second by default) still
bounds a runaway one.

With it, CPython's GIL switch interval drops from 5 ms to `GIL_SWITCH_INTERVAL_S` (0.5 ms): a
real-time thread that needs the GIL (granian's thread handing over a request) otherwise waits
up to a whole interval for a normal thread holding it (the event loop answering, the store
thread), a priority inversion. Quiet, 3x overload, same prober: refusal p99 10.1 ms at 5 ms,
2.4 ms at 0.5 ms (bench/NOTES.md, "The prober's tail", session 12's quiet runs)."""

from __future__ import annotations

import asyncio
import os
import sys

from ferroserve.log import logger

PRIORITY_ENV = "FERROSERVE_HTTP_RT_PRIORITY"
# granian starts its threads after the app's __rsgi_init__ returns, so they are looked for a
# moment after it: the new nice-0 threads then. (At the loop's first turn only two of its three
# exist yet; the third, started by one of them, inherits the policy either way.) A thread the
# event loop started within that second (an executor thread: batch or file work only) would be
# taken for one of granian's.
GRANIAN_THREADS_AFTER_S = 1.0
GIL_SWITCH_INTERVAL_S = 0.0005


def priority() -> int:
    """The RT priority asked for: the environment's, clamped to 0..99; 0 (off) when unset or bad."""
    try:
        return min(max(int(os.environ.get(PRIORITY_ENV, "0").strip()), 0), 99)
    except ValueError:
        return 0


def thread_ids() -> set[int]:
    """The ids of this process's threads now (empty where there is no procfs)."""
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def _set_rr(tid: int, prio: int, reset_on_fork: bool) -> None:
    policy = os.SCHED_RR | (os.SCHED_RESET_ON_FORK if reset_on_fork else 0)
    os.sched_setscheduler(tid, policy, os.sched_param(prio))


def start(loop: asyncio.AbstractEventLoop) -> None:
    """Called on the event loop thread at the end of `__rsgi_init__`, after the engines' threads
    started: this thread now, granian's threads (those started from now on at nice 0) in a
    moment. Does nothing unless `FERROSERVE_HTTP_RT_PRIORITY` is set."""
    prio = priority()
    if not prio or sys.platform != "linux":
        return
    before = thread_ids()
    try:
        _set_rr(0, prio, reset_on_fork=True)  # 0: the calling thread
    except OSError as exc:
        logger.warning("http threads keep their priority", extra={"fields": {
            "reason": f"SCHED_RR {prio} refused ({exc.strerror}): needs CAP_SYS_NICE or RLIMIT_RTPRIO >= {prio}"}})
        return
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)

    def granian_threads() -> None:
        done = []
        for tid in sorted(thread_ids() - before):
            try:
                if os.getpriority(os.PRIO_PROCESS, tid) == 0 and os.sched_getscheduler(tid) == os.SCHED_OTHER:
                    _set_rr(tid, prio, reset_on_fork=False)
                    done.append(tid)
            except OSError:  # the thread ended meanwhile
                continue
        logger.info("http threads at real-time priority", extra={"fields": {
            "priority": prio, "threads": 1 + len(done), "gil_switch_interval_ms": sys.getswitchinterval() * 1000}})

    loop.call_later(GRANIAN_THREADS_AFTER_S, granian_threads)
