"""A `bench worker`: connects to a `bench run --distributed` master and runs the shares of its load points.

Each share is a `harness.runner.execute_point` call on this process's asyncio loop (the native client, its own
timestamps) with the start time and run start the master sent, already shifted by this machine's clock offset (see
`harness.distributed`). Finished records go back raw, batched every 0.1 s, then the point's outcome and a digest of
the request ids finished (the master checks its merge against it). The Locust side runs in its own thread
(`harness.locust_plane`).
"""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import traceback
from collections.abc import Callable
from typing import Any

import orjson

from harness.distributed import (
    _WORKER_TYPES,
    FAILED,
    HELLO,
    JOB,
    OUTCOME,
    RECORDS,
    STOP,
    _into,
    ids_digest,
)
from harness.errors import ConfigError
from harness.locust_plane import GONE, ControlPlane, Message
from harness.records import RequestRecord
from harness.runner import _ChildJob, execute_point

__all__ = ["serve_worker"]

_FLUSH_S = 0.1  # records go back in batches this often


async def _run_share(plane: ControlPlane, data: dict[str, Any], abort: asyncio.Event) -> None:
    try:
        job: _ChildJob = pickle.loads(data["job"])
        batch: list[bytes] = []
        finished: list[str] = []

        def sink(rec: RequestRecord) -> None:
            finished.append(rec.request_id)
            batch.append(orjson.dumps(rec.to_dict()))

        def flush() -> None:
            if batch:
                plane.send(RECORDS, {"recs": list(batch)})
                batch.clear()

        async def flusher() -> None:
            while True:
                await asyncio.sleep(_FLUSH_S)
                flush()

        child: dict[str, Any] = {"t0_fixed": data["t0"], "worker_base": job.worker_base, "abort": abort}
        if job.plan is not None:
            child.update(
                plan=list(job.plan), plan_reason=job.plan_reason, plan_window_end=job.plan_window_end
            )
            connections = 0
        else:
            child["workers"] = job.workers
            connections = job.workers
        task = asyncio.get_running_loop().create_task(flusher())
        try:
            outcome = await execute_point(
                job.target, iter(job.specs), job.point, job.stop, sink,
                job.run_start, job.requests, keep_text=job.keep_text, connections=connections, **child,
            )  # fmt: skip
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            flush()
        plane.send(OUTCOME, {"outcome": pickle.dumps(outcome), "ids": ids_digest(finished)})
    except Exception:
        plane.send(FAILED, {"error": traceback.format_exc()})


async def serve_worker(
    host: str,
    port: int,
    *,
    once: bool = False,
    connect_timeout_s: float = 300.0,
    progress: Callable[[str], None] = lambda _m: None,
) -> int:
    """Connect to the master at `host:port` and run the shares it sends; returns how many were run. A master
    lives for one load point: after it quits, connect again (for the next point) unless `once`."""
    loop = asyncio.get_running_loop()
    served = 0
    while True:
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        plane = ControlPlane("worker", host, port, _WORKER_TYPES, _into(inbox))
        try:
            await asyncio.to_thread(plane.start, connect_timeout_s)
        except (TimeoutError, RuntimeError) as e:
            if served:
                progress(f"no master at {host}:{port} for {connect_timeout_s:.0f}s: the run is over")
                return served
            raise ConfigError(
                f"cannot reach the EngineBench master at {host}:{port} ({e}); start `bench run --distributed` "
                "there first and check the address and firewall"
            ) from None
        plane.send(HELLO, {"pid": os.getpid(), "host": socket.gethostname()})
        progress(f"connected to {host}:{port} as {plane.node_id}")
        abort = asyncio.Event()
        share: asyncio.Task[None] | None = None
        try:
            while True:
                msg = await inbox.get()
                if msg.type == JOB and share is None:
                    progress("running a share of the load point")
                    share = loop.create_task(_run_share(plane, msg.data, abort))
                    served += 1
                elif msg.type == STOP:
                    abort.set()
                elif msg.type == GONE:
                    break
        finally:
            abort.set()
            if share is not None:
                await asyncio.gather(share, return_exceptions=True)
            await asyncio.to_thread(plane.close)
        progress("the master finished the point")
        if once:
            return served
        await asyncio.sleep(1.0)  # let that master go before greeting the next one
