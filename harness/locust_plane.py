"""Locust's master/worker control plane, run in a thread of its own so the rest of the process stays plain asyncio.

Locust's runners are gevent programs (`locust.rpc` is ZeroMQ on gevent); EngineBench's client is asyncio (aiohttp).
Importing locust normally monkey-patches the whole process (threads become greenlets, sockets go through gevent),
which would put gevent underneath the asyncio client that owns every timestamp. So locust is imported with
`LOCUST_SKIP_MONKEY_PATCH=1` and its runner (`Environment.create_master_runner` / `create_worker_runner`) lives in one
dedicated OS thread with its own gevent hub. Nothing else in the process touches gevent.

`ControlPlane` is that thread. Messages in either direction are Locust custom messages (`runner.register_message`,
`runner.send_message`): outgoing ones are queued from any thread and sent from the gevent thread (woken by a gevent
async watcher, which is thread-safe); incoming ones are handed to `deliver` with the `perf_counter` at which the gevent
thread took them off the socket. Clock probes (`PING` / `PONG`) are stamped in the gevent threads at both ends, so the
measured round trip is the network's, not the asyncio loops'. Worker liveness is Locust's own: its heartbeats mark a
silent worker `missing`; `workers` is a snapshot of the master's view (client id -> state).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["GONE", "PING", "PONG", "ControlPlane", "Message"]

PING, PONG = "eb_ping", "eb_pong"
GONE = "eb_gone"  # made up locally: the worker's runner ended (the master said quit)
_CLOSE = object()
MASTER_SILENT_S = 10.0  # a worker that has not heard from its master for this long considers it gone


@dataclass(frozen=True)
class Message:
    """A custom message as received: `node` is the sender's Locust client id ("" for the master)."""

    type: str
    node: str
    data: Any
    received: float  # perf_counter() when the gevent thread took it off the socket


def _import_locust() -> None:
    """Import locust without monkey-patching. Must run on the main thread: `locust.stats` installs a signal handler
    when imported."""
    os.environ.setdefault("LOCUST_SKIP_MONKEY_PATCH", "1")
    try:
        from gevent import monkey
    except ImportError:
        from harness.errors import ConfigError

        raise ConfigError("distributed load needs Locust: pip install 'enginebench[distributed]'") from None

    if monkey.is_module_patched("threading"):  # someone imported locust the usual way first
        raise RuntimeError(
            "gevent monkey-patched this process before EngineBench's Locust plane started; "
            "import locust only through harness.locust_plane"
        )
    try:
        import locust.env  # noqa: F401
    except ValueError as e:  # "signal only works in main thread"
        raise RuntimeError(f"start EngineBench's Locust plane from the main thread first ({e})") from None


class ControlPlane:
    """A Locust master or worker runner in its own thread; see the module docstring. Create the first one on the
    main thread (importing locust needs it)."""

    def __init__(
        self,
        role: Literal["master", "worker"],
        host: str,
        port: int,
        types: Iterable[str],
        deliver: Callable[[Message], None],
    ) -> None:
        self.role, self.host, self.port = role, host, port
        self.types, self.deliver = tuple(types), deliver
        self.node_id = ""
        self.workers: dict[str, str] = {}  # master: snapshot of client id -> Locust state
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._wake: Any = None
        self._thread = threading.Thread(target=self._main, name=f"locust-{role}", daemon=True)
        _import_locust()

    # -- called from any thread --------------------------------------------------------------------------------
    def start(self, timeout_s: float) -> None:
        """Start the thread; return once the master is bound / the worker is acknowledged by its master."""
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(
                f"no Locust master answered at {self.host}:{self.port} within {timeout_s:.0f}s"
            )
        if self._error is not None:
            raise self._error

    def send(self, msg_type: str, data: Any = None, node: str | None = None) -> None:
        self._outbox.put((msg_type, data, node))
        self._poke()

    def close(self, timeout_s: float = 5.0) -> None:
        if self._thread.is_alive():
            self._outbox.put(_CLOSE)
            self._poke()
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _poke(self) -> None:
        wake = self._wake
        if wake is not None:
            wake.send()

    @staticmethod
    def _master_silent(runner: Any) -> bool:
        # the master answers each worker heartbeat (every second); Locust itself waits 60 s before giving up
        last = runner.last_heartbeat_timestamp
        return last is not None and time.time() - last > MASTER_SILENT_S

    # -- the gevent thread ---------------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            from locust.env import Environment

            env = Environment(user_classes=[])
            runner: Any
            if self.role == "master":
                runner = env.create_master_runner(self.host, self.port)
            else:
                runner = env.create_worker_runner(self.host, self.port)
                self.node_id = runner.client_id
        except BaseException as e:
            self._error = RuntimeError(f"Locust {self.role} at {self.host}:{self.port}: {e!r}")
            self._ready.set()
            return
        self._serve(runner)

    def _serve(self, runner: Any) -> None:
        import gevent
        from gevent.event import Event

        def handler(msg_type: str) -> Callable[..., None]:
            def on_message(environment: Any, msg: Any, **_kw: Any) -> None:
                self.deliver(Message(msg_type, msg.node_id or "", msg.data, time.perf_counter()))

            return on_message

        for t in self.types:
            runner.register_message(t, handler(t))
        if self.role == "worker":

            def on_ping(environment: Any, msg: Any, **_kw: Any) -> None:
                runner.send_message(PONG, {"m": msg.data["m"], "w": time.perf_counter()})

            runner.register_message(PING, on_ping)
        else:
            runner.register_message(PONG, handler(PONG))

        woken = Event()
        self._wake = gevent.get_hub().loop.async_()
        self._wake.start(woken.set)
        self._ready.set()
        try:
            while True:
                woken.wait(timeout=0.25)
                woken.clear()
                if self.role == "master":
                    self.workers = {c.id: c.state for c in runner.clients.all}
                elif len(runner.greenlet) == 0 or self._master_silent(runner):  # it said quit, or is gone
                    self.deliver(Message(GONE, "", None, time.perf_counter()))
                    return
                while True:
                    try:
                        item = self._outbox.get_nowait()
                    except queue.Empty:
                        break
                    if item is _CLOSE:
                        return
                    msg_type, data, node = item
                    if msg_type == PING:
                        data = {"m": time.perf_counter()}
                    runner.send_message(msg_type, data, client_id=node)
        finally:
            self._wake.stop()
            self._wake = None
            if self.role == "master":
                # not `runner.quit()`: it keeps listening for 0.5 s, long enough to welcome a worker that is already
                # reconnecting for the next point to a master about to vanish
                from locust.rpc import Message as LocustMessage

                for c in list(runner.clients.all):
                    runner.server.send_to_client(LocustMessage("quit", None, c.id))
                runner.greenlet.kill(block=True)
                runner.server.close(linger=500)
            else:
                if len(
                    runner.greenlet
                ):  # leaving on our own: tell the master, as a Locust worker does on exit
                    from locust.rpc import Message as LocustMessage

                    with contextlib.suppress(Exception):
                        runner.client.send(LocustMessage("quit", None, runner.client_id))
                    runner.greenlet.kill(block=True)
                runner.client.close(linger=500)
