"""The streaming HTTP client: sends one request and owns every timestamp of its record.

Times are `time.perf_counter()` minus the run's start (one monotonic clock, system-wide on Linux): `scheduled` (given
by the runner), `sent` (just before the request is written), `first_byte` (response headers), one entry in
`chunk_times` per transport read that carried output tokens (all events of one read arrived together, so they share
one timestamp and their tokens are summed into one chunk), and `done` (the `[DONE]` event, or end of body).

The client knows no engine: the target's codec builds the call and parses each `data:` payload. A failing request
never raises: it ends with a `status` (see `harness.records.Status`), an `error` reason and the HTTP status.

Connections: pooled keep-alive by default, with a client idle timeout (`keepalive_idle_s`, 2 s) shorter than the
servers' own (uvicorn — vLLM, SGLang — and cpp-httplib — llama.cpp — close idle connections after 5 s). The failure
this prevents: a server closing an idle connection at the moment the client reuses it, so the POST fails
(`ServerDisconnectedError` / "Can not write request body"); POST cannot be retried safely. Reproduced on loopback with
a server that idle-closes after 0.5 s: 19 of 60 requests sent near that moment failed with aiohttp's default 15 s pool
idle time, 0 of 60 with 0.3 s (tests/test_client.py keeps the safe half as a test). A server's `Connection: close` is
honoured. `connection="fresh"` opens a connection per request instead (aiohttp `force_close`): on loopback that costs
about 0.4 ms of client CPU and 0.7 ms of time to first byte per request (benchmarks/http_libs.py), more over a network.
A request that still meets a closed pooled connection fails as `connect_error` with a message saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import aiohttp
import orjson

from adapters.base import HttpCall, StreamDelta, Usage
from harness.records import Phase, RequestRecord, Status
from harness.sse import SSEParser
from workloads.spec import RequestSpec

__all__ = [
    "Codec",
    "Connection",
    "Target",
    "execute",
    "make_session",
    "new_record",
    "send_request",
    "timeouts_for",
]

Connection = Literal["fresh", "keepalive"]
KEEPALIVE_IDLE_S = 2.0
AFTER_DONE_S = 1.0  # how long to wait for the end of the body after [DONE]
_ERROR_SNIPPET = 300


class Codec(Protocol):
    """The part of an adapter the client uses (every `adapters.base.Adapter` is one)."""

    def build(self, spec: RequestSpec, model: str, stream: bool) -> HttpCall: ...

    def parse_event(self, data: bytes) -> StreamDelta | None: ...

    def parse_response(self, body: bytes) -> StreamDelta: ...


@dataclass(frozen=True)
class Target:
    """Where and how to send: the engine's name (for records), its base URL, its adapter codec and model name."""

    engine: str
    base_url: str
    adapter: Codec
    model: str
    headers: Mapping[str, str] = field(default_factory=dict)
    stream: bool = True
    connection: Connection = "keepalive"
    keepalive_idle_s: float = KEEPALIVE_IDLE_S  # must stay below the server's idle timeout


def make_session(target: Target, connections: int = 0) -> aiohttp.ClientSession:
    """One session per load point. `connections` caps open connections (0: no cap, never a hidden one)."""
    keepalive = target.connection == "keepalive"
    connector = aiohttp.TCPConnector(
        limit=connections,
        limit_per_host=0,
        force_close=not keepalive,
        keepalive_timeout=target.keepalive_idle_s if keepalive else None,
        enable_cleanup_closed=False,
    )
    # trust_env=False: a proxy from the environment must never sit between the client and the engine
    # identity: a compressed stream would hold tokens back in the compressor's buffer and cost client CPU
    return aiohttp.ClientSession(
        connector=connector, trust_env=False, headers={"Accept-Encoding": "identity"}
    )


def timeouts_for(
    stream: bool, stall_timeout_s: float | None, request_timeout_s: float | None
) -> aiohttp.ClientTimeout:
    """Overall timeout, and for streams a stall timeout (no byte for that long, headers included)."""
    return aiohttp.ClientTimeout(
        total=request_timeout_s, sock_read=stall_timeout_s if stream else None, sock_connect=stall_timeout_s
    )


def _now(run_start: float) -> float:
    return time.perf_counter() - run_start


def _finish_tokens(rec: RequestRecord, usage: Usage | None) -> None:
    rec.client_output_tokens = sum(rec.chunk_tokens)
    if usage is not None:
        rec.prompt_tokens = usage.prompt_tokens
        rec.cached_tokens = usage.cached_tokens
    if usage is not None and usage.completion_tokens is not None:
        rec.output_tokens = usage.completion_tokens
        rec.token_source = "server_usage"
    else:
        rec.output_tokens = rec.client_output_tokens
        rec.token_source = "client_estimate"


async def _read_stream(
    resp: aiohttp.ClientResponse, rec: RequestRecord, codec: Codec, run_start: float, texts: list[str] | None
) -> Usage | None:
    parser = SSEParser()
    parse = codec.parse_event
    content = resp.content
    clock = time.perf_counter
    times, tokens = rec.chunk_times, rec.chunk_tokens
    usage: Usage | None = None
    saw_done = False
    at_eof = False
    while not at_eof and not saw_done:
        data = await content.readany()
        t = clock() - run_start
        if data:
            payloads = parser.feed(data)
        else:
            at_eof = True
            payloads = parser.close()
        for payload in payloads:
            if saw_done or not payload:
                continue
            if payload == b"[DONE]":
                saw_done = True
                rec.done = t
                continue
            try:
                delta = parse(payload)
            except Exception as e:
                rec.status, rec.error, rec.done = (
                    "stream_error",
                    f"unparsable event ({e}): {payload[:200]!r}",
                    t,
                )
                return usage
            if delta is None:
                continue
            if delta.error:
                rec.status, rec.error, rec.done = "stream_error", f"error event: {delta.error}", t
                return usage
            if delta.tokens:
                if times and times[-1] == t:
                    tokens[-1] += delta.tokens
                else:
                    times.append(t)
                    tokens.append(delta.tokens)
            if texts is not None and delta.text:
                texts.append(delta.text)
            if delta.finish_reason:
                rec.finish_reason = delta.finish_reason
            if delta.usage is not None:
                usage = delta.usage
    if saw_done:
        if not content.at_eof():
            # read to the end of the body so a keep-alive connection can be reused; never wait on it for long
            with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                async with asyncio.timeout(AFTER_DONE_S):
                    while await content.readany():
                        pass
    else:
        rec.done = t
        rec.tags["stream_end"] = "eof"
        if rec.finish_reason is None:
            rec.status = "stream_error"
            rec.error = "stream ended without [DONE] or a finish_reason (truncated?)"
    return usage


async def execute(
    session: aiohttp.ClientSession,
    target: Target,
    spec: RequestSpec,
    rec: RequestRecord,
    run_start: float,
    timeout: aiohttp.ClientTimeout,
    keep_text: bool = False,
) -> None:
    """Send `spec` and fill `rec` in place (its identity and `scheduled` set by the caller).

    On cancellation the record says `cancelled` and the CancelledError propagates; nothing else escapes.
    """
    texts: list[str] | None = [] if keep_text else None
    usage: Usage | None = None
    stream = target.stream
    try:
        call = target.adapter.build(spec, target.model, stream)
        body = orjson.dumps(call.body) if call.body is not None else None
        headers = {"Content-Type": "application/json", **target.headers, **call.headers}
        url = target.base_url.rstrip("/") + call.path
    except Exception as e:
        rec.status, rec.error = "stream_error", f"could not build the request: {e}"
        return
    try:
        rec.sent = _now(run_start)
        async with session.request(call.method, url, data=body, headers=headers, timeout=timeout) as resp:
            rec.first_byte = _now(run_start)
            rec.http_status = resp.status
            if not 200 <= resp.status < 300:
                snippet = await resp.content.read(_ERROR_SNIPPET)
                rec.done = _now(run_start)
                rec.status = "http_error"
                rec.error = f"HTTP {resp.status}: {snippet.decode('utf-8', 'replace').strip()}"
                return
            ctype = resp.headers.get("Content-Type", "")
            if call.stream and "json" not in ctype:  # SSE, whatever the server calls it
                usage = await _read_stream(resp, rec, target.adapter, run_start, texts)
            else:
                raw = await resp.read()
                t = _now(run_start)
                rec.done = t
                try:
                    delta = target.adapter.parse_response(raw)
                except Exception as e:
                    rec.status, rec.error = "stream_error", f"unparsable response ({e}): {raw[:200]!r}"
                    return
                if delta.error:
                    rec.status, rec.error = "stream_error", f"error response: {delta.error}"
                    return
                if delta.tokens:
                    rec.chunk_times.append(t)
                    rec.chunk_tokens.append(delta.tokens)
                if texts is not None:
                    texts.append(delta.text)
                rec.finish_reason = delta.finish_reason
                usage = delta.usage
        _finish_tokens(rec, usage)
        if texts is not None:
            rec.output_text = "".join(texts)
    except asyncio.CancelledError:
        rec.done = _now(run_start)
        rec.status, rec.error = "cancelled", "the run stopped before the request finished"
        raise
    except Exception as e:
        rec.done = _now(run_start)
        rec.status, rec.error = _classify(e, rec, timeout)


def _classify(e: Exception, rec: RequestRecord, timeout: aiohttp.ClientTimeout) -> tuple[Status, str]:
    before_response = rec.first_byte is None
    name = type(e).__name__
    if isinstance(e, aiohttp.ConnectionTimeoutError):
        return "connect_error", f"connect timeout after {timeout.sock_connect}s"
    if isinstance(e, aiohttp.SocketTimeoutError):
        return "timeout", f"stall: no byte for {timeout.sock_read}s"
    if isinstance(e, TimeoutError):
        return "timeout", f"overall timeout: not finished within {timeout.total}s"
    if isinstance(e, aiohttp.ClientConnectorError):
        return "connect_error", f"{name}: {e}"
    if isinstance(e, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError) and before_response:
        return (
            "connect_error",
            f"connection closed before a response ({name}: {e}); a reused keep-alive connection?",
        )
    if isinstance(e, aiohttp.ClientError | OSError):
        return ("connect_error" if before_response else "read_error"), f"{name}: {e}"
    return "read_error", f"{name}: {e}"


async def send_request(
    session: aiohttp.ClientSession,
    target: Target,
    spec: RequestSpec,
    *,
    point: str,
    phase: Phase,
    scheduled: float,
    run_start: float,
    timeout: aiohttp.ClientTimeout,
    keep_text: bool = False,
    worker: int = 0,
) -> RequestRecord:
    """Convenience wrapper: a new record for `spec`, filled by `execute`."""
    rec = new_record(target, spec, point=point, phase=phase, scheduled=scheduled, worker=worker)
    await execute(session, target, spec, rec, run_start, timeout, keep_text)
    return rec


def new_record(
    target: Target, spec: RequestSpec, *, point: str, phase: Phase, scheduled: float, worker: int = 0
) -> RequestRecord:
    return RequestRecord(
        request_id=spec.request_id,
        engine=target.engine,
        point=point,
        phase=phase,
        scheduled=scheduled,
        expected_input_tokens=spec.input_tokens,
        expected_output_tokens=spec.max_tokens if spec.pin_output else None,
        worker=worker,
        tags=dict(spec.tags),
    )
