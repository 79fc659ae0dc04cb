"""Which HTTP client should stream for EngineBench: client CPU per 100k SSE events and timestamp error, by library.

A raw asyncio SSE server runs in its own process (so its CPU is not counted) and streams OpenAI-style chunks, one
HTTP chunk per event at a fixed interval per stream, each carrying the server's `perf_counter()` at write time
(perf_counter is system-wide monotonic on Linux, so client and server times compare). Each client reads the body
with its own streaming API, feeds `harness.sse.SSEParser`, parses every event with orjson and records
`receive - send` for the first event of each read: that is the timing error the client adds (kernel + event loop +
library). Client CPU is `time.process_time()` of the client process.

Clients: `aiohttp` (readany), `httpx` (aiter_raw), `harness` (`harness.runner.run_point`, closed loop, the real hot
path with the codec; its error column is the inter-chunk gap minus the scripted interval), `harness-mpN` (the same in
N worker processes; CPU is the sum over them), and the connection rows (short requests, fresh connection vs
keep-alive: the per-request cost).

    .venv/bin/python benchmarks/http_libs.py --streams 32 --events 400 --interval-ms 5
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

__all__ = ["main", "run"]


# -- server (own process) ---------------------------------------------------------------------------------------
async def _serve_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = orjson.loads(await reader.readexactly(length)) if length else {}
            events, interval = int(body.get("events", 10)), float(body.get("interval", 0.005))
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                b"Connection: keep-alive\r\n\r\n"
            )
            start = time.perf_counter()
            for i in range(events):
                delay = start + i * interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                ev = (
                    b'data: {"choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":'
                    + (b'"length"' if i == events - 1 else b"null")
                    + b'}],"t":'
                    + repr(time.perf_counter()).encode()
                    + b"}\n\n"
                )
                writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                await writer.drain()
            done = (
                b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":%d}}\n\ndata: [DONE]\n\n'
                % events
            )
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _server_main(port_q: Any, stop: Any) -> None:
    async def amain() -> None:
        srv = await asyncio.start_server(_serve_conn, "127.0.0.1", 0, backlog=4096)
        port_q.put(srv.sockets[0].getsockname()[1])
        while not stop.is_set():
            await asyncio.sleep(0.1)
        srv.close()

    asyncio.run(amain())


# -- clients ----------------------------------------------------------------------------------------------------
class _Stats:
    def __init__(self) -> None:
        self.events = 0
        self.errors: list[float] = []
        self.failed = 0

    def read(self, payloads: list[bytes], t: float) -> None:
        first = True
        for p in payloads:
            if p == b"[DONE]":
                continue
            obj = orjson.loads(p)
            if "t" in obj:
                self.events += 1
                if first:
                    self.errors.append(t - obj["t"])
                    first = False


async def _aiohttp_client(url: str, body: bytes, streams: int, per: int, stats: _Stats) -> None:
    import aiohttp

    from harness.sse import SSEParser

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def one() -> None:
            for _ in range(per):
                parser = SSEParser()
                async with session.post(url, data=body) as resp:
                    while data := await resp.content.readany():
                        stats.read(parser.feed(data), time.perf_counter())

        await asyncio.gather(*(one() for _ in range(streams)))


async def _httpx_client(url: str, body: bytes, streams: int, per: int, stats: _Stats) -> None:
    import httpx

    from harness.sse import SSEParser

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one() -> None:
            for _ in range(per):
                parser = SSEParser()
                async with client.stream("POST", url, content=body) as resp:
                    async for data in resp.aiter_raw():
                        stats.read(parser.feed(data), time.perf_counter())

        await asyncio.gather(*(one() for _ in range(streams)))


class BenchCodec:
    """The OpenAI codec with a fixed body (module level: worker processes unpickle it)."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params

    def build(self, spec: Any, model: str, stream: bool) -> Any:
        from adapters.base import HttpCall

        return HttpCall("POST", "/", self.params, stream)

    def parse_event(self, data: bytes) -> Any:
        from adapters.openai import parse_openai_event

        return parse_openai_event(data)

    def parse_response(self, body: bytes) -> Any:
        from adapters.openai import parse_openai_response

        return parse_openai_response(body)


async def _harness_run(
    url: str, body: bytes, streams: int, per: int, stats: _Stats, processes: int
) -> tuple[float, float]:
    """The real thing: `run_point` closed loop at `streams`; returns (client CPU seconds, ITL error p50, p99 ms)."""
    from harness.records import RequestRecord
    from harness.runner import StopRule, Target, run_point
    from workloads.arrival import LoadPoint
    from workloads.spec import RequestSpec

    params = orjson.loads(body)
    interval = float(params["interval"])
    target = Target("bench", url.rstrip("/"), BenchCodec(params), "m")
    specs = [RequestSpec(f"r{i}", "chat", 1) for i in range(streams * per)]
    records: list[RequestRecord] = []
    outcome = await run_point(
        target,
        specs,
        LoadPoint("concurrency", streams, "closed"),
        StopRule(stall_timeout_s=30, request_timeout_s=300),
        records.append,
        time.perf_counter(),
        processes=processes,
    )
    wall = outcome.ended - outcome.started  # the point itself, not the worker processes' start-up
    for rec in records:
        stats.events += sum(rec.chunk_tokens)
        stats.failed += not rec.ok
        for k in range(1, len(rec.chunk_times)):
            gap = rec.chunk_times[k] - rec.chunk_times[k - 1]
            stats.errors.append(gap - interval * rec.chunk_tokens[k])
    return sum(c.mean_util for c in outcome.per_process_cpu or (outcome.client_cpu,)) * wall, wall


async def _connect_cost(url: str, n: int, fresh: bool) -> tuple[float, float]:
    """(CPU ms per request, median ms to first event) for `n` one-event requests, sequential."""
    import aiohttp

    from harness.sse import SSEParser

    body = orjson.dumps({"events": 1, "interval": 0})
    ttfb: list[float] = []
    conn = aiohttp.TCPConnector(limit=0, force_close=fresh)
    async with aiohttp.ClientSession(connector=conn) as session:
        cpu0 = time.process_time()
        for _ in range(n):
            t0 = time.perf_counter()
            parser = SSEParser()
            async with session.post(url, data=body) as resp:
                first = None
                while data := await resp.content.readany():
                    if parser.feed(data) and first is None:
                        first = time.perf_counter() - t0
            ttfb.append(first or 0.0)
        cpu = time.process_time() - cpu0
    return cpu / n * 1e3, statistics.median(ttfb) * 1e3


Client = Callable[[str, bytes, int, int, _Stats], Coroutine[Any, Any, None]]
CLIENTS: dict[str, Client] = {"aiohttp": _aiohttp_client, "httpx": _httpx_client}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run(
    streams: int, events: int, interval_ms: float, per: int, libs: list[str], connect_n: int
) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    port_q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_server_main, args=(port_q, stop), daemon=True)
    proc.start()
    rows: list[dict[str, Any]] = []
    try:
        url = f"http://127.0.0.1:{port_q.get(timeout=30)}/"
        body = orjson.dumps({"events": events, "interval": interval_ms / 1000})
        import importlib.util

        import aiohttp  # noqa: F401  (imported before timing: import cost is not streaming cost)

        if importlib.util.find_spec("httpx") is None:  # not a dependency: `pip install httpx` to compare
            libs = [name for name in libs if name != "httpx"]
        else:
            import httpx  # noqa: F401

        import harness.client  # noqa: F401

        for name in libs:
            stats = _Stats()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            if name.startswith("harness"):  # "harness" or "harness-mpN": run_point in N processes
                procs = int(name.removeprefix("harness-mp") or 1) if name != "harness" else 1
                cpu, wall = asyncio.run(_harness_run(url, body, streams, per, stats, procs))
                what = "itl_error_ms"
            else:
                asyncio.run(CLIENTS[name](url, body, streams, per, stats))
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                what = "delay_ms"
            errs_ms = [e * 1e3 for e in stats.errors]
            rows.append(
                {
                    "client": name,
                    "events": stats.events,
                    "failed": stats.failed,
                    "wall_s": round(wall, 2),
                    "events_per_s": round(stats.events / wall),
                    "cpu_s_per_100k_events": round(cpu / max(stats.events, 1) * 1e5, 2),
                    "cpu_util": round(cpu / wall, 2),
                    f"{what}_p50": round(_pct(errs_ms, 0.5), 3),
                    f"{what}_p99": round(_pct(errs_ms, 0.99), 3),
                }
            )
        if connect_n:
            for fresh in (False, True):
                cpu_ms, ttfb_ms = asyncio.run(_connect_cost(url, connect_n, fresh))
                rows.append(
                    {
                        "client": f"aiohttp {'fresh connection' if fresh else 'keep-alive'}",
                        "requests": connect_n,
                        "cpu_ms_per_request": round(cpu_ms, 3),
                        "first_event_ms_p50": round(ttfb_ms, 3),
                    }
                )
    finally:
        stop.set()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--streams", type=int, default=32, help="concurrent streams")
    ap.add_argument("--events", type=int, default=400, help="events per stream")
    ap.add_argument("--interval-ms", type=float, default=5.0, help="gap between events of one stream")
    ap.add_argument("--per", type=int, default=1, help="requests per stream, sequential")
    ap.add_argument("--libs", default="aiohttp,httpx,harness,harness-mp2")
    ap.add_argument(
        "--connect", type=int, default=300, help="short requests for the connection-cost rows (0: skip)"
    )
    args = ap.parse_args(argv)
    for row in run(args.streams, args.events, args.interval_ms, args.per, args.libs.split(","), args.connect):
        print(orjson.dumps(row).decode())


if __name__ == "__main__":
    main()
