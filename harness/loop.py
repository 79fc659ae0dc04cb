"""The event loop the client runs on: uvloop where it is installed, asyncio's own otherwise.

Measured side by side (benchmarks/README.md, `python -m benchmarks.peers`): at 256 concurrent streams the TTFT error
p99 was 29–58 ms on uvloop against 94–116 ms on asyncio's selector loop in alternating runs, the client CPU per token
the same within noise. The difference is the first wave: 256 requests leave at once, and uvloop opens and
registers their connections in C, so the last of them goes out sooner. Sub-millisecond waits do not rely on the
loop's timers on either loop (uvloop's tick in whole milliseconds, asyncio's epoll timeout too): the runner's
`PreciseWaker` arms a timerfd. On Linux the client's plain-HTTP sockets are read by
`harness.kernel_time.StampedTransport` on either loop (reads keep the kernel's arrival time).

`ENGINEBENCH_LOOP=asyncio` (or `uvloop`) chooses, `ENGINEBENCH_READ_TICK_MS` sets the read tick (0.5 ms; 0: off);
the manifest records both (`host.event_loop`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from harness.errors import ConfigError

__all__ = ["ENV", "READ_TICK_ENV", "loop_name", "read_tick_s", "run"]

ENV = "ENGINEBENCH_LOOP"
T = TypeVar("T")


def _choice() -> str:
    want = os.environ.get(ENV, "").strip().lower() or "auto"
    if want not in ("auto", "uvloop", "asyncio"):
        raise ConfigError(f"{ENV}={want!r} is not an event loop; use uvloop or asyncio (or unset it)")
    return want


def _factory() -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    want = _choice()
    if want == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError:
        if want == "uvloop":
            raise ConfigError(f"{ENV}=uvloop but uvloop is not installed; pip install uvloop") from None
        return "asyncio", None
    return f"uvloop {uvloop.__version__}", uvloop.new_event_loop


READ_TICK_ENV = "ENGINEBENCH_READ_TICK_MS"
READ_TICK_S = (
    0.0005  # the default: at most one wake-up of the client's loop per 0.5 ms (harness.runner.ReadPacer)
)


def read_tick_s() -> float:
    """How often, at most, the client's loop wakes up to read where reads keep the kernel's arrival time
    (`harness.runner.ReadPacer`): `READ_TICK_S`, or `ENGINEBENCH_READ_TICK_MS` (0 turns it off)."""
    raw = os.environ.get(READ_TICK_ENV, "").strip()
    if not raw:
        return READ_TICK_S
    try:
        tick = float(raw) / 1000.0
    except ValueError:
        tick = -1.0
    if not 0.0 <= tick <= 0.005:
        raise ConfigError(
            f"{READ_TICK_ENV}={raw!r} is not a tick of 0-5 ms; use e.g. 0.5, or 0 to wake for every read"
        )
    return tick


def loop_name() -> str:
    """What `run` will use, e.g. "uvloop 0.23.0" or "asyncio", and the read tick where one is set:
    "uvloop 0.23.0 (plain-HTTP reads at most every 0.5 ms)"."""
    name, tick = _factory()[0], read_tick_s()
    return f"{name} (plain-HTTP reads at most every {tick * 1000:g} ms)" if tick > 0 else name


def run(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(coro)` on the chosen loop."""
    try:
        _, factory = _factory()
    except ConfigError:
        coro.close()  # never started: no "was never awaited" warning beside the error
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)
