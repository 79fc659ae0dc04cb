"""How long the client's event loop was held up: the bound on how late it read what arrived.

A read happens only when the event loop gets round to it. While the loop is held up (busy with other callbacks, or
the process waiting for a CPU on a shared machine) bytes wait in the socket, and on uvloop, which reads sockets
itself, the client stamps them when it reads them, not when they arrived (harness.kernel_time). `LoopWatch` puts a
callback on the loop every `interval_s` and notes how late each ran; a hold-up that ended as a request's first token
was read bounds how late the client read that token (`read_delay`, to within one tick). That separates a client
that read late from a server that wrote late, which the client's timestamps alone cannot: both arrive as one read
of many tokens (harness.reconcile uses it to say which side spent the time).

It also reads the loop thread's run-queue wait (Linux schedstat) at `start` and `stop`: `cpu_wait` is the share of
that span the client was ready to run but waited for a CPU, held off by other processes (an engine on the same
cores, a neighbour). High, it says why the loop was held up: the machine, not the client's own work.
"""

from __future__ import annotations

import asyncio
import os
import time
from bisect import bisect_left, bisect_right

__all__ = ["INTERVAL_S", "LoopWatch", "cpu_wait_s", "machine_cpu_s"]

INTERVAL_S = 0.005  # 200 callbacks/s: a few µs each, well under 0.1 % of a core
_FLOOR_S = 0.001  # lateness below this is the loop's timer resolution (uvloop ticks in whole ms); not kept
_NEAR_S = 2 * INTERVAL_S  # a tick that ran this close before a read ended the hold-up that read waited out


def cpu_wait_s(thread: bool = False) -> float | None:
    """Seconds this process's main thread (`thread`: the calling thread) has spent runnable but waiting for a CPU
    (Linux schedstat: starvation by other processes, not load); None where the kernel does not say."""
    try:
        with open("/proc/thread-self/schedstat" if thread else "/proc/self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def machine_cpu_s() -> float | None:
    """CPU-seconds the whole machine has spent busy, all CPUs together, including time the hypervisor gave to other
    guests (steal: on a shared VM, the neighbours); None where /proc/stat cannot be read. Minus what the processes
    under test used over a span, it is what everything else on the machine took from them."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait
    values = [int(v) for v in fields[1:9]]
    return (sum(values) - values[3] - values[4]) / tick


class LoopWatch:
    """Ticks on the running loop from `start()` to `stop()`. Times are absolute `time.perf_counter()`:
    `held_up(a, b)` is the longest a tick due in [a, b] ran late (counting one due and not yet run);
    `read_delay(sent, read)` bounds how late a read was."""

    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        self._loop = asyncio.get_running_loop()
        self.interval_s = interval_s
        self.due: list[float] = []  # when each late tick was due (ascending)
        self.late: list[float] = []  # how late it ran (s)
        self._next: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._began: tuple[float, float | None] | None = None
        self.cpu_wait: float | None = None  # share of start..stop the loop thread waited for a CPU

    def start(self) -> None:
        now = time.perf_counter()
        self._began = (now, cpu_wait_s(thread=True))
        self._arm(now)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._next = None
        if self._began is not None:
            (t0, w0), t1, w1 = self._began, time.perf_counter(), cpu_wait_s(thread=True)
            if w0 is not None and w1 is not None and t1 > t0:
                self.cpu_wait = (w1 - w0) / (t1 - t0)
            self._began = None

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

    def read_delay(self, sent: float, read: float) -> float:
        """At most how long bytes that arrived after `sent` can have waited for a read made at `read`.

        A read is late only by a hold-up that ends as the read happens: one tick is pending at a time, so a
        hold-up holds one tick, due at `d` (armed one interval earlier, so the hold-up began after `d - interval`),
        which runs when the hold-up ends, within one loop iteration of the read (`_NEAR_S`) or after it if it is
        still pending. The bound is `read - max(d - interval, sent)`; 0 when no hold-up ended near the read.
        Hold-ups earlier in the wait, while nothing had arrived, are not counted (`held_up` counts them)."""
        worst = 0.0
        i, j = bisect_left(self.due, sent - self.interval_s), bisect_right(self.due, read)
        for d, late in zip(self.due[i:j], self.late[i:j], strict=True):
            if d + late >= read - _NEAR_S:
                worst = max(worst, read - max(d - self.interval_s, sent))
        pending = self._next
        if pending is not None and pending <= read:  # held up at the read and still now
            worst = max(worst, read - max(pending - self.interval_s, sent))
        return worst
