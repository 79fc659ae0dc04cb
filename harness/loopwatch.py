"""How long the client's event loop was held up: the bound on how late it read what arrived.

A read happens only when the event loop gets round to it. While the loop is held up (busy with other callbacks, or
the process waiting for a CPU on a shared machine) bytes wait in the socket, and on uvloop, which reads sockets
itself, the client stamps them when it reads them, not when they arrived (harness.kernel_time). `LoopWatch` puts a
callback on the loop every `interval_s` and notes how late each ran; the longest hold-up of a tick due between a
request's send and its first token's read bounds how late the client read that token (to within one tick). That
separates a client that read late from a server that wrote late, which the client's timestamps alone cannot: both
arrive as one read of many tokens (harness.reconcile uses it to say which side spent the time).
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left, bisect_right

__all__ = ["INTERVAL_S", "LoopWatch"]

INTERVAL_S = 0.005  # 200 callbacks/s: a few µs each, well under 0.1 % of a core
_FLOOR_S = 0.001  # lateness below this is the loop's timer resolution (uvloop ticks in whole ms); not kept


class LoopWatch:
    """Ticks on the running loop from `start()` to `stop()`; `held_up(a, b)` is the longest a tick due in [a, b]
    (absolute `time.perf_counter()`) ran late, counting one that is due and has not run yet."""

    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        self._loop = asyncio.get_running_loop()
        self.interval_s = interval_s
        self.due: list[float] = []  # when each late tick was due (ascending)
        self.late: list[float] = []  # how late it ran (s)
        self._next: float | None = None
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._arm(time.perf_counter())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._next = None

    def _arm(self, now: float) -> None:
        self._next = now + self.interval_s
        self._handle = self._loop.call_later(self.interval_s, self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._next is not None and now - self._next > _FLOOR_S:
            self.due.append(self._next)
            self.late.append(now - self._next)
        self._arm(now)

    def held_up(self, start: float, end: float) -> float:
        i, j = bisect_left(self.due, start), bisect_right(self.due, end)
        worst = max(self.late[i:j], default=0.0)
        pending = self._next
        if pending is not None and start <= pending <= end:  # due inside the window and still waiting to run
            worst = max(worst, time.perf_counter() - pending)
        return worst
