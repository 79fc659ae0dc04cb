"""When bytes arrived, from the kernel: TCP sockets whose reads also return the receive timestamp (SO_TIMESTAMPNS).

A process that reads late (its event loop busy, or waiting for a CPU) still learns when the bytes arrived.

- The client: `StampedTransport` reads a connected socket from an `add_reader` callback with `recvmsg_into` and hands
  each read to its protocol with its arrival time, on any event loop (uvloop's own transports read in C and drop the
  timestamp).
- The scripted server (asyncio's loop): asyncio's transports read with `sock.recv` or `sock.recv_into`, so a socket
  subclass whose reads are `recvmsg` calls (`StampedSocket`, accepted by `StampedListener`) keeps the timestamp for
  its protocol to take with `arrival`.

Linux only; elsewhere nothing is enabled and the read's own time is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys
import time
from typing import Any, Protocol

__all__ = ["ENABLED", "StampedListener", "StampedProtocol", "StampedSocket", "StampedTransport", "enable"]

_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # 35 on Linux; Python 3.11 does not export the name
_TIMESPEC = struct.Struct("qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)  # room for one SCM_TIMESTAMPNS
_READ_SIZE = 64 * 1024
# bound once: per read, no attribute lookups
_unpack_timespec, _perf_counter, _wall = _TIMESPEC.unpack_from, time.perf_counter, time.time
_EPOCH = int(time.time())  # subtracted before adding nanoseconds, so float64 keeps them (~1e-9 s near _EPOCH)
reads = 0  # read callbacks run so far (harness.runner.ReadPacer: whether the loop found work since it last looked)
ENABLED = sys.platform == "linux"


def enable(sock: socket.socket) -> None:
    """Ask for receive timestamps on `sock` (a listener passes it on to the connections it accepts)."""
    if ENABLED:
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        except OSError:
            pass


class StampedSocket(socket.socket):
    """A connection whose reads also keep the kernel's receive time of the bytes read (CLOCK_REALTIME)."""

    rx_realtime: float | None = None

    def _keep(self, ancillary: list[tuple[int, int, bytes]]) -> None:
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(value) >= 16:
                sec, nsec = _TIMESPEC.unpack_from(value)
                self.rx_realtime = sec + nsec * 1e-9

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data, ancillary, _, _ = self.recvmsg(bufsize, 64, flags)
        self._keep(ancillary)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        target = memoryview(buffer)[:nbytes] if nbytes else buffer
        n, ancillary, _, _ = self.recvmsg_into([target], 64, flags)
        self._keep(ancillary)
        return n

    def arrival(self, now: float) -> float:
        """When the last read's bytes arrived, on the clock `now` was just read from (`time.monotonic()` or
        `time.perf_counter()`: both CLOCK_MONOTONIC on Linux); `now` itself when unknown or implausible."""
        rx, self.rx_realtime = self.rx_realtime, None
        if rx is None:
            return now
        arrived = rx - (time.time() - now)  # the two clocks read back to back: < 1 µs apart
        return arrived if 0.0 <= now - arrived < 1.0 else now  # else the wall clock was stepped


class StampedListener(socket.socket):
    """A listening socket whose accepted connections are `StampedSocket`s (SO_TIMESTAMPNS is inherited)."""

    def accept(self) -> tuple[socket.socket, Any]:
        fd, addr = self._accept()  # type: ignore[attr-defined]
        sock = StampedSocket(self.family, self.type, self.proto, fileno=fd)
        if socket.getdefaulttimeout() is None and self.gettimeout():
            sock.setblocking(True)
        # every chunk leaves when written (asyncio sets this only on sockets that say IPPROTO_TCP; without it Nagle
        # held 16-token streams' chunks back ~20 ms, seen as TTFT 41 ms against 20 ms scripted)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, addr


class StampedProtocol(Protocol):
    """What `StampedTransport` calls: asyncio's protocol callbacks, with each read handed over with its arrival."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...

    def received(self, arrived: float, data: bytes) -> None: ...

    def eof_received(self) -> bool | None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...


class StampedTransport(asyncio.Transport):
    """A connected plain-TCP socket read from an `add_reader` callback with `recvmsg_into`, so each read comes with
    the kernel's receive time of its bytes, on any event loop (uvloop's transports read in C and drop it).

    Kept to what one read costs: one `recvmsg` of up to 64 KiB (a fresh bytes object, below malloc's mmap threshold:
    measured 0.2 µs less per read than `recvmsg_into` a shared buffer and copying out), the timestamp turned into
    `time.perf_counter()`'s clock, and one call, `received(arrived, data)`. Larger bodies take more reads (the loop
    calls again while bytes wait). Writes go to the socket at once; what it does not take waits for `add_writer`.
    TLS is not handled here."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: StampedProtocol
    ) -> None:
        super().__init__()
        self._loop, self._sock, self._fd, self._protocol = loop, sock, sock.fileno(), protocol
        self._recv = sock.recvmsg
        self._pending = bytearray()  # written, not yet taken by the socket
        self._reading = self._closing = self._closed = False
        protocol.connection_made(self)
        self.resume_reading()

    # reading
    def _read_ready(self) -> None:
        global reads
        reads += 1
        try:
            data, ancillary, _, _ = self._recv(_READ_SIZE, _ANCILLARY)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._force_close(e)
            return
        if not data:
            self.pause_reading()
            if not self._protocol.eof_received():
                self.close()
            return
        now = t = _perf_counter()
        if ancillary:
            value = ancillary[0][2]
            if len(value) >= 16:
                sec, nsec = _unpack_timespec(value)
                arrived = (sec - _EPOCH) + nsec * 1e-9 - (_wall() - _EPOCH - now)
                if 0.0 <= now - arrived < 1.0:  # else the wall clock was stepped between the two reads
                    t = arrived
        self._protocol.received(t, data)

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)

    # writing
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._pending:
            try:
                n = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                self._force_close(e)
                return
            if n == len(data):
                return
            data = memoryview(data)[n:]
            self._loop.add_writer(self._fd, self._write_ready)
        self._pending += data

    def _write_ready(self) -> None:
        try:
            n = self._sock.send(self._pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._force_close(e)
            return
        del self._pending[:n]
        if not self._pending:
            self._loop.remove_writer(self._fd)
            if self._closing:
                self._force_close(None)

    def get_write_buffer_size(self) -> int:
        return len(self._pending)

    def can_write_eof(self) -> bool:
        return False

    # closing
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        if not self._pending:
            self._force_close(None)

    def abort(self) -> None:
        self._force_close(None)

    def _force_close(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = self._closing = True
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
        if self._pending:
            self._pending.clear()
            self._loop.remove_writer(self._fd)
        self._loop.call_soon(self._lost, exc)

    def _lost(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._sock.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name in ("peername", "sockname"):
            with contextlib.suppress(OSError):
                return self._sock.getpeername() if name == "peername" else self._sock.getsockname()
        return default
