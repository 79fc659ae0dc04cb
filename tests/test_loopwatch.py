"""The client's loop watch (harness.loopwatch): each record's `read_stall` says how long the client's event loop was
held up between the send and the first token's read, which tells a client that read late from a server that wrote
late (both reach the client as one late read). Each side is made late on purpose: the client by blocking its loop,
the scripted server by a scripted TTFT; the product's own loop (uvloop where installed) runs the client."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

from adapters.scripted import make_adapter
from harness import kernel_time, metrics
from harness import loop as event_loop
from harness.calibrate import calibration_specs
from harness.calibration import ScriptConfig, serve_in_process
from harness.loopwatch import INTERVAL_S, LoopWatch
from harness.records import RequestRecord
from harness.runner import StopRule, Target, run_point
from workloads.arrival import LoadPoint

BLOCK_S = 0.3
REPO = Path(__file__).resolve().parents[1]


def test_a_blocked_loop_is_held_up_where_it_was_blocked_and_not_elsewhere() -> None:
    async def main() -> tuple[LoopWatch, float, float, float]:
        watch = LoopWatch()
        watch.start()
        t0 = time.perf_counter()
        await asyncio.sleep(0.1)
        start = time.perf_counter()
        time.sleep(BLOCK_S)
        end = time.perf_counter()
        await asyncio.sleep(0.1)
        watch.stop()
        return watch, t0, start, end

    watch, t0, start, end = event_loop.run(main())
    # a tick falls due within one interval of the block's start and cannot run before its end
    assert watch.held_up(start, end) >= BLOCK_S - INTERVAL_S - 0.002, watch.held_up(start, end)
    # the windows before and after the block do not see it (a machine stall of 0.1 s would be needed to fail)
    assert watch.held_up(t0, start - 0.01) < 0.1
    assert watch.held_up(end + 0.01, end + 0.09) < 0.1
    # a read just after the block waited it out (the bytes may have come at its start); one 50 ms later did not
    # wait on it: the loop ran on time in between
    assert watch.read_delay(t0, end + 0.001) >= BLOCK_S - INTERVAL_S - 0.002
    assert watch.read_delay(t0, end + 0.05) < 0.1
    # nothing can have waited from before it was sent
    assert watch.read_delay(end - 0.05, end + 0.001) <= 0.05 + 0.001 + 1e-9


def _one(url: str, rid: str, block: tuple[float, float] | None, stamped: bool = False) -> RequestRecord:
    """One streamed request through the runner; `block` = (after, for how long) the client's loop is blocked."""
    target = Target("scripted", url, make_adapter(), "scripted")
    spec = next(itertools.islice(calibration_specs(rid, 4), 1))

    async def main() -> RequestRecord:
        records: list[RequestRecord] = []
        if block is not None:
            asyncio.get_running_loop().call_later(block[0], time.sleep, block[1])
        await run_point(target, [spec], LoadPoint("concurrency", 1, "closed"), StopRule(), records.append,
                        time.perf_counter())  # fmt: skip
        return records[0]

    if stamped:
        return event_loop.run(main())
    # a connection without the kernel's arrival times (TLS, or not Linux): what the loop watch is for
    with mock.patch.object(kernel_time, "ENABLED", False):
        return event_loop.run(main())


def test_read_stall_tells_a_late_reader_from_a_late_writer() -> None:
    """The server's first token is due 300 ms after the request arrives. Once the client idles while it waits: the
    300 ms are the server's and its loop was not held up. Once the client blocks its loop from 50 to 450 ms: the
    token waits in the socket until the block ends, and the record says the loop was held up ~400 ms before it."""
    with serve_in_process(ScriptConfig(ttft=0.3, itl=0.005, output_tokens=4)) as url:
        writer = _one(url, "late-writer", None)
        reader = _one(url, "late-reader", (0.05, 0.4))
        # plain HTTP on Linux: reads keep the kernel's arrival time (harness.kernel_time.StampedTransport)
        stamped = _one(url, "stamped-reader", (0.05, 0.4), stamped=True)
    for r in (writer, reader):
        assert r.ok and r.read_stall is not None, (r.status, r.error)
    ttft_w = metrics.ttft(writer)
    assert ttft_w is not None and ttft_w >= 0.3
    assert writer.read_stall is not None and writer.read_stall < 0.1, (
        writer.read_stall
    )  # 0.2 s short of the TTFT
    assert reader.read_stall is not None and reader.read_stall >= 0.4 - INTERVAL_S - 0.05, reader.read_stall
    ttft_r = metrics.ttft(reader)
    assert ttft_r is not None and ttft_r >= 0.4, ttft_r  # read when the block ended, ~0.45 s
    # the same block with the kernel's stamps: the token is timed by its arrival (~0.3 s), no late read in it
    ttft_s = metrics.ttft(stamped)
    assert stamped.read_stall == 0.0 and ttft_s is not None and 0.3 <= ttft_s < 0.4, (
        stamped.read_stall,
        ttft_s,
    )


_SHARED_CORE = """
import asyncio, os, sys, time
from harness.loopwatch import LoopWatch

cpu, hog_nice = int(sys.argv[1]), int(sys.argv[2])
os.sched_setaffinity(0, {cpu})
hog = os.fork() if hog_nice >= 0 else 0
if hog_nice >= 0 and hog == 0:  # a process that never sleeps, on the same core, `hog_nice` below this one
    os.nice(hog_nice)
    while True:
        pass

async def main() -> float | None:
    watch = LoopWatch()
    watch.start()
    end = time.perf_counter() + 0.5
    while time.perf_counter() < end:  # the client's loop, busy and wanting the core the whole time
        pass
    watch.stop()
    return watch.cpu_wait

try:
    print(asyncio.run(main()))
finally:
    if hog:
        os.kill(hog, 9)
"""


def test_cpu_wait_is_the_share_of_time_the_loop_waited_for_a_core() -> None:
    """One core, the loop busy for 0.5 s. Beside a process that never sleeps at the same priority the scheduler
    shares the core, so the loop waits at least half the time; with that process 19 levels lower (what
    `--engine-nice 19` does to an engine) it waits a few percent more than alone (CFS weights 1024 vs 15). Other
    processes on the shared machine add to every case: each is the least of three runs, interleaved."""
    base = os.nice(0)
    if base > 0:
        pytest.skip(f"the tests run at nice {base}: a process 19 levels lower cannot be made")
    if not Path("/proc/thread-self/schedstat").exists():
        pytest.skip("this kernel has no schedstat: the run-queue wait cannot be read")
    cpu = min(os.sched_getaffinity(0))

    def wait(hog_nice: int) -> float:
        done = subprocess.run([sys.executable, "-c", _SHARED_CORE, str(cpu), str(hog_nice)], cwd=REPO,
                              capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        return float(done.stdout.strip())

    runs = [[wait(hog) for hog in (-1, 0, 19)] for _ in range(3)]
    alone, shared, below = (min(r[i] for r in runs) for i in range(3))
    assert shared >= 0.4 and alone < shared - 0.15, runs
    assert below < alone + (shared - alone) / 3, runs


def test_machine_cpu_counts_this_process_busy_time() -> None:
    """The machine's busy CPU-seconds include ours: half a second of spinning here shows in them, and no more
    CPU-seconds pass than the machine's CPUs can give in the wall time (one tick of slack each side)."""
    from harness.loopwatch import machine_cpu_s

    start, wall0, own0 = machine_cpu_s(), time.perf_counter(), time.process_time()
    if start is None:
        pytest.skip("/proc/stat cannot be read here")
    while time.process_time() - own0 < 0.5:
        pass
    end, wall = machine_cpu_s(), time.perf_counter() - wall0
    assert end is not None
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert 0.5 - 2 * tick <= end - start <= wall * (os.cpu_count() or 1) + 2 * tick
