"""Arrival times from the kernel (SO_TIMESTAMPNS on Linux): a process that reads late still times bytes by when they
arrived. The scripted server times a request from its arrival, so its own late read is lag it reports rather than
error charged to the client; the client stamps a read by when its bytes arrived, so a busy
client does not stretch the engine's latencies. Each side is made late on purpose by blocking its event loop."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from adapters.scripted import make_adapter
from harness import loop as event_loop
from harness.calibrate import calibration_specs
from harness.calibration import ScriptConfig, ScriptedServer, fetch_stats, serve_in_process
from harness.client import Target, make_session, send_request, timeouts_for

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="kernel receive timestamps are read on Linux only"
)

BLOCK_S = 0.2


@pytest.fixture()
def server_in_thread() -> Iterator[tuple[str, asyncio.AbstractEventLoop]]:
    """The scripted server on an event loop in a thread of this process, so the test can block that loop."""
    loop = asyncio.new_event_loop()
    ready, box = threading.Event(), {}
    stop = asyncio.Event()

    async def main() -> None:
        async with ScriptedServer(ScriptConfig(ttft=0.05, itl=0.005, output_tokens=4)) as srv:
            box["url"] = srv.url
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield box["url"], loop
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def test_the_server_times_a_request_from_its_arrival_not_its_late_read(
    server_in_thread: tuple[str, asyncio.AbstractEventLoop],
) -> None:
    url, loop = server_in_thread
    blocked = threading.Event()

    def block() -> None:
        blocked.set()
        time.sleep(BLOCK_S)

    loop.call_soon_threadsafe(block)
    assert blocked.wait(5)
    body = {
        "model": "scripted",
        "prompt": "hi",
        "max_tokens": 4,
        "ignore_eos": True,
        "request_id": "late-read",
    }
    req = urllib.request.Request(
        f"{url}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    sent = time.monotonic()
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    stats = fetch_stats(url, detail=True)
    entry: dict[str, Any] = stats["per_request"]["late-read"]
    # read ~0.2 s late, timed from the arrival: within 5 ms of the send (loopback), the delay reported as intake
    assert abs(entry["t0"] - sent) < 0.005, entry["t0"] - sent
    assert entry["intake_ms"] > BLOCK_S * 1000 * 0.7, entry
    assert stats["intake_ms"]["max"] > BLOCK_S * 1000 * 0.7
    # the answer was due 65 ms after arrival and left after the block: the lateness is the server's, reported
    assert entry["lags_ms"][-1] > (BLOCK_S - 0.065) * 1000 * 0.7, entry["lags_ms"]


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_the_client_stamps_a_read_by_its_arrival(loop_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks due at 50, 150 and 250 ms after the request arrives; the client's loop is blocked from 80 to 200 ms, so
    the 150 ms chunk waits in the socket, and again from 230 to 330 ms, so the last chunk and `[DONE]` wait too.
    The record says each came when it arrived (the kernel's time), not when it was read; `done_read` says when the
    end was read. On both event loops: the client reads its plain-HTTP sockets itself (`StampedTransport`)."""
    monkeypatch.setenv(event_loop.ENV, loop_name)
    if loop_name == "uvloop":
        pytest.importorskip("uvloop")
    with serve_in_process(ScriptConfig(ttft=0.05, itl=0.1, output_tokens=3)) as url:
        target = Target("scripted", url, make_adapter(), "scripted")
        spec = next(calibration_specs("stamped", 3))

        async def main() -> tuple[float, Any]:
            loop = asyncio.get_running_loop()
            run_start = time.perf_counter()
            async with make_session(target) as session:
                loop.call_later(0.08, time.sleep, 0.12)
                loop.call_later(0.23, time.sleep, 0.1)
                rec = await send_request(
                    session, target, spec, point="p", phase="measure", scheduled=0.0, run_start=run_start,
                    timeout=timeouts_for(True, 5.0, 10.0),
                )  # fmt: skip
            return run_start, rec

        run_start, rec = event_loop.run(main())
        truth = fetch_stats(url, detail=True)["per_request"][spec.request_id]
    assert rec.ok, rec.error
    assert sum(rec.chunk_tokens) == 3 and len(rec.chunk_times) == 3, (rec.chunk_times, rec.chunk_tokens)
    # the server's clock is the same CLOCK_MONOTONIC as the client's perf_counter: compare absolute times
    writes = [truth["t0"] + 0.05 + 0.1 * j + lag / 1000.0 for j, lag in enumerate(truth["lags_ms"])]
    got = [run_start + t for t in rec.chunk_times]
    # each chunk within 3 ms of its write, the ones that waited in the socket included (50-80 ms late otherwise)
    for g, w in zip(got, writes, strict=True):
        assert abs(g - w) < 0.003, ([g - w for g, w in zip(got, writes, strict=True)], truth["lags_ms"])
    # the end came with the last chunk (~250 ms) and was read when the second block ended (~330 ms)
    assert rec.done is not None and rec.done_read is not None
    assert abs(run_start + rec.done - writes[-1]) < 0.003, run_start + rec.done - writes[-1]
    assert rec.done_read - rec.done > 0.05, (rec.done, rec.done_read)


def test_the_servers_stamped_sockets_send_each_chunk_at_once() -> None:
    """The stamped accepted sockets set TCP_NODELAY themselves (asyncio skips sockets not marked IPPROTO_TCP).
    Without it Nagle held back small chunks of back-to-back requests: TTFT 41-44 ms against 20 ms scripted, 11-12
    tokens arriving in one read."""
    with serve_in_process(ScriptConfig(ttft=0.02, itl=0.002, output_tokens=16)) as url:
        target = Target("scripted", url, make_adapter(), "scripted")

        async def main() -> list[Any]:
            run_start = time.perf_counter()
            recs = []
            async with make_session(target) as session:  # one keep-alive connection, requests back to back
                for spec in itertools.islice(calibration_specs("nodelay", 16), 6):
                    rec = await send_request(
                        session, target, spec, point="p", phase="measure",
                        scheduled=time.perf_counter() - run_start, run_start=run_start,
                        timeout=timeouts_for(True, 5.0, 10.0),
                    )  # fmt: skip
                    recs.append(rec)
            return recs

        recs = asyncio.run(main())
    # Nagle: 16 tokens in ~5 reads, first token 41-44 ms. Sent at once: one read per token, except where the
    # client itself read late on a busy machine (CI: one read of 3 tokens), so at least 10 reads and TTFT < 35 ms.
    for rec in recs:
        assert rec.ok, rec.error
        ttft = rec.chunk_times[0] - rec.scheduled
        assert ttft < 0.035, (rec.request_id, ttft)
        assert len(rec.chunk_tokens) >= 10, (rec.request_id, rec.chunk_tokens)
