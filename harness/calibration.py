"""The scripted server: an OpenAI-compatible endpoint whose timing and output lengths are known exactly.

It is the ground truth the harness is calibrated against. Request `i` received at `t0` answers, for a stream, with
HTTP headers at once, then chunk `j` (0-based, `tokens_per_chunk` tokens each, the last one possibly fewer) at the
absolute deadline `t0 + ttft + j * itl`. Chat streams look like vLLM's: the first chunk is written together with a
role chunk whose content is empty, the last token chunk carries `finish_reason`, a usage chunk with `choices: []`
follows when `stream_options.include_usage` is set, then `data: [DONE]`. A non-streamed answer is written when its
last chunk would have been. `itl` is the gap between chunks, so with `tokens_per_chunk` k the per-token ITL is itl/k.

Output length: `max_tokens` when `ignore_eos` is set (the pinned length), else `min(max_tokens, output_tokens)`.
A body field `"scripted": {"ttft", "itl", "tokens_per_chunk", "output_tokens", "fault"}` overrides per request.

The server never hides its own lateness: a request's `t0` is when its bytes arrived (the kernel's receive
timestamp, SO_TIMESTAMPNS on Linux; the read's time elsewhere), not when the server got round to reading them, and
for every chunk it records the delay it really achieved (write time minus scripted time), per request id (body `request_id`, else header `X-Request-Id`, else generated) and in aggregate, at
`GET /calibration/stats` (`?detail=1` for per-request lags, `?brief=1` for counters and CPU only; `POST
/calibration/reset` clears). Client timing error is then measured minus truth minus that lag. Its stats also carry
its CPU time and its run-queue wait (schedstat), so a server starved by other processes is visible.

It is a raw `asyncio.Protocol` HTTP/1.1 server (keep-alive, chunked bodies) with one timer heap for all streams:
everything due is written in one pass (yielding every 0.3 ms so new requests are read on time), and chunks of a
stream that fell behind are coalesced into one write. In its own process (`serve_in_process`, `python -m
harness.calibration`) it waits with sub-millisecond precision (epoll alone rounds timeouts up to 1 ms), and
`workers` > 1 forks that many processes sharing the port (SO_REUSEPORT), each with a private control port so that
the stats endpoint answers for all of them.

Faults (`Faults`) are dealt deterministically (the kind furthest behind its share goes next), so a fraction f of n
requests is faulted to within about one request: HTTP status codes, connection reset before a response, a stream
cut mid-way, a stall, no `[DONE]`, a malformed chunk, an error event, a slow first byte, a huge event.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import heapq
import itertools
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import orjson

from harness import kernel_time
from harness.kernel_time import StampedListener, StampedSocket
from harness.loopwatch import cpu_wait_s

__all__ = [
    "FAULT_KINDS",
    "Faults",
    "ScriptConfig",
    "ScriptedServer",
    "chunk_schedule",
    "fetch_stats",
    "main",
    "reset_stats",
    "serve_in_process",
]

FAULT_KINDS = (
    "status",
    "reset",
    "cut",
    "stall",
    "no_done",
    "malformed",
    "error_event",
    "slow_first_byte",
    "huge",
)
_SLICE_S = 0.0003  # longest run of writes before new requests get read
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 411: "Length Required", 429: "Too Many Requests"}
_REASONS |= {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


@dataclass(frozen=True)
class Faults:
    """Fractions (0..1, summing to at most 1) of requests that get each fault; the rest are served normally."""

    status: Mapping[int, float] = field(default_factory=dict)  # e.g. {500: 0.1, 429: 0.05}
    reset: float = 0.0  # TCP reset before any response byte
    cut: float = 0.0  # connection closed after half the chunks (no chunked terminator)
    stall: float = 0.0  # after half the chunks, nothing for `stall_s`, then the rest
    no_done: float = 0.0  # body ends cleanly without `data: [DONE]`
    malformed: float = 0.0  # one chunk mid-way is not valid JSON
    error_event: float = 0.0  # an `{"error": ...}` event mid-way, then `[DONE]`
    slow_first_byte: float = 0.0  # headers only after `slow_first_byte_s`; tokens shift with them
    huge: float = 0.0  # one event mid-way (or the body) padded with `huge_bytes` the codec ignores
    stall_s: float = 3600.0
    slow_first_byte_s: float = 2.0
    huge_bytes: int = 4 << 20

    def table(self) -> list[tuple[str, float]]:
        """(fault, fraction) in a fixed order, status codes as "status:CODE"."""
        out = [(f"status:{code}", float(f)) for code, f in sorted(self.status.items())]
        out += [(k, float(getattr(self, k))) for k in FAULT_KINDS[1:]]
        return [(k, f) for k, f in out if f > 0]


@dataclass(frozen=True)
class ScriptConfig:
    ttft: float = 0.05
    itl: float = 0.005
    output_tokens: int = 64  # natural length (when the request does not pin its length)
    tokens_per_chunk: int = 1
    model: str = "scripted"
    token_text: str = " the"
    max_model_len: int = 8192
    chat_overhead_tokens: int = 4  # per message: what a chat template would add
    faults: Faults = field(default_factory=Faults)
    host: str = "127.0.0.1"
    port: int = 0
    precise: bool = True  # sub-millisecond waits (only where the server owns its event loop)
    workers: int = 1  # processes sharing the port (SO_REUSEPORT), only when run in its own process
    max_tracked: int = 200_000  # requests whose per-chunk lags are kept

    def to_json(self) -> str:
        d = asdict(self)
        d["faults"]["status"] = {str(k): v for k, v in self.faults.status.items()}
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> ScriptConfig:
        d = json.loads(text)
        f = d.pop("faults", {}) or {}
        f["status"] = {int(k): float(v) for k, v in (f.get("status") or {}).items()}
        return cls(**d, faults=Faults(**f))


def chunk_schedule(n_tokens: int, ttft: float, itl: float, tokens_per_chunk: int) -> list[tuple[float, int]]:
    """The truth: (offset from receipt, tokens) of every chunk of an `n_tokens` answer."""
    k = max(1, tokens_per_chunk)
    out = []
    for j, start in enumerate(range(0, n_tokens, k)):
        out.append((ttft + j * itl, min(k, n_tokens - start)))
    return out


def _prompt_tokens(body: Mapping[str, Any], cfg: ScriptConfig) -> int:
    """A whitespace tokenizer plus a fixed chat-template overhead per message (the scripted model's truth)."""
    msgs = body.get("messages")
    if isinstance(msgs, list):
        n = 0
        for m in msgs:
            content = m.get("content") if isinstance(m, Mapping) else None
            if isinstance(content, list):
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
            n += len(str(content or "").split()) + cfg.chat_overhead_tokens
        return n
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        if prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        return sum(len(str(p).split()) for p in prompt)
    return len(str(prompt).split())


def _frame(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(payload), payload)


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class _Stats:
    """Achieved-vs-scripted delays of every chunk written, per request and in aggregate."""

    def __init__(self, max_tracked: int) -> None:
        self.max_tracked = max_tracked
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.streams_done = 0
        self.faults: dict[str, int] = {}
        self.lags = array("d")
        self.first_lags = array("d")
        self.intakes = array("d")  # kernel arrival of each request -> the server reading it (its own delay)
        self.per_request: dict[str, dict[str, Any]] = {}

    def track(self, rid: str, entry: dict[str, Any]) -> None:
        if len(self.per_request) >= self.max_tracked:
            self.per_request.pop(next(iter(self.per_request)))
        self.per_request[rid] = entry

    def to_dict(self, detail: bool, raw: bool = False, brief: bool = False) -> dict[str, Any]:
        """`brief`: counters and CPU only (cheap enough to poll while a client runs)."""
        out: dict[str, Any] = {"schema_version": 1, "kind": "scripted_stats", "requests": self.requests}
        out |= {"streams_done": self.streams_done, "faults": dict(self.faults), "workers": 1}
        out |= {"cpu_s": time.process_time(), "cpu_wait_s": cpu_wait_s()}
        if brief:
            return out
        if raw:  # for merging across worker processes
            out |= {"lags_raw": self.lags.tobytes().hex(), "first_lags_raw": self.first_lags.tobytes().hex()}
            out |= {"intakes_raw": self.intakes.tobytes().hex()}
        else:
            out |= {"lag_ms": _pct(self.lags), "first_lag_ms": _pct(self.first_lags)}
            out |= {"intake_ms": _pct(self.intakes)}
        if detail:
            out["per_request"] = {
                rid: {
                    **{k: v for k, v in e.items() if k != "lags"},
                    "lags_ms": [x * 1000.0 for x in e["lags"]],
                }
                for rid, e in self.per_request.items()
            }
        return out


def _pct(a: array[float]) -> dict[str, Any]:
    if not a:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    x = np.frombuffer(a, dtype=np.float64) * 1000.0
    p = np.percentile(x, (50, 90, 99))
    out = {"count": int(x.size), "p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2])}
    return out | {"max": float(x.max()), "mean": float(x.mean())}


def _merge(parts: list[dict[str, Any]], detail: bool) -> dict[str, Any]:
    """Stats of several worker processes (each `to_dict(raw=True)`) -> one, percentiles over all their writes."""
    out: dict[str, Any] = {"schema_version": 1, "kind": "scripted_stats", "workers": len(parts)}
    for key in ("requests", "streams_done", "cpu_s", "cpu_wait_s"):
        vals = [p.get(key) for p in parts]
        out[key] = None if any(v is None for v in vals) else sum(vals)
    faults: dict[str, int] = {}
    for p in parts:
        for k, v in p["faults"].items():
            faults[k] = faults.get(k, 0) + int(v)
    out["faults"] = faults
    for key in ("lag", "first_lag", "intake"):
        if any(f"{key}s_raw" not in p for p in parts):
            continue
        merged = array("d")
        for p in parts:
            merged.frombytes(bytes.fromhex(p[f"{key}s_raw"]))
        out[f"{key}_ms"] = _pct(merged)
    if detail:
        out["per_request"] = {rid: e for p in parts for rid, e in p.get("per_request", {}).items()}
    return out


async def _get_json(host: str, port: int, path: str) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return dict(orjson.loads(data.partition(b"\r\n\r\n")[2]))


class _Stream:
    """One answer being written on its deadlines."""

    __slots__ = ("conn", "deadlines", "done", "entry", "frames", "next", "stall_at", "stall_s")

    def __init__(
        self, conn: _Conn, deadlines: list[float], frames: list[bytes], entry: dict[str, Any]
    ) -> None:
        self.conn = conn
        self.deadlines = deadlines
        self.frames = frames  # one pre-rendered write per deadline
        self.next = 0
        self.done = False
        self.entry = entry
        self.stall_at = -1
        self.stall_s = 0.0


# When a request arrived: the kernel's receive timestamp of its bytes (SO_TIMESTAMPNS, CLOCK_REALTIME, Linux), not
# the moment this process got round to reading them. Under load the server's own loop can read a request tens of
# milliseconds after it arrived (it is busy writing 51k chunks/s at 256 streams); a `t0` taken at the read would
# leave that delay out of the lags it reports and charge it to the client. asyncio's transport reads with
# `sock.recv`, so a `harness.kernel_time.StampedSocket` keeps the timestamp for `_Conn` to pick up.
class _Conn(asyncio.Protocol):
    """One HTTP/1.1 connection: parses requests (Content-Length bodies), answers them one at a time."""

    def __init__(self, server: ScriptedServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.keep_alive = True
        self.stream: _Stream | None = None
        self.stamped: StampedSocket | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        raw = transport.get_extra_info("socket")
        raw = getattr(raw, "_sock", raw)  # asyncio hands out a TransportSocket around the real one
        self.stamped = raw if isinstance(raw, StampedSocket) else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.stream is not None and not self.stream.done:
            self.stream.done = True  # the client went away mid-answer; its heap entry is skipped
            self.server._end(self.stream)

    def data_received(self, data: bytes) -> None:
        t0 = time.monotonic()
        if self.stamped is not None:
            t0 = self.stamped.arrival(t0)
        self.buf += data
        if not self.busy:
            self._parse(t0)

    def _parse(self, t0: float) -> None:
        while not self.busy and self.transport is not None:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            lines = bytes(self.buf[:head_end]).decode("latin-1").split("\r\n")
            try:
                method, target, version = lines[0].split(" ", 2)
            except ValueError:
                self.respond(400, {"error": {"message": "bad request line"}}, close=True)
                return
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self.respond(411, {"error": {"message": "send a Content-Length body"}}, close=True)
                return
            length = int(headers.get("content-length") or 0)
            if len(self.buf) < head_end + 4 + length:
                return
            body = bytes(self.buf[head_end + 4 : head_end + 4 + length])
            del self.buf[: head_end + 4 + length]
            conn_hdr = headers.get("connection", "").lower()
            self.keep_alive = conn_hdr != "close" and (version == "HTTP/1.1" or conn_hdr == "keep-alive")
            self.busy = True
            self.server._handle(self, method, target, headers, body, t0)

    def finished(self) -> None:
        """The current response is complete: close, or read the next request."""
        self.busy = False
        self.stream = None
        if self.transport is None:
            return
        if not self.keep_alive:
            self.transport.close()
        elif self.buf:
            self._parse(time.monotonic())

    def head(self, status: int, ctype: str, length: int | None, extra: str = "") -> bytes:
        reason = _REASONS.get(status, "Error")
        framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
        conn = "keep-alive" if self.keep_alive else "close"
        return (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n{framing}\r\nConnection: {conn}\r\n"
            f"server: enginebench-scripted\r\n{extra}\r\n"
        ).encode("latin-1")

    def respond(
        self, status: int, obj: Any, close: bool = False, ctype: str = "application/json", extra: str = ""
    ) -> None:
        if close:
            self.keep_alive = False
        body = obj if isinstance(obj, bytes) else orjson.dumps(obj)
        if self.transport is not None:
            self.transport.write(self.head(status, ctype, len(body), extra) + body)
        self.finished()

    def reset(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0) before any response byte."""
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
        self.busy = False


class ScriptedServer:
    """`async with ScriptedServer(ScriptConfig(...)) as srv:` serves on `srv.url` in the current event loop."""

    def __init__(
        self,
        cfg: ScriptConfig,
        sock: socket.socket | None = None,
        *,
        control: socket.socket | None = None,
        peers: tuple[int, ...] = (),
        worker: int = 0,
    ) -> None:
        """`sock`: a listening socket to serve on (SO_REUSEPORT workers); `control`: this worker's own socket, and
        `peers` the control ports of its sibling workers, whose stats `/calibration/stats` merges."""
        self.cfg = cfg
        self.stats = _Stats(cfg.max_tracked)
        self._sock = sock
        self._control = control
        self._peers = peers
        self._worker = worker
        self._server: asyncio.Server | None = None
        self._control_server: asyncio.Server | None = None
        self._heap: list[tuple[float, int, _Stream]] = []
        self._seq = itertools.count()
        self._timer: asyncio.Handle | None = None
        self._timer_at = float("inf")
        self._n = 0
        self._fault_counts: dict[str, int] = {}
        self._running = 0
        self._tokens_total = 0
        self._prompt_total = 0
        self._finished: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.url = ""

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self._sock if self._sock is not None else _listen(self.cfg.host, self.cfg.port, False)
        self._server = await loop.create_server(lambda: _Conn(self), sock=sock, backlog=4096)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        if self._control is not None:
            self._control_server = await loop.create_server(lambda: _Conn(self), sock=self._control)

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for _, _, st in self._heap:
            if st.conn.transport is not None:
                st.conn.transport.abort()
        self._heap.clear()
        for server in (self._server, self._control_server):
            if server is not None:
                server.close()
                await server.wait_closed()

    async def __aenter__(self) -> ScriptedServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- requests -------------------------------------------------------------------------------------------
    def _handle(
        self, conn: _Conn, method: str, target: str, headers: dict[str, str], body: bytes, t0: float
    ) -> None:
        path, _, query = target.partition("?")
        cfg = self.cfg
        if method == "GET" and path == "/health":
            return conn.respond(200, b"", ctype="text/plain")
        if method == "GET" and path == "/version":
            return conn.respond(200, {"version": "scripted-1"})
        if method == "GET" and path == "/v1/models":
            card = {"id": cfg.model, "object": "model", "created": 0, "owned_by": "enginebench"}
            return conn.respond(
                200, {"object": "list", "data": [card | {"max_model_len": cfg.max_model_len}]}
            )
        if method == "GET" and path == "/metrics":
            return conn.respond(200, self._metrics().encode(), ctype="text/plain; version=0.0.4")
        if path.startswith("/calibration/") and self._peers and "local=1" not in query:
            task = asyncio.get_running_loop().create_task(self._fan_out(conn, method, path, query))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return None
        if method == "GET" and path == "/calibration/stats":
            brief = "brief=1" in query
            return conn.respond(200, self.stats.to_dict("detail=1" in query, "raw=1" in query, brief))
        if method == "POST" and path == "/calibration/reset":
            self.stats.reset()
            return conn.respond(200, {"ok": True})
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions", "/tokenize"):
            return conn.respond(404, {"error": {"message": f"no route {method} {path}"}})
        try:
            req = orjson.loads(body) if body else {}
            if not isinstance(req, dict):
                raise ValueError("body is not a JSON object")
        except ValueError as e:
            return conn.respond(400, {"error": {"message": f"invalid JSON body: {e}"}})
        if path == "/tokenize":
            n = _prompt_tokens(req, cfg)
            return conn.respond(
                200, {"count": n, "max_model_len": cfg.max_model_len, "tokens": list(range(n))}
            )
        self._complete(conn, path == "/v1/chat/completions", req, headers, t0)

    async def _fan_out(self, conn: _Conn, method: str, path: str, query: str) -> None:
        """Stats / reset across all worker processes (each asked on its control port)."""
        host = self.cfg.host
        if method == "POST":
            for port in self._peers:
                req = f"POST {path}?local=1 HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(req.encode())
                await reader.read()
                writer.close()
            self.stats.reset()
            return conn.respond(200, {"ok": True})
        detail, brief = "detail=1" in query, "brief=1" in query
        q = "?local=1&raw=1" + ("&detail=1" if detail else "") + ("&brief=1" if brief else "")
        parts = await asyncio.gather(*(_get_json(host, port, path + q) for port in self._peers))
        conn.respond(200, _merge([self.stats.to_dict(detail, True, brief), *parts], detail))

    def _pick_fault(self, req: Mapping[str, Any]) -> str | None:
        override = (req.get("scripted") or {}).get("fault") if isinstance(req.get("scripted"), dict) else None
        if override:
            return str(override)
        # the fault furthest behind its share fires once it is a whole request behind: counts stay within ~1
        best, deficit = None, 1.0 - 1e-9
        for kind, frac in self.cfg.faults.table():
            d = (self._n + 1) * frac - self._fault_counts.get(kind, 0)
            if d >= deficit:
                best, deficit = kind, d
        if best is not None:
            self._fault_counts[best] = self._fault_counts.get(best, 0) + 1
        return best

    def _complete(
        self, conn: _Conn, chat: bool, req: dict[str, Any], headers: Mapping[str, str], t0: float
    ) -> None:
        cfg = self.cfg
        raw_over = req.get("scripted")
        over: dict[str, Any] = raw_over if isinstance(raw_over, dict) else {}
        ttft = float(over.get("ttft", cfg.ttft))
        itl = float(over.get("itl", cfg.itl))
        per_chunk = max(1, int(over.get("tokens_per_chunk", cfg.tokens_per_chunk)))
        natural = int(over.get("output_tokens", cfg.output_tokens))
        max_tokens = req.get("max_completion_tokens") or req.get("max_tokens") or natural
        n = (
            int(max_tokens)
            if req.get("ignore_eos")
            else min(int(max_tokens), max(natural, int(req.get("min_tokens") or 0)))
        )
        n = max(1, n)
        rid = str(
            req.get("request_id") or headers.get("x-request-id") or f"scripted-{self._worker}-{self._n}"
        )
        fault = self._pick_fault(req)
        self._n += 1
        self.stats.requests += 1
        if fault is not None:
            self.stats.faults[fault] = self.stats.faults.get(fault, 0) + 1
        if fault is not None and fault.startswith("status:"):
            code = int(fault.split(":", 1)[1])
            extra = "Retry-After: 1\r\n" if code == 429 else ""
            err = {
                "object": "error",
                "message": f"scripted fault: HTTP {code}",
                "type": "scripted",
                "code": code,
            }
            return conn.respond(code, {"error": err}, extra=extra)
        if fault == "reset":
            return conn.reset()
        prompt = _prompt_tokens(req, cfg)
        finish = "length" if n >= int(max_tokens) else "stop"
        schedule = chunk_schedule(n, ttft, itl, per_chunk)
        shift = cfg.faults.slow_first_byte_s if fault == "slow_first_byte" else 0.0
        stream = bool(req.get("stream"))
        usage = {"prompt_tokens": prompt, "total_tokens": prompt + n, "completion_tokens": n}
        oid = ("chatcmpl-" if chat else "cmpl-") + rid
        created = int(time.time())
        intake = max(0.0, time.monotonic() - t0)
        self.stats.intakes.append(intake)
        entry: dict[str, Any] = {"t0": t0, "ttft": ttft, "itl": itl, "tokens_per_chunk": per_chunk, "n": n}
        entry["intake_ms"] = intake * 1000.0
        entry |= {"shift": shift, "stream": stream, "finish": finish, "lags": array("d")}
        if not stream:
            text = cfg.token_text * n
            if chat:
                choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
            else:
                choice = {"index": 0, "text": text}
            choice |= {"logprobs": None, "finish_reason": finish, "stop_reason": None}
            obj: dict[str, Any] = {
                "id": oid,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
            }
            obj |= {"model": cfg.model, "choices": [choice], "usage": usage}
            if fault == "huge":
                obj["padding"] = "x" * cfg.faults.huge_bytes
            payload = orjson.dumps(obj)
            if fault == "malformed":
                payload = payload[: len(payload) // 2].ljust(len(payload))
            frames = [conn.head(200, "application/json", len(payload)) + payload]
            deadlines = [t0 + shift + schedule[-1][0]]
            if fault == "cut":
                frames = [frames[0][: len(frames[0]) - len(payload) // 2], b""]
                deadlines = deadlines * 2
        else:
            frames, deadlines = self._stream_frames(
                conn, chat, req, oid, created, schedule, finish, usage, fault
            )
            deadlines = [t0 + shift + d for d in deadlines]
            if shift == 0.0 and conn.transport is not None:
                conn.transport.write(conn.head(200, "text/event-stream", None))
            elif conn.transport is not None:
                frames[0] = conn.head(200, "text/event-stream", None) + frames[0]
        st = _Stream(conn, deadlines, frames, entry)
        if stream and fault == "stall":
            st.stall_at, st.stall_s = len(frames) // 2, cfg.faults.stall_s
        if stream and fault == "cut":
            st.frames = [*frames[: max(1, len(frames) // 2)], b""]
            st.deadlines = deadlines[: len(st.frames)]
        conn.stream = st
        self.stats.track(rid, entry)
        self._running += 1
        self._prompt_total += prompt
        self._push(st)

    def _stream_frames(
        self,
        conn: _Conn,
        chat: bool,
        req: Mapping[str, Any],
        oid: str,
        created: int,
        schedule: list[tuple[float, int]],
        finish: str,
        usage: Mapping[str, int],
        fault: str | None,
    ) -> tuple[list[bytes], list[float]]:
        cfg = self.cfg
        base: dict[str, Any] = {
            "id": oid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
        }
        base["model"] = cfg.model

        def chunk(text: str, fin: str | None, role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {"content": text}
                c: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": fin}
            else:
                c = {"index": 0, "text": text, "logprobs": None, "finish_reason": fin}
            if fin is not None:
                c["stop_reason"] = None
            return _sse(base | {"choices": [c]})

        opts = req.get("stream_options")
        include_usage = isinstance(opts, Mapping) and bool(opts.get("include_usage"))
        cache: dict[int, bytes] = {}
        frames = []
        last = len(schedule) - 1
        for j, (_, k) in enumerate(schedule):
            if j == last:
                data = chunk(cfg.token_text * k, finish)
                if include_usage:
                    data += _sse(base | {"choices": [], "usage": dict(usage)})
                if fault != "no_done":
                    data += b"data: [DONE]\n\n"
                frames.append(_frame(data) + b"0\r\n\r\n")
                continue
            if k not in cache:
                cache[k] = _frame(chunk(cfg.token_text * k, None))
            data_f = cache[k]
            if j == 0 and chat:
                data_f = _frame(chunk("", None, role=True) + chunk(cfg.token_text * k, None))
            if j == last // 2 and fault == "huge":
                event = orjson.loads(chunk(cfg.token_text * k, None)[len(b"data: ") :])
                data_f = _frame(_sse(event | {"padding": "x" * cfg.faults.huge_bytes}))
            if j == last // 2 and fault == "malformed":
                data_f = _frame(b'data: {"id": "' + oid.encode() + b'", "choices": [\n\n')
            if j == last // 2 and fault == "error_event":
                err = {"error": {"object": "error", "message": "scripted fault: error event", "code": 500}}
                data_f = _frame(_sse(err) + b"data: [DONE]\n\n") + b"0\r\n\r\n"
                frames.append(data_f)
                return frames, [d for d, _ in schedule[: j + 1]]
            frames.append(data_f)
        return frames, [d for d, _ in schedule]

    # ---- the timer heap ---------------------------------------------------------------------------------------
    def _push(self, st: _Stream) -> None:
        deadline = st.deadlines[st.next]
        heapq.heappush(self._heap, (deadline, next(self._seq), st))
        if deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = asyncio.get_running_loop().call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        heap = self._heap
        clock = time.monotonic
        pop, push, seq = heapq.heappop, heapq.heappush, self._seq
        yield_at = clock() + _SLICE_S
        while heap and heap[0][0] <= (now := clock()):
            if (
                now > yield_at
            ):  # let the loop read new requests (their arrival, not this, is their t0; reading them late is lag)
                self._timer_at = heap[0][0]
                self._timer = asyncio.get_running_loop().call_soon(self._fire)
                return
            _, _, st = pop(heap)
            if st.done:
                continue
            conn = st.conn
            transport = conn.transport
            if transport is None:
                st.done = True
                self._end(st)
                continue
            now = clock()
            i = st.next
            deadlines = st.deadlines
            n = len(deadlines)
            lags = st.entry["lags"]
            j = i
            limit = st.stall_at if st.stall_at > i else n  # a stall interrupts even a stream that fell behind
            while j < limit and deadlines[j] <= now:
                lags.append(now - deadlines[j])
                j += 1
            data = st.frames[i] if j == i + 1 else b"".join(st.frames[i:j])
            if data:
                transport.write(data)
            if i == 0 and lags:
                self.stats.first_lags.append(lags[0])
            self.stats.lags.extend(lags[len(lags) - (j - i) :])
            st.next = j
            if j >= n:
                st.done = True
                if not st.frames[-1]:  # the cut fault: drop the connection mid-body
                    transport.abort()
                self._end(st)
                conn.finished()
                continue
            if st.stall_at >= 0 and j >= st.stall_at:
                st.deadlines = deadlines[:j] + [d + st.stall_s for d in deadlines[j:]]
                st.stall_at = -1
            push(heap, (st.deadlines[j], next(seq), st))
        if heap:
            self._timer_at = heap[0][0]
            self._timer = asyncio.get_running_loop().call_at(self._timer_at, self._fire)

    def _end(self, st: _Stream) -> None:
        self._running -= 1
        self.stats.streams_done += 1
        if st.next >= len(st.deadlines):
            self._tokens_total += int(st.entry["n"])
            reason = str(st.entry["finish"])
            self._finished[reason] = self._finished.get(reason, 0) + 1

    def _metrics(self) -> str:
        m = f'{{model_name="{self.cfg.model}"}}'
        lines = [
            "# TYPE scripted:num_requests_running gauge",
            f"scripted:num_requests_running{m} {self._running}",
            "# TYPE scripted:num_requests_waiting gauge",
            f"scripted:num_requests_waiting{m} 0",
            "# TYPE scripted:prompt_tokens_total counter",
            f"scripted:prompt_tokens_total{m} {self._prompt_total}",
            "# TYPE scripted:generation_tokens_total counter",
            f"scripted:generation_tokens_total{m} {self._tokens_total}",
            "# TYPE scripted:request_success_total counter",
        ]
        for reason, count in sorted(self._finished.items()):
            lines.append(
                f'scripted:request_success_total{{model_name="{self.cfg.model}",finished_reason="{reason}"}} {count}'
            )
        lines += [
            "# TYPE scripted:requests_total counter",
            f"scripted:requests_total{m} {self.stats.requests}",
        ]
        return "\n".join(lines) + "\n"


# ---- its own process ------------------------------------------------------------------------------------------
class _PreciseSelector(selectors.EpollSelector):
    """Epoll waits in whole milliseconds (rounded up): wait coarsely until 1 ms before, then poll in ~50 µs naps."""

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None or timeout <= 0:
            return super().select(timeout)
        if timeout > 0.0015:
            return super().select(timeout - 0.001)
        end = time.monotonic() + timeout
        while True:
            ready = super().select(0)
            if ready:
                return ready
            rem = end - time.monotonic()
            if rem <= 0:
                return []
            time.sleep(min(rem, 0.00005))


def _tight_timer_slack() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(29, 1)  # PR_SET_TIMERSLACK: 1 ns instead of 50 µs for our naps


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, 15)  # PR_SET_PDEATHSIG: SIGTERM when the parent goes


async def _serve_forever(
    cfg: ScriptConfig,
    sockets: tuple[socket.socket, socket.socket] | None,
    peers: tuple[int, ...],
    worker: int,
) -> None:
    sock, control = sockets if sockets else (None, None)
    async with ScriptedServer(cfg, sock, control=control, peers=peers, worker=worker) as srv:
        if worker == 0:
            print(f"READY {srv.url}", flush=True)
        await asyncio.Event().wait()


def _listen(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock: socket.socket = StampedListener(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    kernel_time.enable(sock)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def _run_loop(
    cfg: ScriptConfig,
    sockets: tuple[socket.socket, socket.socket] | None,
    peers: tuple[int, ...],
    worker: int,
) -> None:
    if cfg.precise:
        _tight_timer_slack()
        loop: asyncio.AbstractEventLoop = asyncio.SelectorEventLoop(_PreciseSelector())
    else:
        loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_serve_forever(cfg, sockets, peers, worker))
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()


def _run_workers(cfg: ScriptConfig) -> None:
    """Fork `cfg.workers` processes, each with its own SO_REUSEPORT listening socket and a control socket."""
    first = _listen(cfg.host, cfg.port, True)
    port = first.getsockname()[1]
    listens = [first, *(_listen(cfg.host, port, True) for _ in range(cfg.workers - 1))]
    controls = [_listen(cfg.host, 0, False) for _ in range(cfg.workers)]
    ports = [c.getsockname()[1] for c in controls]
    for i in range(1, cfg.workers):
        if os.fork() == 0:
            _die_with_parent()
            for j, (a, b) in enumerate(zip(listens, controls, strict=True)):
                if j != i:
                    a.close()
                    b.close()
            _run_loop(cfg, (listens[i], controls[i]), tuple(p for j, p in enumerate(ports) if j != i), i)
            os._exit(0)
    for a, b in zip(listens[1:], controls[1:], strict=True):
        a.close()
        b.close()
    _run_loop(cfg, (listens[0], controls[0]), tuple(ports[1:]), 0)


def _raise_open_files() -> None:
    """One socket per stream: let this process hold as many as the OS allows (soft limit up to the hard one)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard)
            )


def main(argv: list[str] | None = None) -> None:
    """`python -m harness.calibration --port P --ttft 0.05 --itl 0.005 [--config-json JSON]`."""
    p = argparse.ArgumentParser(prog="python -m harness.calibration", description=__doc__.split("\n\n")[0])
    p.add_argument("--config-json", default=None, help="a whole ScriptConfig as JSON (flags below override)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--ttft", type=float, default=None)
    p.add_argument("--itl", type=float, default=None)
    p.add_argument("--output-tokens", type=int, default=None)
    p.add_argument("--tokens-per-chunk", type=int, default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--workers", type=int, default=None, help="processes sharing the port (SO_REUSEPORT)")
    p.add_argument(
        "--faults", default=None, help='Faults as JSON, e.g. \'{"status": {"500": 0.1}, "cut": 0.05}\''
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cfg = ScriptConfig.from_json(a.config_json) if a.config_json else ScriptConfig(port=8000)
    names = ("host", "port", "ttft", "itl", "output_tokens", "tokens_per_chunk", "model", "workers")
    cfg = replace(cfg, **{k: getattr(a, k) for k in names if getattr(a, k) is not None})
    if a.faults:
        f = json.loads(a.faults)
        f["status"] = {int(k): float(v) for k, v in (f.get("status") or {}).items()}
        cfg = replace(cfg, faults=Faults(**f))
    if a.child:
        _die_with_parent()
    _raise_open_files()
    if cfg.workers > 1:
        _run_workers(cfg)
    else:
        _run_loop(cfg, None, (), 0)


@contextlib.contextmanager
def serve_in_process(cfg: ScriptConfig, *, nice: int | None = None) -> Iterator[str]:
    """Run the server in a separate OS process (its own CPU and event loop); yields its base URL."""
    argv = [sys.executable, "-m", "harness.calibration", "--config-json", cfg.to_json(), "--child"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("READY "):
            raise RuntimeError(f"the scripted server did not start (exit {proc.poll()}): {line!r}")
        if nice is not None:
            import psutil

            psutil.Process(proc.pid).nice(nice)
        yield line.split(" ", 1)[1]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def fetch_stats(url: str, detail: bool = False, timeout: float = 30.0, brief: bool = False) -> dict[str, Any]:
    """The server's achieved-vs-scripted delays (`GET /calibration/stats`); blocking, stdlib only. `brief`: only
    counters and CPU time (cheap to poll)."""
    q = "?detail=1" if detail else "?brief=1" if brief else ""
    with urllib.request.urlopen(f"{url.rstrip('/')}/calibration/stats{q}", timeout=timeout) as r:
        return dict(orjson.loads(r.read()))


def reset_stats(url: str, timeout: float = 10.0) -> None:
    req = urllib.request.Request(f"{url.rstrip('/')}/calibration/reset", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        r.read()


if __name__ == "__main__":
    main()
