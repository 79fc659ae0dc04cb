"""When bytes arrived, from the kernel: TCP sockets whose reads also return the receive timestamp (SO_TIMESTAMPNS).

A process that reads late (its event loop busy, or waiting for a CPU) still learns when the bytes arrived. asyncio's
transports read with `sock.recv` (plain protocols) or `sock.recv_into` (buffered ones), so a socket subclass whose
reads are `recvmsg` calls keeps the timestamp for its protocol to take with `arrival`. uvloop reads the socket
itself and never calls these: there `arrival` gives back the read's own time. Linux only; elsewhere nothing is
enabled and the read's own time is used.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from typing import Any

__all__ = ["ENABLED", "StampedListener", "StampedSocket", "enable"]

_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # 35 on Linux; Python 3.11 does not export the name
_TIMESPEC = struct.Struct("qq")
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
