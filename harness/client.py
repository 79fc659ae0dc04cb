"""The streaming HTTP client: sends one request and owns every timestamp of its record.

Times are `time.perf_counter()` minus the run's start (one monotonic clock, system-wide on Linux): `scheduled` (given
by the runner), `sent` (just before the request is written), `first_byte` (the read that completed the response
headers), one entry in `chunk_times` per transport read that carried output tokens, stamped when its bytes arrived
(the kernel's receive timestamp, SO_TIMESTAMPNS: on Linux the client reads its plain-HTTP sockets itself,
`harness.kernel_time.StampedTransport`, on uvloop and asyncio's loop alike) or else when the event loop handed the
read over (TLS, other systems); all events of one read share its timestamp and their tokens are summed into one
chunk; `done` (the `[DONE]` event's arrival, or end of body); and `done_read`, when the client read that `[DONE]`
(a closed loop's slot is free from then). A client that reads late (its loop busy, or the process waiting for a CPU)
therefore still times every token by its arrival.

The client knows no engine: the target's codec builds the call and parses each `data:` payload. A failing request
never raises: it ends with a `status` (see `harness.records.Status`), an `error` reason and the HTTP status.

HTTP/1.1 is spoken by a small `asyncio.Protocol` here rather than aiohttp, for three measured reasons
(benchmarks/README.md): the request line, headers and body leave in one `write` at `sent` (aiohttp on Python 3.11
writes the body — and its coalesced headers — from a separate task, one event-loop iteration later, which under load
is milliseconds of TTFT error the server never saw); each read is stamped in `data_received`, not when a coroutine
gets round to it; and de-chunking a stream costs a fraction of aiohttp's per-HTTP-chunk callbacks (the client CPU
per streamed token is the benchmark). On Linux the socket under it is read by `StampedTransport` (one `recvmsg` per
read, which also returns the arrival time), not by the loop's transport. It handles Content-Length, chunked and
read-until-close bodies, keep-alive, `Connection: close`, TLS (`https://`), a connect timeout, a stall timeout (no
byte for that long) and an overall one. No proxy from the environment is ever used; `Accept-Encoding: identity` is
sent (a compressed stream would hold tokens back in the compressor's buffer and cost client CPU).

Connections: pooled keep-alive by default, with a client idle timeout (`keepalive_idle_s`, 2 s) shorter than the
servers' own (uvicorn — vLLM, SGLang — and cpp-httplib — llama.cpp — close idle connections after 5 s). The failure
this prevents: a server closing an idle connection at the moment the client reuses it, so the POST fails; POST cannot
be retried safely (tests/test_client.py keeps this as a test). A server's `Connection: close` is honoured, and a
connection the server half-closed while idle is never reused. `connection="fresh"` opens a connection per request
(`Connection: close`); on loopback that costs about 0.5 ms of time to first byte per request, more over a network.
A request that still meets a closed pooled connection fails as `connect_error` with a message saying so.

A stream that ends well can have the next request sent from the read callback that saw its `[DONE]`
(`execute(then=...)`), before this request's task has even resumed: `send_on` writes it on the same keep-alive
connection once the body has ended, or on a new plain-HTTP connection whose handshake completed inside the connect
call (loopback); `execute(handoff=...)` then reads that request's response. A connection knows how many requests were
written on it, so only the last owner returns it to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import select
import socket
import ssl
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson

from adapters.base import HttpCall, StreamDelta, Usage
from harness import kernel_time
from harness.kernel_time import StampedTransport
from harness.records import Phase, RequestRecord, Status
from harness.sse import SSEParser
from workloads.spec import RequestSpec

__all__ = [
    "Codec",
    "Connection",
    "Handoff",
    "HttpError",
    "Session",
    "Target",
    "execute",
    "make_session",
    "new_record",
    "send_on",
    "send_request",
    "timeouts_for",
]

Connection = Literal["fresh", "keepalive"]
KEEPALIVE_IDLE_S = 2.0
AFTER_DONE_S = 1.0  # how long to wait for the end of the body after [DONE]
_ERROR_SNIPPET = 300
_MAX_HEAD = 64 * 1024
_PAUSE_BYTES = 4 * 1024 * 1024  # unread bytes above which the socket is not read (flow control)


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


# -- errors the transport raises (classified into a record's status by `_classify`) -------------------------------
class HttpError(Exception):
    """A transport-level failure of one request."""


class _ConnectTimeout(HttpError):
    pass


class _Stall(HttpError):
    pass


class _Disconnected(HttpError):
    """The server closed the connection (before the response, or before the body's end)."""


class _BadResponse(HttpError):
    pass


# -- one connection -----------------------------------------------------------------------------------------------
# Reads land in one buffer per event loop (`recv_into`), not in a fresh object per read: asyncio's plain protocol
# path calls `sock.recv(262144)`, which allocates and releases 256 KiB for every read, 14 µs of a 17 µs loopback
# read of one ~230-byte token chunk on this machine (benchmarks/README.md). A read is copied out of the buffer before
# the next can land there: `get_buffer`, the `recv_into` and `buffer_updated` run back to back on the loop's thread.
_READ_SIZE = 256 * 1024
_read_buffers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, memoryview] = weakref.WeakKeyDictionary()


def _read_buffer(loop: asyncio.AbstractEventLoop) -> memoryview:
    buf = _read_buffers.get(loop)
    if buf is None:
        buf = _read_buffers[loop] = memoryview(bytearray(_READ_SIZE))
    return buf


class _Http1(asyncio.BufferedProtocol):
    """A client connection: buffers reads with the time each arrived, wakes the one reader, watches for stalls."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.read_buf = _read_buffer(loop)
        self.transport: asyncio.Transport | None = None
        self.pieces: list[tuple[float, bytes]] = []
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False  # EOF or connection lost: nothing more will arrive
        self.exc: Exception | None = None
        self.last = 0.0  # perf_counter of the last read (or of the request's write)
        self.stall_s: float | None = None
        self.stall_timer: asyncio.TimerHandle | None = None
        self.idle_since = 0.0
        # while a stream is read, each read goes straight to this (read time, bytes) callback: no task switch per read
        self.sink: Callable[[float, bytes], None] | None = None
        self.stamped = False  # its reads carry the kernel's arrival time (`StampedTransport`)
        self.requests = 0  # requests written on it: a request whose number is not the last no longer owns it

    # protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio subclasses
        self.stamped = isinstance(transport, StampedTransport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.read_buf

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self.read_buf[:nbytes]))

    def data_received(self, data: bytes) -> None:  # the loop's own transports (TLS): stamped when read
        self.received(time.perf_counter(), data)

    def received(self, t: float, data: bytes) -> None:
        """`data` was read; its bytes arrived at `t` (perf_counter)."""
        self.last = t
        sink = self.sink
        if sink is not None:
            try:
                sink(t, data)
            except Exception as e:  # a malformed body: the reader raises it
                self.sink = None
                self.exc = e
                self._wake()
            return
        self.pieces.append((t, data))
        self.buffered += len(data)
        if self.buffered > _PAUSE_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if exc is not None and self.exc is None:
            self.exc = exc
        self._wake()
        self.stop_stall_timer()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    # stall timeout: one timer per stall period, re-armed from the last read (not one per read)
    def watch_stalls(self, stall_s: float | None) -> None:
        self.stall_s = stall_s
        self.last = time.perf_counter()
        if stall_s is not None and self.stall_timer is None:
            self.stall_timer = self.loop.call_at(self.loop.time() + stall_s, self._check_stall)

    def stop_stall_timer(self) -> None:
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None

    def _check_stall(self) -> None:
        self.stall_timer = None
        if self.stall_s is None or self.closed:
            return
        idle = time.perf_counter() - self.last
        if idle >= self.stall_s:
            self.exc = _Stall()
            self._wake()
        else:
            self.stall_timer = self.loop.call_at(self.loop.time() + self.stall_s - idle, self._check_stall)

    # the reader's side
    async def take(self) -> list[tuple[float, bytes]]:
        """Everything read since the last call, waiting for at least one read; [] at EOF."""
        while not self.pieces:
            if self.exc is not None:
                raise self.exc
            if self.closed:
                return []
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        out, self.pieces, self.buffered = self.pieces, [], 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return out

    def abort(self) -> None:
        self.stop_stall_timer()
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class _Framing:
    """Incremental decoding of one response body: Content-Length, chunked, or until the connection closes."""

    __slots__ = ("buf", "done", "left", "mode")

    def __init__(self, mode: Literal["length", "chunked", "close"], length: int = 0) -> None:
        self.mode = mode
        self.left = (
            length  # length: bytes still due; chunked: bytes left in the current chunk (-1: want a size)
        )
        self.done = mode == "length" and length == 0
        self.buf = b""
        if mode == "chunked":
            self.left = -1

    def feed(self, data: bytes) -> bytes:
        """The body bytes in `data` (`done` is set at the body's end; bytes after it are an error)."""
        if self.mode == "close":
            return data
        if self.mode == "length":
            if len(data) >= self.left:
                if len(data) > self.left:
                    raise _BadResponse("bytes after the end of the response body")
                self.left, self.done = 0, True
                return data
            self.left -= len(data)
            return data
        return self._chunked(data)

    def _chunked(self, data: bytes) -> bytes:
        if self.buf:
            data, self.buf = self.buf + data, b""
        elif self.left == -1:  # the common read: exactly one whole chunk (size line, data, CRLF)
            eol = data.find(b"\r\n")
            if 0 < eol < 16 and data.endswith(b"\r\n"):
                try:
                    size = int(data[:eol], 16)
                except ValueError:
                    size = 0  # an extension or worse: the general path below decides
                if size and len(data) == eol + size + 4:
                    return data[eol + 2 : -2]
        out: list[bytes] = []
        pos, n = 0, len(data)
        while pos < n and not self.done:
            left = self.left
            if left > 0:  # inside a chunk's data
                end = pos + left
                out.append(data[pos:end])
                if end > n:
                    self.left = end - n
                    break
                pos, self.left = end, -2  # then its CRLF
            elif left == -2:  # the CRLF after a chunk's data
                if n - pos < 2:
                    self.buf = data[pos:]
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise _BadResponse("malformed chunked body (no CRLF after a chunk)")
                pos, self.left = pos + 2, -1
            elif left == -1:  # a chunk-size line
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > 1024:
                        raise _BadResponse("malformed chunked body (chunk-size line too long)")
                    self.buf = data[pos:]
                    break
                size_s = data[pos:eol].split(b";", 1)[0].strip()
                try:
                    size = int(size_s, 16)
                except ValueError:
                    raise _BadResponse(f"malformed chunk size {size_s[:20]!r}") from None
                pos = eol + 2
                self.left = size if size else -3
            else:  # -3: trailers after the last chunk, up to an empty line
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    self.buf = data[pos:]
                    break
                if eol == pos:
                    self.done = True
                    pos += 2
                else:
                    pos = eol + 2
        if self.done and pos < n:
            raise _BadResponse("bytes after the end of the response body")
        return out[0] if len(out) == 1 else b"".join(out)


@dataclass
class _Response:
    status: int
    headers: dict[str, str]
    reusable: bool  # the server allows reuse once the body is read to its end
    framing: _Framing
    first: list[tuple[float, bytes]]  # body bytes that came with the headers
    t_head: float


async def _read_head(conn: _Http1, method: str) -> _Response:
    buf = b""
    while True:
        pieces = await conn.take()
        if not pieces:
            raise _Disconnected("the server closed the connection before a response")
        for i, (t, data) in enumerate(pieces):
            buf += data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise _BadResponse("response headers larger than 64 KiB")
                continue
            head, rest = buf[:end].decode("latin-1").split("\r\n"), buf[end + 4 :]
            first = ([(t, rest)] if rest else []) + pieces[i + 1 :]
            return _parse_head(head, method, first, t)


def _parse_head(lines: list[str], method: str, first: list[tuple[float, bytes]], t: float) -> _Response:
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise _BadResponse(f"not an HTTP/1.x response: {lines[0][:80]!r}")
    try:
        status = int(parts[1])
    except ValueError:
        raise _BadResponse(f"bad status line {lines[0][:80]!r}") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    conn_hdr = headers.get("connection", "").lower()
    reusable = "close" not in conn_hdr and (parts[0] == "HTTP/1.1" or "keep-alive" in conn_hdr)
    if status < 200 and status != 101:
        raise _BadResponse(f"unexpected interim response {status}")
    framing: _Framing
    if method == "HEAD" or status in (204, 304):
        framing = _Framing("length", 0)
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        framing = _Framing("chunked")
    elif "content-length" in headers:
        try:
            framing = _Framing("length", int(headers["content-length"].split(",")[0]))
        except ValueError:
            raise _BadResponse(f"bad Content-Length {headers['content-length']!r}") from None
    else:
        framing, reusable = _Framing("close"), False
    return _Response(status, headers, reusable, framing, first, t)


async def _body_pieces(conn: _Http1, resp: _Response) -> list[tuple[float, bytes]]:
    """The next decoded body bytes with their read times; [] at the body's end."""
    framing = resp.framing
    out: list[tuple[float, bytes]] = []
    while not out:
        if resp.first:
            raw, resp.first = resp.first, []
        elif framing.done:
            return []
        else:
            raw = await conn.take()
            if not raw:
                if framing.mode == "close":
                    framing.done = True
                    return []
                raise _Disconnected("the server closed the connection before the end of the response body")
        for t, data in raw:
            if framing.done:
                raise _BadResponse("bytes after the end of the response body")
            body = framing.feed(data)
            if body:
                out.append((t, body))
        if framing.done:
            break
    return out


# -- the session: a connection pool ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Origin:
    scheme: str
    host: str
    port: int
    base_path: str
    host_header: str


class Session:
    """Connections to one or more origins for a load point; use as `async with make_session(target) as session`."""

    def __init__(self, keepalive: bool, idle_s: float, connections: int = 0) -> None:
        self.keepalive = keepalive
        self.idle_s = idle_s
        self._idle: dict[_Origin, list[_Http1]] = {}
        self._origins: dict[str, _Origin] = {}
        self._limit = asyncio.Semaphore(connections) if connections > 0 else None
        self._open: set[_Http1] = set()
        self._ssl: ssl.SSLContext | None = None
        self._addrs: dict[_Origin, list[tuple[int, Any]]] = {}
        self._resolving: dict[_Origin, asyncio.Future[Any]] = {}

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for conn in list(self._open):
            conn.abort()
        self._open.clear()
        self._idle.clear()

    def origin(self, base_url: str) -> _Origin:
        o = self._origins.get(base_url)
        if o is None:
            u = urlsplit(base_url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"not an http(s) URL: {base_url!r}")
            port = u.port or (443 if u.scheme == "https" else 80)
            default = port == (443 if u.scheme == "https" else 80)
            host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
            o = _Origin(u.scheme, u.hostname, port, u.path.rstrip("/"), host if default else f"{host}:{port}")
            self._origins[base_url] = o
        return o

    def _pooled(self, origin: _Origin) -> _Http1 | None:
        idle = self._idle.get(origin)
        now = time.perf_counter()
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.pieces and now - conn.idle_since < self.idle_s:
                return conn
            conn.abort()
            self._open.discard(conn)
        return None

    async def connect(
        self, origin: _Origin, timeout_s: float | None, request: bytes = b""
    ) -> tuple[_Http1, bool, bool]:
        """A connection (pooled if one is idle and fresh enough), whether it was reused, and whether `request` has
        already been written on it.

        A new plain-HTTP connection writes `request` on the socket the moment the TCP connect completes, before
        asyncio builds its transport (which takes more event-loop iterations: under load, milliseconds the server
        would otherwise wait for the request)."""
        if self.keepalive and (conn := self._pooled(origin)) is not None:
            return conn, True, False
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                if origin.scheme == "https":
                    ctx = self._ssl = self._ssl or ssl.create_default_context()
                    _, proto = await loop.create_connection(
                        lambda: _Http1(loop), origin.host, origin.port, ssl=ctx, server_hostname=origin.host
                    )
                    written = False
                else:
                    proto, written = await self._connect_plain(loop, origin, request)
        except TimeoutError:
            raise _ConnectTimeout() from None
        self._open.add(proto)
        return proto, False, written

    async def _resolve(self, loop: asyncio.AbstractEventLoop, origin: _Origin) -> list[tuple[int, Any]]:
        """The origin's addresses, looked up once per session. A numeric host needs no lookup; a name is looked up
        by one task while the others wait for it: at the first wave of 256 streams, 256 concurrent
        `getaddrinfo` calls queued on asyncio's few resolver threads and sent the last request 30-48 ms late."""
        try:
            ip = ipaddress.ip_address(origin.host.strip("[]"))
        except ValueError:
            pass
        else:
            fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            return [(fam, (str(ip), origin.port))]
        pending = self._resolving.get(origin)
        if pending is None:
            pending = self._resolving[origin] = asyncio.ensure_future(
                loop.getaddrinfo(origin.host, origin.port, type=socket.SOCK_STREAM)
            )
        try:
            infos = await asyncio.shield(pending)
        finally:
            if pending.done():
                self._resolving.pop(origin, None)
        return [(fam, addr) for fam, _, _, _, addr in infos]

    async def _connect_plain(
        self, loop: asyncio.AbstractEventLoop, origin: _Origin, request: bytes
    ) -> tuple[_Http1, bool]:
        addrs = self._addrs.get(origin)
        if addrs is None:
            addrs = self._addrs[origin] = await self._resolve(loop, origin)
        error: OSError | None = None
        for fam, addr in addrs:
            sock = _new_socket(fam)
            try:
                if not _connected_at_once(sock, addr):
                    await loop.sock_connect(sock, addr)
                sent = 0
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    sent = sock.send(request) if request else 0
            except OSError as e:
                sock.close()
                error = e
                continue
            except BaseException:
                sock.close()
                raise
            try:
                proto = await self.adopt(sock, request[sent:])
            except OSError as e:
                error = e
                continue
            return proto, bool(request)
        raise error or OSError(f"cannot connect to {origin.host}:{origin.port}")

    async def adopt(self, sock: socket.socket, rest: bytes = b"") -> _Http1:
        """A connection around `sock`, connected already (and sent on: `rest` is what it did not take)."""
        loop = asyncio.get_running_loop()
        try:
            if kernel_time.ENABLED:
                return self.wrap(sock, rest)
            _, proto = await loop.create_connection(lambda: _Http1(loop), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._open.add(proto)
        if rest and proto.transport is not None:
            proto.transport.write(rest)
        return proto

    def wrap(self, sock: socket.socket, rest: bytes = b"") -> _Http1:
        """`adopt` at once, where the client reads sockets itself (`kernel_time.ENABLED`): no event-loop round trip,
        so a request sent from a read callback has its response read from then on (a socket nobody reads lets the
        first token wait behind the next ones, and the kernel then times them all by the last)."""
        loop = asyncio.get_running_loop()
        proto = _Http1(loop)
        StampedTransport(loop, sock, proto)
        self._open.add(proto)
        if rest and proto.transport is not None:
            proto.transport.write(rest)
        return proto

    def release(self, origin: _Origin, conn: _Http1, reusable: bool) -> None:
        conn.stop_stall_timer()
        if reusable and self.keepalive and not conn.closed and not conn.pieces:
            conn.idle_since = time.perf_counter()
            self._idle.setdefault(origin, []).append(conn)
        else:
            conn.abort()
            self._open.discard(conn)


def _new_socket(fam: int) -> socket.socket:
    """A non-blocking TCP socket with receive timestamps and no Nagle delay, not connected yet."""
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        kernel_time.enable(sock)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def _connected_at_once(sock: socket.socket, addr: Any) -> bool:
    """Start a non-blocking connect; True when it has completed already (on loopback the handshake finishes inside
    the syscall: measured 200 of 200), so the request can go out now rather than event-loop iterations later —
    under load each iteration, including any wait for a CPU, was milliseconds (sock_connect 9-18 ms p50 at 64
    streams on the shared 2-core machine vs 0.06 ms idle)."""
    err = sock.connect_ex(addr)
    if err == 0:
        return True
    if err not in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
        raise OSError(err, os.strerror(err))
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    if not poller.poll(0):
        return False  # still connecting: the event loop waits for it (sock_connect sees EALREADY)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))
    return True


def make_session(target: Target, connections: int = 0) -> Session:
    """One session per load point. `connections` caps open connections (0: no cap, never a hidden one)."""
    return Session(target.connection == "keepalive", target.keepalive_idle_s, connections)


def timeouts_for(
    stream: bool, stall_timeout_s: float | None, request_timeout_s: float | None
) -> aiohttp.ClientTimeout:
    """Overall timeout, and for streams a stall timeout (no byte for that long, headers included)."""
    return aiohttp.ClientTimeout(
        total=request_timeout_s, sock_read=stall_timeout_s if stream else None, sock_connect=stall_timeout_s
    )


def _request_bytes(
    call: HttpCall, origin: _Origin, target: Target, body: bytes | None, keepalive: bool
) -> bytes:
    headers = {
        "Host": origin.host_header,
        "Accept": "*/*",
        "Accept-Encoding": "identity",
        "User-Agent": "EngineBench",
        "Content-Type": "application/json",
        **target.headers,
        **call.headers,
    }
    lines = [f"{call.method} {origin.base_path}{call.path} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("content-length", "connection")]
    if body is not None or call.method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    lines.append("Connection: keep-alive" if keepalive else "Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if body else head


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


class _StreamReader:
    """Turns the reads of an SSE body into the record, called from `data_received` (one call per transport read)."""

    def __init__(
        self,
        conn: _Http1,
        framing: _Framing,
        rec: RequestRecord,
        codec: Codec,
        run_start: float,
        texts: list[str] | None,
        then: Then | None = None,
        reusable: bool = False,
    ) -> None:
        self.conn, self.framing, self.rec, self.parse = conn, framing, rec, codec.parse_event
        self.run_start, self.texts = run_start, texts
        self.parser = SSEParser()
        self.usage: Usage | None = None
        self.saw_done = False
        self.stopped = False  # [DONE], an error event or an unparsable one: the record is complete
        self.then = then
        self.reusable = reusable  # the connection may carry another request once this body has ended

    def feed(self, t: float, data: bytes) -> None:
        framing = self.framing
        if framing.left == -1 and self.parser.idle and not framing.buf and not self.stopped:
            # the common read, a token: one whole HTTP chunk ("9c\r\n" ... "\r\n") holding one whole one-line
            # `data:` event, with nothing pending in the framing or the SSE parser. Taken here in one pass, the
            # same bytes `framing.feed` and `parser.feed` would give (tests/test_client.py splits every stream
            # both ways); anything else goes the general way below
            n = len(data)
            eol = data.find(b"\r\n")
            if (
                0 < eol < 16
                and data.find(b"\n", eol + 2) == n - 4
                and data.find(b"\r", eol + 2) == n - 2
                and data.endswith(b"\n\n\r\n")
                and data.startswith(b"data:", eol + 2)
            ):
                try:
                    size = int(data[:eol], 16)
                except ValueError:
                    size = -1
                if size == n - eol - 4:
                    skip = eol + (8 if data[eol + 7] == 0x20 else 7)
                    self.events(t - self.run_start, [data[skip:-4]])
                    if self.stopped:
                        self.ended()
                    return
        body = framing.feed(data)
        if body and not self.stopped:
            self.events(t - self.run_start, self.parser.feed(body))
        if self.stopped or framing.done:
            self.ended()

    def ended(self) -> None:
        """The record is complete (`[DONE]`, an error) or the body is over: hand off, wake the request's task."""
        if (
            self.then is not None
            and self.saw_done
            and self.rec.status == "ok"
            and (self.framing.done or not self.reusable)
        ):
            self.hand_off()
        self.conn._wake()

    def hand_off(self) -> None:
        """The stream ended well: let `then` send the next request now, inside this read's callback, rather than
        after the loop has run every other callback and task queued before this request's own task (at 256
        streams, bursts of dozens of streams end within a millisecond). A reusable connection whose body has ended
        goes with it; otherwise `then` gets None (a new connection) and this body is read to its end as before."""
        then, self.then = self.then, None
        seen = self.rec.done_read
        assert then is not None and seen is not None
        if self.reusable and self.framing.done:
            self.conn.sink = None  # this body is over: bytes from now on belong to the next response
            then(self.conn, seen)
        else:
            then(None, seen)

    def events(self, t: float, payloads: list[bytes]) -> None:
        rec = self.rec
        times, tokens, texts = rec.chunk_times, rec.chunk_tokens, self.texts
        for payload in payloads:
            if not payload:
                continue
            if payload == b"[DONE]":
                self.saw_done = self.stopped = True
                rec.done, rec.done_read = t, _now(self.run_start)
                return
            try:
                delta = self.parse(payload)
            except Exception as e:
                rec.status, rec.error, rec.done = (
                    "stream_error",
                    f"unparsable event ({e}): {payload[:200]!r}",
                    t,
                )
                self.stopped = True
                return
            if delta is None:
                continue
            if delta.error:
                rec.status, rec.error, rec.done = "stream_error", f"error event: {delta.error}", t
                self.stopped = True
                return
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
                self.usage = delta.usage

    def end_of_body(self) -> None:
        """The body ended (its framing, or the connection closed a read-until-close body) before [DONE]."""
        rec = self.rec
        t = _now(self.run_start)
        if not self.stopped:
            self.events(t, self.parser.close())
        if self.stopped:
            return
        self.stopped = True
        rec.done = t
        rec.tags["stream_end"] = "eof"
        if rec.finish_reason is None:
            rec.status = "stream_error"
            rec.error = "stream ended without [DONE] or a finish_reason (truncated?)"


async def _wait_for(conn: _Http1, ready: Callable[[], bool], reader: _StreamReader) -> None:
    """Wait until `ready()`; a closed connection ends a read-until-close body, or is an error."""
    while not ready():
        if conn.exc is not None:
            raise conn.exc
        if conn.closed:
            if reader.framing.mode == "close":
                reader.framing.done = True
                return
            raise _Disconnected("the server closed the connection before the end of the response body")
        conn.waiter = conn.loop.create_future()
        try:
            await conn.waiter
        finally:
            conn.waiter = None


async def _read_stream(
    conn: _Http1,
    resp: _Response,
    rec: RequestRecord,
    codec: Codec,
    run_start: float,
    texts: list[str] | None,
    then: Then | None = None,
) -> Usage | None:
    reader = _StreamReader(conn, resp.framing, rec, codec, run_start, texts, then, resp.reusable)
    framing = resp.framing
    pending = [*resp.first, *conn.pieces]  # body bytes that came with the headers, then any read since
    resp.first, conn.pieces, conn.buffered = [], [], 0
    for t, data in pending:
        reader.feed(t, data)
    if not (reader.stopped or framing.done):
        conn.sink = reader.feed
        try:
            await _wait_for(conn, lambda: reader.stopped or framing.done, reader)
        finally:
            if conn.sink == reader.feed:
                conn.sink = None
    if not reader.stopped:
        reader.end_of_body()
    elif reader.saw_done and not framing.done:
        # read to the end of the body so a keep-alive connection can be reused; never wait on it for long
        conn.sink = reader.feed
        try:
            async with asyncio.timeout(AFTER_DONE_S):
                await _wait_for(conn, lambda: framing.done, reader)
        except (TimeoutError, HttpError, OSError):
            resp.reusable = False
        finally:
            if conn.sink == reader.feed:
                conn.sink = None
    if not framing.done:
        resp.reusable = False
    return reader.usage


async def _read_all(conn: _Http1, resp: _Response, limit: int | None = None) -> bytes:
    out: list[bytes] = []
    size = 0
    while pieces := await _body_pieces(conn, resp):
        for _, data in pieces:
            out.append(data)
            size += len(data)
        if limit is not None and size >= limit:
            resp.reusable = False
            break
    raw = b"".join(out)
    return raw if limit is None else raw[:limit]


Then = Callable[["_Http1 | None", float], None]
"""Called from the read callback when a stream ended well, with the time the client read its end (`done_read`) and
its connection if that can carry another request now (else None). It may send the next request at once
(`send_on`)."""


@dataclass(frozen=True)
class Handoff:
    """A request already sent by `send_on` (give it to `execute`): on a connection it now owns (pooled, or new and
    read from the start), or on a new socket whose transport `execute` builds (where the loop's transport is
    used)."""

    call: HttpCall
    conn: _Http1 | None = None
    number: int = 1  # the connection's request count after this one
    sock: socket.socket | None = None
    rest: bytes = b""  # request bytes the new socket did not take at once
    reused: bool = True  # `conn` carried a request before this one


def _prepare(session: Session, target: Target, spec: RequestSpec) -> tuple[HttpCall, _Origin, bytes]:
    """The request's call, origin and bytes on the wire."""
    call = target.adapter.build(spec, target.model, target.stream)
    body = orjson.dumps(call.body) if call.body is not None else None
    origin = session.origin(target.base_url)
    return call, origin, _request_bytes(call, origin, target, body, session.keepalive)


def send_on(
    conn: _Http1 | None,
    session: Session,
    target: Target,
    spec: RequestSpec,
    rec: RequestRecord,
    run_start: float,
) -> Handoff | None:
    """Send `spec` now, from a `Then` callback: on `conn`, a free keep-alive connection it handed over, or else on a
    new plain-HTTP connection whose handshake completes inside the connect call (loopback; as `Session.connect`
    does). None, with nothing sent, when the request cannot be built or no connection can take it at once: the
    slot's task then sends it the usual way."""
    try:
        call, origin, request = _prepare(session, target, spec)
    except Exception:
        return None  # `execute` builds it again and records why it could not
    if conn is not None:
        if conn.closed or conn.transport is None or conn.pieces or not session.keepalive:
            return None
        rec.sent = _now(run_start)
        conn.transport.write(request)
        conn.requests += 1
        return Handoff(call, conn, conn.requests)
    addrs = session._addrs.get(origin)
    if origin.scheme != "http" or not addrs:
        return None
    fam, addr = addrs[0]
    try:
        sock = _new_socket(fam)
    except OSError:
        return None
    try:
        sent_at = _now(run_start)
        if not _connected_at_once(sock, addr):
            sock.close()
            return None
        sent = 0
        with contextlib.suppress(BlockingIOError, InterruptedError):
            sent = sock.send(request)
    except OSError:
        sock.close()
        return None
    rec.sent = sent_at
    if kernel_time.ENABLED:
        try:
            new = session.wrap(sock, request[sent:])
        except OSError:
            sock.close()
            return None
        new.requests = 1
        return Handoff(call, new, 1, reused=False)
    return Handoff(call, sock=sock, rest=request[sent:])


async def execute(
    session: Session,
    target: Target,
    spec: RequestSpec,
    rec: RequestRecord,
    run_start: float,
    timeout: aiohttp.ClientTimeout,
    keep_text: bool = False,
    *,
    handoff: Handoff | None = None,
    then: Then | None = None,
) -> None:
    """Send `spec` and fill `rec` in place (its identity and `scheduled` set by the caller). With `handoff` the
    request was written already (`send_on`, `rec.sent` set); `then` is offered the connection when the stream ends
    well (keep-alive streams only).

    On cancellation the record says `cancelled` and the CancelledError propagates; nothing else escapes.
    """
    texts: list[str] | None = [] if keep_text else None
    usage: Usage | None = None
    if handoff is None:
        try:
            call, origin, request = _prepare(session, target, spec)
        except Exception as e:
            rec.status, rec.error = "stream_error", f"could not build the request: {e}"
            return
    else:
        call, origin = handoff.call, session.origin(target.base_url)
    conn: _Http1 | None = None
    number = 0
    reusable = False
    limit = session._limit
    if limit is not None:
        await limit.acquire()
    reused = False
    try:
        async with asyncio.timeout(timeout.total):
            if handoff is not None and handoff.conn is not None:
                conn, reused, number = handoff.conn, handoff.reused, handoff.number
            elif handoff is not None and handoff.sock is not None:
                conn, reused = await session.adopt(handoff.sock, handoff.rest), False
                conn.requests = number = 1
            else:
                rec.sent = _now(run_start)
                conn, reused, written = await session.connect(origin, timeout.sock_connect, request)
                if not written:
                    if conn.transport is None or conn.closed:
                        raise _Disconnected("the connection closed before the request was written")
                    conn.transport.write(request)
                conn.requests += 1
                number = conn.requests
            conn.watch_stalls(timeout.sock_read)
            resp = await _read_head(conn, call.method)
            rec.first_byte = resp.t_head - run_start
            rec.http_status = resp.status
            if not 200 <= resp.status < 300:
                snippet = await _read_all(conn, resp, _ERROR_SNIPPET)
                rec.done = _now(run_start)
                rec.status = "http_error"
                rec.error = f"HTTP {resp.status}: {snippet.decode('utf-8', 'replace').strip()}"
                reusable = resp.reusable and resp.framing.done
                return
            ctype = resp.headers.get("content-type", "")
            if call.stream and "json" not in ctype:  # SSE, whatever the server calls it
                usage = await _read_stream(conn, resp, rec, target.adapter, run_start, texts, then)
                if conn.stamped and rec.chunk_times:
                    # its reads carry the kernel's arrival time: no late read in its TTFT
                    rec.read_stall = 0.0
            else:
                raw = await _read_all(conn, resp)
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
            reusable = resp.reusable and resp.framing.done and rec.status == "ok"
        _finish_tokens(rec, usage)
        if texts is not None:
            rec.output_text = "".join(texts)
    except asyncio.CancelledError:
        rec.done = _now(run_start)
        rec.status, rec.error = "cancelled", "the run stopped before the request finished"
        raise
    except Exception as e:
        rec.done = _now(run_start)
        rec.status, rec.error = _classify(e, rec, timeout, reused)
    finally:
        if conn is not None and conn.requests == number:  # else `then` gave it to the next request
            session.release(origin, conn, reusable)
        if limit is not None:
            limit.release()


def _classify(
    e: Exception, rec: RequestRecord, timeout: aiohttp.ClientTimeout, reused: bool = False
) -> tuple[Status, str]:
    before_response = rec.first_byte is None
    name = type(e).__name__
    if isinstance(e, _ConnectTimeout):
        return "connect_error", f"connect timeout after {timeout.sock_connect}s"
    if isinstance(e, _Stall):
        return "timeout", f"stall: no byte for {timeout.sock_read}s"
    if isinstance(e, TimeoutError):
        return "timeout", f"overall timeout: not finished within {timeout.total}s"
    if isinstance(e, _Disconnected | ConnectionError) and before_response:
        hint = "; a reused keep-alive connection?" if reused else ""
        return "connect_error", f"connection closed before a response ({e}){hint}"
    if isinstance(e, _Disconnected):
        return "read_error", str(e)
    if isinstance(e, _BadResponse):
        return "read_error", f"bad response: {e}"
    if isinstance(e, OSError | aiohttp.ClientError):
        return ("connect_error" if before_response else "read_error"), f"{name}: {e}"
    return "read_error", f"{name}: {e}"


async def send_request(
    session: Session,
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
