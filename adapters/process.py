"""The engine lifecycle: launch a local process (or container), wait until it is ready, stop its whole tree.

`launched(adapter, cfg, log_path, ready_timeout)` is an async context manager yielding an `Endpoint`; `attached`
wraps an engine someone else runs (`--endpoint NAME=URL`). An engine runs in its own session (process group), its
stdout and stderr go to one log file, and stopping it leaves nothing behind: SIGTERM to the group and to every
descendant ever seen (some leave the group), a grace period, then SIGKILL. The same happens if `bench` itself gets
SIGTERM / SIGHUP (a handler) or exits without unwinding (atexit); SIGINT unwinds through the context manager.

Cold start is measured here (launch to the first successful health check); every other clock belongs to `harness`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal

import aiohttp
import orjson
import psutil

from adapters.base import Adapter, EngineConfig, ListsModels, Prepares
from harness.errors import ConfigError, EndpointError, EngineError

__all__ = [
    "TAG_VAR",
    "Endpoint",
    "EngineProcess",
    "Mode",
    "attached",
    "check_nice",
    "free_port",
    "launched",
    "port_in_use",
    "served_model_from",
]

Mode = Literal["launched", "attached", "container"]
TAIL_LINES = 30
TAG_VAR = "ENGINEBENCH_ENGINE_TAG"
_GUARDED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (bind to 0). Another process could take it before the engine binds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((_client_host(host), port)) == 0


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


class EngineProcess:
    """One engine process tree. Not thread-safe; `stop` is idempotent."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        # every descendant inherits this tag, so one that left the group and lost its parent is still found
        self.tag = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.env = {**env, TAG_VAR: self.tag}
        self.log_path = log_path
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._seen: dict[int, psutil.Process] = {}
        self._returncode: int | None = None
        self._stopped = False
        self._previous: dict[int, Any] = {}
        self.on_stop: Callable[[], None] | None = None  # extra cleanup (e.g. `docker rm -f`)

    # -- start -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        try:
            self._popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: one signal reaches the tree, ^C does not
                close_fds=True,
            )
        except OSError as e:
            self._log.close()
            raise EngineError(f"cannot start {self.name}: {self.argv[0]}: {e.strerror or e}") from e
        self._seen[self._popen.pid] = psutil.Process(self._popen.pid)
        self._guard()

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    @property
    def returncode(self) -> int | None:
        if self._popen is None:
            return None
        if self._returncode is None:
            self._returncode = self._popen.poll()
        return self._returncode

    def alive(self) -> bool:
        return self._popen is not None and self.returncode is None

    # -- observation -------------------------------------------------------------------------------------------
    def tree(self) -> list[psutil.Process]:
        """The running processes of the tree (remembering descendants, so reparented ones are still found)."""
        for proc in list(self._seen.values()):
            with contextlib.suppress(psutil.Error):
                for child in proc.children(recursive=True):
                    self._seen.setdefault(child.pid, child)
        return [p for p in self._seen.values() if _running(p)]

    def _tagged(self) -> list[psutil.Process]:
        """Processes anywhere on the machine carrying this engine's tag (a full scan: only when stopping)."""
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.pid not in self._seen and proc.environ().get(TAG_VAR) == self.tag:
                    found.append(proc)
        return found

    def rss_bytes(self) -> int:
        total = 0
        for proc in self.tree():
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def log_tail(self, lines: int = TAIL_LINES) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 256 * 1024))
                tail = deque(f.read().decode("utf-8", "replace").splitlines(), maxlen=lines)
        except OSError:
            return ""
        return "\n".join(tail)

    def death_reason(self) -> str | None:
        """None while running (or stopped by us); otherwise one line: how it ended and where its log is."""
        code = self.returncode
        if code is None or self._stopped:
            return None
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return f"{self.name} {how} (log: {self.log_path})"

    # -- stop --------------------------------------------------------------------------------------------------
    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the group and every known descendant, wait up to `timeout`, SIGKILL what is left."""
        if self._popen is None or self._stopped:
            return
        self._stopped = True
        procs = self.tree() + self._tagged()
        pgid = self._popen.pid  # start_new_session: the leader's pid is the group id
        _signal_group(pgid, signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        _, left = psutil.wait_procs(procs, timeout=timeout)
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        _signal_group(pgid, signal.SIGKILL)  # anything spawned during shutdown
        late = self._tagged()
        for p in late:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(left + late, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._returncode = self._popen.wait(timeout=5)
        if self.on_stop is not None:
            self.on_stop()
        if self._log is not None:
            self._log.close()
        self._unguard()

    # -- when bench itself goes away ---------------------------------------------------------------------------
    def _guard(self) -> None:
        atexit.register(self.stop)
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; atexit still covers normal exits
        for sig in _GUARDED_SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)

    def _unguard(self) -> None:
        atexit.unregister(self.stop)
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, previous)
        # a handler installed later keeps chaining to ours, which is inert once stopped

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop(timeout=10.0)
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass(frozen=True)
class Endpoint:
    """An engine to send requests to, launched here or attached."""

    name: str
    base_url: str
    model: str
    version: str | None
    mode: Mode
    launch_argv: tuple[str, ...] = ()
    cold_start_s: float | None = None
    pid: int | None = None
    log_path: Path | None = None
    config: EngineConfig | None = None
    process: EngineProcess | None = field(default=None, repr=False, compare=False)

    def alive(self) -> bool:
        """False once a launched engine's process has exited; attached endpoints are assumed alive."""
        return self.process.alive() if self.process else True

    def log_tail(self, lines: int = TAIL_LINES) -> str:
        return self.process.log_tail(lines) if self.process else ""

    def death_reason(self) -> str | None:
        return self.process.death_reason() if self.process else None

    def rss_bytes(self) -> int | None:
        return self.process.rss_bytes() if self.process else None

    def manifest_entry(self, adapter: str) -> dict[str, Any]:
        """The `engines[]` item of manifest.json (docs/run-directory.md)."""
        return {
            "name": self.name,
            "adapter": adapter,
            "mode": self.mode,
            "endpoint": self.base_url,
            "launch_argv": [_mask_assignment(a) for a in self.launch_argv],
            "version": self.version,
            "model": self.model,
            "cold_start_s": self.cold_start_s,
            "config": _public_config(self.config) if self.config else None,
        }


_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")


def _secret(name: str) -> bool:
    return any(w in name.upper() for w in _SECRET_WORDS)


def _mask_assignment(arg: str) -> str:
    """`-e HF_TOKEN=abc` in a container argv -> `HF_TOKEN=***`."""
    name, eq, _ = arg.partition("=")
    return f"{name}=***" if eq and not name.startswith("-") and _secret(name) else arg


def _public_config(cfg: EngineConfig) -> dict[str, Any]:
    """The config as written to the manifest, with secret-looking environment values masked."""
    out = dataclasses.asdict(cfg)
    out["env"] = {k: "***" if _secret(k) else v for k, v in cfg.env.items()}
    out["extra_args"] = list(cfg.extra_args)
    return out


def served_model_from(payload: Mapping[str, Any]) -> str | None:
    """The first model id of an OpenAI `/v1/models` answer."""
    ids = model_ids(payload)
    return ids[0] if ids else None


def model_ids(payload: Mapping[str, Any]) -> list[str]:
    """Every model id of an OpenAI `/v1/models` answer, in its order."""
    data = payload.get("data")
    if not isinstance(data, list):
        return []
    return [str(card["id"]) for card in data if isinstance(card, Mapping) and card.get("id") is not None]


def pick_model(ids: Sequence[str], want: str | None, name: str) -> str:
    """The model a launched engine's requests name: `want` (the configured one) when it serves it; the only one it
    serves when nothing is configured. Several models and none configured, or the configured one missing, is an
    EngineError naming what it serves (a Triton repository, an Ollama with other models pulled)."""
    if want is not None:
        if want in ids:
            return want
        raise EngineError(
            f"{name} does not serve the configured model {want!r}; /v1/models lists {', '.join(ids) or 'none'}: "
            "set served_model_name (or the model) to one of them"
        )
    if len(ids) > 1:
        raise EngineError(
            f"{name} serves several models ({', '.join(ids)}) and none is configured; set served_model_name to the "
            "one to benchmark"
        )
    return ids[0]


async def _prepare(adapter: Adapter, cfg: EngineConfig, base_url: str, timeout: float) -> None:
    """The adapter's `prepare_calls` (adapters.base.Prepares), in order, before anything is measured."""
    if not isinstance(adapter, Prepares):
        return
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        for call in adapter.prepare_calls(cfg):
            try:
                async with session.request(call.method, base_url + call.path, json=call.body) as r:
                    body = await r.read()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError) as e:
                raise EngineError(
                    f"{adapter.info.name}: {call.method} {call.path} before the run failed ({type(e).__name__}: {e})"
                ) from e
            if status != 200:
                raise EngineError(
                    f"{adapter.info.name}: {call.method} {call.path} before the run gave HTTP {status}: "
                    f"{body[:300].decode('utf-8', 'replace')}; check the model name"
                )


async def _get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as r:
        body = await r.read()
        try:
            return r.status, orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return r.status, None


async def _describe(
    session: aiohttp.ClientSession,
    adapter: Adapter,
    base_url: str,
    name: str,
    cfg: EngineConfig | None = None,
    *,
    want: str | None = None,
    attached: bool = False,
) -> tuple[str, str | None]:
    """(served model, version) of a ready engine; raises EndpointError if it is not OpenAI-compatible. With the
    `cfg` it was launched with, the model is the configured one (`pick_model`), not merely the first listed."""
    if isinstance(adapter, ListsModels):  # a native protocol (Triton) lists its models its own way
        listed = await _listed_model(session, adapter, base_url, name, cfg)
        return listed, await _version(session, adapter, base_url)
    try:
        status, models = await _get_json(session, f"{base_url}/v1/models")
    except (aiohttp.ClientError, TimeoutError) as e:
        raise EndpointError(
            f"cannot reach {name} at {base_url} ({type(e).__name__}: {e}); check the URL and that the server runs"
        ) from e
    model = served_model_from(models) if status == 200 and isinstance(models, Mapping) else None
    if model is None:
        raise EndpointError(
            f"{name} at {base_url} is not OpenAI-compatible: GET /v1/models gave HTTP {status} without a model "
            "list; point --endpoint at the server root (without /v1)"
        )
    if cfg is not None and isinstance(models, Mapping):
        want = adapter.served_model(cfg) if isinstance(adapter, Prepares) else cfg.served_model_name
        model = pick_model(model_ids(models), want, name)
    elif attached and isinstance(models, Mapping):
        ids = model_ids(models)
        if want is None and len(ids) > 1:
            raise EndpointError(
                f"{name} at {base_url} serves several models ({', '.join(ids)}); choose the one to benchmark with "
                f"--engine-set {name}.model=ID"
            )
        if want is not None and want not in ids:
            raise EndpointError(
                f"{name} at {base_url} does not serve {want!r}; /v1/models lists {', '.join(ids) or 'none'}: "
                f"give one of them with --engine-set {name}.model=ID"
            )
        model = want or model
    return model, await _version(session, adapter, base_url)


async def _version(session: aiohttp.ClientSession, adapter: Adapter, base_url: str) -> str | None:
    if adapter.info.version_path:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            status, payload = await _get_json(session, f"{base_url}{adapter.info.version_path}")
            if status == 200 and isinstance(payload, Mapping):
                return adapter.version_from(payload)
    return None


async def _listed_model(
    session: aiohttp.ClientSession, adapter: ListsModels, base_url: str, name: str, cfg: EngineConfig | None
) -> str:
    """The model requests name, from the adapter's own model list (`pick_model` rules)."""
    call = adapter.models_call()
    try:
        async with session.request(call.method, base_url + call.path, json=call.body) as r:
            status, body = r.status, await r.read()
    except (aiohttp.ClientError, TimeoutError) as e:
        raise EndpointError(
            f"cannot reach {name} at {base_url} ({type(e).__name__}: {e}); check the URL and that the server runs"
        ) from e
    try:
        ids = adapter.model_ids_from(orjson.loads(body)) if status == 200 else []
    except orjson.JSONDecodeError:
        ids = []
    if not ids:
        raise EndpointError(
            f"{name} at {base_url} lists no ready model: {call.method} {call.path} gave HTTP {status}; point "
            "--endpoint at the server root of a server of that make"
        )
    return pick_model(ids, cfg.served_model_name if cfg is not None else None, name)


WaitObserver = Callable[[float, str], None]  # (seconds waited so far, the engine log's latest line)
_WAIT_REPORT_S = 1.0


def last_log_line(path: Path, window: int = 4096) -> str:
    """The last non-empty line of a log file (its final `window` bytes read), "" when there is none."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - window))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in tail.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


async def _wait_ready(
    proc: EngineProcess, url: str, timeout: float, started: float, on_wait: WaitObserver | None = None
) -> float:
    """Poll the health URL until HTTP 200; fail fast if the process exits. Returns seconds since `started`.
    `on_wait` hears, about once a second, how long the wait has lasted and the engine log's latest line."""
    last = "no answer yet"
    reported = started
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        while True:
            proc.tree()  # remember descendants while the tree is intact (orphans leave the tree)
            if not proc.alive():
                code = proc.returncode
                how = (
                    f"was killed by signal {-code}"
                    if code is not None and code < 0
                    else f"exited with code {code}"
                )
                raise EngineError(
                    f"{proc.name} {how} before it was ready; the last lines of {proc.log_path}:\n{proc.log_tail()}"
                )
            try:
                async with session.get(url) as r:
                    await r.read()
                    if r.status == 200:
                        ready = time.perf_counter() - started
                        proc.tree()
                        return ready
                    last = f"HTTP {r.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                last = type(e).__name__
            now = time.perf_counter()
            if on_wait is not None and now - reported >= _WAIT_REPORT_S:
                reported = now
                on_wait(now - started, last_log_line(proc.log_path))
            if now - started > timeout:
                raise EngineError(
                    f"{proc.name} was not ready after {timeout:.0f} s (GET {url}: {last}); raise the ready timeout "
                    f"or read {proc.log_path}; its last lines:\n{proc.log_tail()}"
                )
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def launched(
    adapter: Adapter,
    cfg: EngineConfig,
    log_path: Path,
    ready_timeout: float = 300.0,
    *,
    name: str | None = None,
    container: bool = False,
    runtime: str = "docker",
    nice: int = 0,
    on_wait: WaitObserver | None = None,
) -> AsyncIterator[Endpoint]:
    """Start the engine (port 0 in `cfg` picks a free one), wait until ready, yield it, stop it on the way out.

    `nice` > 0 starts the engine's process tree that many levels below this process's CPU priority (`nice -n`,
    inherited by every process it starts), so a CPU engine sharing the host cannot keep the client off the cores.

    A picked port can be taken by another process before the engine binds it; the engine then exits early and is
    started once more on a new port."""
    name = name or adapter.info.name
    check_nice(nice)
    if nice and container:
        raise ConfigError(
            "engine nice does not reach a container's processes (they are the runtime daemon's children): "
            "leave it at 0 and limit the container's CPU with the runtime's own options"
        )
    pick = cfg.port == 0
    if not pick and port_in_use(cfg.host, cfg.port):
        raise EngineError(
            f"port {cfg.port} on {cfg.host} is already in use; stop what listens there or use port 0 for a free one"
        )
    for attempt in (1, 2):
        run_cfg = dataclasses.replace(cfg, port=free_port(_client_host(cfg.host))) if pick else cfg
        argv = adapter.container_argv(run_cfg, runtime) if container else adapter.launch_argv(run_cfg)
        if nice:
            argv = ["nice", "-n", str(nice), *argv]  # exec's the engine: the same pid, its children inherit
        env = {**os.environ, **({} if container else adapter.launch_env(run_cfg))}
        proc = EngineProcess(name, argv, env, log_path)
        if container:
            proc.on_stop = _container_cleanup(runtime, argv)
        base_url = f"http://{_client_host(run_cfg.host)}:{run_cfg.port}"
        started = time.perf_counter()
        proc.start()
        try:
            cold_start = await _wait_ready(
                proc, base_url + adapter.info.health_path, ready_timeout, started, on_wait
            )
            await _prepare(adapter, run_cfg, base_url, ready_timeout)
            if getattr(adapter, "ready_after_prepare", False):
                # its health path answers before it can serve (Ray Serve LLM's ingress): ready once prepared
                cold_start = time.perf_counter() - started
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0)) as session:
                model, version = await _describe(session, adapter, base_url, name, run_cfg)
            if not proc.alive():  # what answered was not our engine
                raise EngineError(
                    f"{proc.death_reason()}; another process answered on its port {run_cfg.port}"
                )
        except EngineError:
            proc.stop()
            if pick and attempt == 1 and port_in_use(run_cfg.host, run_cfg.port):
                continue  # someone else took the picked port: try a fresh one
            raise
        except BaseException:
            proc.stop()
            raise
        break
    try:
        yield Endpoint(
            name=name,
            base_url=base_url,
            model=model,
            version=version,
            mode="container" if container else "launched",
            launch_argv=tuple(argv),
            cold_start_s=cold_start,
            pid=proc.pid,
            log_path=log_path,
            config=run_cfg,
            process=proc,
        )
    finally:
        proc.stop()


def check_nice(nice: int, what: str = "engine nice") -> None:
    """Refuse a niceness offset `nice` cannot apply (`what` names it in the message)."""
    if not 0 <= nice <= 19:
        raise ConfigError(f"{what} {nice} is out of range: give 0 (the client's priority) to 19 (the lowest)")


def _container_cleanup(runtime: str, argv: Sequence[str]) -> Callable[[], None] | None:
    """`docker run` killed with SIGKILL leaves its container running: remove it by name."""
    if "--name" not in argv:
        return None
    container_name = argv[argv.index("--name") + 1]

    def cleanup() -> None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [runtime, "rm", "-f", container_name], capture_output=True, timeout=30, check=False
            )

    return cleanup


@contextlib.asynccontextmanager
async def attached(
    adapter: Adapter,
    base_url: str,
    *,
    name: str | None = None,
    timeout: float = 10.0,
    headers: Mapping[str, str] | None = None,
    model: str | None = None,
) -> AsyncIterator[Endpoint]:
    """An engine that runs elsewhere (`--endpoint NAME=URL`): checked for reachability and `/v1/models` (with
    `headers`: a server behind an API key answers 401 without it). Requests name `model` (which it must serve), or
    the one model it serves; a server of several models with none chosen is refused, never guessed."""
    name = name or adapter.info.name
    base_url = base_url.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[: -len("/v1")]
    if not base_url.startswith(("http://", "https://")):
        raise EndpointError(f"endpoint {name}={base_url} is not an http(s) URL; write it as http://HOST:PORT")
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout, headers=dict(headers or {})) as session:
        served, version = await _describe(session, adapter, base_url, name, want=model, attached=True)
    yield Endpoint(name=name, base_url=base_url, model=served, version=version, mode="attached")
