"""Ray Serve LLM on this machine: the driver the vLLM CPU venv's python runs (`adapters.rayserve.launch_argv`).

It imports nothing from EngineBench (that venv has only vLLM and Ray) and takes one JSON argument: `host`, `port`
(Serve's HTTP proxy), `metrics_port` (Ray's Prometheus exporter), `num_cpus` and `llm_config` (LLMConfig fields).

What it does, each fact read in ray 2.60.0's source:
- a new single-node Ray on loopback: `address="local"` (never joins a cluster found on the machine),
  `_node_ip_address="127.0.0.1"`, and `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` in the environment, without which
  `services.resolve_ip_for_localhost` turns 127.0.0.1 into the external address (`_private/services.py`,
  `get_node_ip_address` returns loopback when `ray_constants.ENABLE_RAY_CLUSTER` is off); no dashboard;
  `metrics_report_interval_ms` 1000 (the floor, `_private/telemetry/open_telemetry_metric_recorder.py`), so the
  engine's counters reach the exporter within about a second of a response;
- `serve.start` with the HTTP proxy on `host:port`, then `serve.run(build_openai_app(...))`;
- stops on SIGTERM / SIGINT, and when its parent (`bench`) is gone, even killed with SIGKILL: Serve and Ray are
  shut down, then every process carrying this launch's `ENGINEBENCH_ENGINE_TAG` (adapters/process.py gives it to
  the driver; raylet, gcs_server, the workers and vLLM's engine-core process inherit it) is terminated, then
  killed, and Ray's session folder removed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any

TAG_VAR = "ENGINEBENCH_ENGINE_TAG"  # adapters.process.TAG_VAR
_stop = threading.Event()


def _say(message: str) -> None:
    print(f"[rayserve-driver] {message}", flush=True)


def _tagged(tag: str) -> list[Any]:
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(TAG_VAR) == tag:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _sweep(tag: str | None, grace_s: float = 3.0) -> None:
    """Terminate every process of this launch but the driver, then kill what is left after `grace_s`."""
    import psutil

    if not tag:
        return
    procs = _tagged(tag)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(procs, timeout=grace_s)
    for p in left + _tagged(tag):
        try:
            p.kill()
        except psutil.Error:
            pass


def _shutdown(temp_dir: str) -> None:
    tag = os.environ.get(TAG_VAR)

    def polite() -> None:
        try:
            from ray import serve

            serve.shutdown()
        except Exception as e:  # a half-started Serve must not keep Ray up
            _say(f"serve.shutdown: {type(e).__name__}: {e}")
        try:
            import ray

            ray.shutdown()
        except Exception as e:
            _say(f"ray.shutdown: {type(e).__name__}: {e}")

    worker = threading.Thread(target=polite, daemon=True)
    worker.start()
    # Serve waits for replicas to drain; the sweep ends whatever is left, all within adapters.process's 15 s grace
    worker.join(timeout=8.0)
    _sweep(tag)
    shutil.rmtree(temp_dir, ignore_errors=True)
    _say("stopped")


def _loopback_only() -> None:
    """Runs in every Ray worker (runtime_env `worker_process_setup_hook`): a Serve replica's inter-deployment gRPC
    server binds 127.0.0.1 instead of every interface. ray 2.60.0 serve/_private/replica.py `_on_initialized` binds
    `add_port_to_grpc_server(self._server, "[::]:0")` with no setting to change it; callers reach the replica at
    its node address, which is 127.0.0.1 here."""
    import ray.serve._private.replica as replica

    bind = replica.add_port_to_grpc_server
    if getattr(bind, "__name__", "") == "loopback_bind":
        return

    def loopback_bind(server: Any, address: str) -> Any:
        return bind(
            server, "127.0.0.1:" + address[len("[::]:") :] if address.startswith("[::]:") else address
        )

    replica.add_port_to_grpc_server = loopback_bind


def _remove_stale(parent: str, prefix: str) -> None:
    """Session folders of earlier drivers that are gone (one killed before it could remove its own)."""
    for name in os.listdir(parent):
        pid = name[len(prefix) :]
        if name.startswith(prefix) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _watch_parent(parent: int) -> None:
    """Set the stop flag when the process that launched the driver is gone (it was killed, even with SIGKILL)."""
    while not _stop.is_set():
        if os.getppid() != parent:
            _say(f"parent {parent} is gone: stopping")
            _stop.set()
            return
        time.sleep(0.5)


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    # set before `import ray`: ray_constants reads it at import, and the processes Ray starts inherit it
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    temp_dir = f"/tmp/ray-eb-{os.getpid()}"  # short: Ray's unix sockets live under it (107-byte path limit)
    _remove_stale("/tmp", "ray-eb-")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: _stop.set())
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    try:
        import ray
        from ray import serve
        from ray.serve.llm import LLMConfig, build_openai_app

        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            # Ray's CPUs are scheduling slots: the ingress and the LLM server's placement group take one each, the
            # server's actor another, so the machine's 2 cores could not place them ("total resources available:
            # {}"); threads are vLLM's own (VLLM_CPU_OMP_THREADS_BIND), not these slots
            num_cpus=spec["num_cpus"],
            _metrics_export_port=spec["metrics_port"],
            _temp_dir=temp_dir,
            _system_config={"metrics_report_interval_ms": 1000},
            runtime_env={"worker_process_setup_hook": _loopback_only},
        )
        serve.start(http_options={"host": spec["host"], "port": spec["port"]})
        app = build_openai_app({"llm_configs": [LLMConfig(**spec["llm_config"])]})
        if not _stop.is_set():
            # returns once every deployment is healthy; the ingress answers /v1/models before that (the launcher's
            # readiness is a first completion: adapters.rayserve.prepare_calls)
            serve.run(app, blocking=False)
            _say(f"serving on http://{spec['host']}:{spec['port']}, metrics on port {spec['metrics_port']}")
        while not _stop.wait(0.5):
            pass
        return 0
    except Exception as e:
        _say(f"failed: {type(e).__name__}: {e}")
        raise
    finally:
        _shutdown(temp_dir)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
