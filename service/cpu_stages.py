"""Where a request's CPU goes: per-thread-role and per-stage CPU time, off unless `cpu_stages` is on.

Throughput on a shared machine swings ±10% from run to run; CPU time per request does not, and a
thread's own CPU clock counts only that thread, whatever else runs. Two views:
  - threads: each thread the runtime starts is registered under a role (event_loop, decode,
    inference, log_writer, log_images, io); `snapshot` reads every thread's CPU clock, and the
    process's total, so the rest (BentoML's own threads, thread exits) shows as the difference.
    Reading clocks costs nothing per request: this view is always exact, even with stages off.
  - stages: named segments of code with no `await` inside (so nothing else runs on that thread in
    between) are timed with `time.thread_time_ns` at their boundaries: `clock = stages.clock()`,
    then `clock.lap("name")` after each segment. Off (the default), `clock()` returns a shared no-op.

GET /info shows `snapshot()` under "cpu" when the setting is on; bench/request_cost.py diffs two
snapshots over a load run and divides by the requests served.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable


class _Clock:
    __slots__ = ("_stages", "_last")

    def __init__(self, stages: "CpuStages"):
        self._stages = stages
        self._last = time.thread_time_ns()

    def lap(self, name: str) -> None:
        now = time.thread_time_ns()
        self._stages._add(name, now - self._last)
        self._last = now


class _NoClock:
    __slots__ = ()

    def lap(self, name: str) -> None:
        pass


_NO_CLOCK = _NoClock()


class CpuStages:
    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self._lock = threading.Lock()
        self._ns: dict[str, int] = {}
        self._calls: dict[str, int] = {}
        self._threads: dict[int, str] = {}  # threading ident -> role

    # threads ---------------------------------------------------------------------------------

    def register_thread(self, role: str) -> None:
        """Count the calling thread's CPU under `role` (call it on the thread, e.g. as a pool initializer)."""
        with self._lock:
            self._threads[threading.get_ident()] = role

    def initializer(self, role: str) -> Callable[[], None]:
        return lambda: self.register_thread(role)

    def thread_seconds(self) -> dict[str, float]:
        """CPU seconds so far of the registered threads, summed by role (threads that exited are gone)."""
        alive = {t.ident for t in threading.enumerate()}
        out: dict[str, float] = {}
        with self._lock:
            threads = list(self._threads.items())
        for ident, role in threads:
            if ident not in alive:
                continue
            try:
                seconds = time.clock_gettime(time.pthread_getcpuclockid(ident))
            except (OSError, AttributeError):  # the thread exited between the two reads; or not POSIX
                continue
            out[role] = out.get(role, 0.0) + seconds
        return out

    # stages ----------------------------------------------------------------------------------

    def clock(self) -> _Clock | _NoClock:
        return _Clock(self) if self.enabled else _NO_CLOCK

    def _add(self, name: str, ns: int) -> None:
        with self._lock:
            self._ns[name] = self._ns.get(name, 0) + ns
            self._calls[name] = self._calls.get(name, 0) + 1

    def snapshot(self) -> dict:
        t = os.times()
        with self._lock:
            stages = {name: {"seconds": ns / 1e9, "calls": self._calls[name]} for name, ns in self._ns.items()}
        return {"process_seconds": t.user + t.system, "threads": self.thread_seconds(), "stages": stages}
