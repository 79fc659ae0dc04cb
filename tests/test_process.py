"""The engine lifecycle on real process trees: a small Python HTTP server stands in for an engine (it answers
/health, /v1/models, /version and spawns grandchildren, one of which leaves the process group)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from adapters import vllm
from adapters.base import EngineConfig, FunctionAdapter
from adapters.process import EngineProcess, attached, free_port, launched, port_in_use
from harness.errors import ConfigError, EndpointError, EngineError

FAKE_ENGINE = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    port, delay, pidfile = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    mode = sys.argv[4] if len(sys.argv) > 4 else "serve"
    for i in range(50):
        print(f"log line {i}", flush=True)
    if mode == "exit":
        print("fatal: cannot load model", flush=True)
        sys.exit(3)
    same_group = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    own_session = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    with open(pidfile, "w") as f:
        f.write(f"{os.getpid()} {same_group.pid} {own_session.pid}")
    if mode == "hang":
        time.sleep(600)
    time.sleep(delay)

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            routes = {
                "/health": {},
                "/v1/models": {"object": "list", "data": [{"id": "fake-model", "object": "model"}]},
                "/version": {"version": "9.9.9"},
            }
            if self.path not in routes:
                self.send_response(404); self.end_headers(); return
            body = json.dumps(routes[self.path]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


def fake_adapter(script: Path, pidfile: Path, delay: float = 0.3, mode: str = "serve") -> FunctionAdapter:
    def argv(cfg: EngineConfig) -> list[str]:
        return [sys.executable, str(script), str(cfg.port), str(delay), str(pidfile), mode]

    return replace(
        vllm.ADAPTER,
        info=replace(vllm.INFO, name="fake"),
        launch_argv=argv,
        launch_env=lambda cfg: dict(cfg.env),
    )


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "fake_engine.py"
    path.write_text(FAKE_ENGINE)
    return path


def tree_pids(pidfile: Path, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pidfile.exists() and len(pidfile.read_text().split()) == 3:
            return [int(p) for p in pidfile.read_text().split()]
        time.sleep(0.05)
    raise AssertionError(f"the fake engine never wrote {pidfile}")


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


CFG = EngineConfig(model="fake", port=0)


async def test_launch_ready_describe_and_stop_leaves_nothing(script: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    log = tmp_path / "engines" / "fake.log"
    async with launched(fake_adapter(script, pidfile), CFG, log, ready_timeout=30) as ep:
        pids = tree_pids(pidfile)
        assert ep.model == "fake-model" and ep.version == "9.9.9" and ep.mode == "launched"
        assert ep.cold_start_s is not None and ep.cold_start_s > 0.3  # the fake waits 0.3 s before listening
        assert ep.pid == pids[0] and ep.alive() and ep.death_reason() is None
        assert ep.launch_argv[0] == sys.executable
        assert all(running(p) for p in pids)
        rss = ep.rss_bytes()
        assert rss is not None and rss > 3 * 5_000_000  # three Python interpreters
        port = int(ep.base_url.rsplit(":", 1)[1])
        assert port_in_use("127.0.0.1", port)
        assert ep.manifest_entry("fake")["config"]["port"] == port
    assert not any(running(p) for p in pids), "a process of the tree survived stop"
    assert not port_in_use("127.0.0.1", port)
    assert "log line 49" in log.read_text()


async def test_engine_nice_lowers_the_whole_tree_below_the_client(script: Path, tmp_path: Path) -> None:
    """`--engine-nice 5`: the engine and every process it starts (the grandchildren too, one in its own session)
    run 5 levels below this process; the recorded launch command says so."""
    pidfile = tmp_path / "pids"
    want = min(19, os.nice(0) + 5)
    async with launched(
        fake_adapter(script, pidfile), CFG, tmp_path / "fake.log", ready_timeout=30, nice=5
    ) as ep:
        pids = tree_pids(pidfile)
        assert ep.pid == pids[0]  # `nice` exec's the engine: the pid bench watches is the engine's
        assert [psutil.Process(p).nice() for p in pids] == [want] * 3
        assert ep.launch_argv[:3] == ("nice", "-n", "5") and ep.launch_argv[3] == sys.executable
    assert not any(running(p) for p in pids)
    for bad, words in ((20, "out of range"), (-1, "out of range")):
        with pytest.raises(ConfigError, match=words):
            async with launched(fake_adapter(script, pidfile), CFG, tmp_path / "f.log", nice=bad):
                pass
    with pytest.raises(ConfigError, match="container"):
        async with launched(fake_adapter(script, pidfile), CFG, tmp_path / "f.log", container=True, nice=3):
            pass


async def test_dead_engine_is_detected_with_its_log(script: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    async with launched(fake_adapter(script, pidfile), CFG, tmp_path / "fake.log", ready_timeout=30) as ep:
        pids = tree_pids(pidfile)
        os.kill(pids[0], signal.SIGKILL)
        for _ in range(100):
            if not ep.alive():
                break
            await asyncio.sleep(0.05)
        assert not ep.alive()
        reason = ep.death_reason()
        assert reason == f"fake killed by signal 9 (log: {tmp_path / 'fake.log'})"
        assert ep.log_tail().splitlines()[-1] == "log line 49"
    assert not any(running(p) for p in pids), "orphaned grandchildren survived"


async def test_exit_before_ready_fails_fast_with_log_tail(script: Path, tmp_path: Path) -> None:
    adapter = fake_adapter(script, tmp_path / "pids", mode="exit")
    with pytest.raises(EngineError) as e:
        async with launched(adapter, CFG, tmp_path / "fake.log", ready_timeout=120):
            pass
    msg = str(e.value)
    first, *tail = msg.splitlines()
    assert "exited with code 3 before it was ready" in first
    assert tail[-1] == "fatal: cannot load model"
    assert len(tail) == 30 and tail[0] == "log line 21"  # exactly the last 30 lines


async def test_ready_timeout_shows_log_tail_and_stops_tree(script: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    adapter = fake_adapter(script, pidfile, mode="hang")
    with pytest.raises(EngineError) as e:
        async with launched(adapter, CFG, tmp_path / "fake.log", ready_timeout=1.5):
            pass
    first, *tail = str(e.value).splitlines()
    assert first.startswith("fake was not ready after 2 s (GET http://127.0.0.1:")
    assert "/health: ClientConnectorError" in first
    assert tail[-1] == "log line 49"
    assert not any(running(p) for p in tree_pids(pidfile))


async def test_busy_port_is_refused(script: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(EngineError, match=f"port {port} on 127.0.0.1 is already in use"):
            async with launched(
                fake_adapter(script, tmp_path / "p"), replace(CFG, port=port), tmp_path / "l"
            ):
                pass


async def test_attached_checks_openai_compatibility(script: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    async with launched(fake_adapter(script, pidfile), CFG, tmp_path / "fake.log", ready_timeout=30) as ep:
        async with attached(vllm.ADAPTER, ep.base_url + "/v1/", name="remote") as remote:
            assert (remote.model, remote.version, remote.mode) == ("fake-model", "9.9.9", "attached")
            assert remote.base_url == ep.base_url and remote.alive() and remote.process is None
    closed = free_port()
    with pytest.raises(EndpointError, match=f"cannot reach remote at http://127.0.0.1:{closed}") as e:
        async with attached(vllm.ADAPTER, f"http://127.0.0.1:{closed}", name="remote"):
            pass
    assert "\n" not in str(e.value)
    with pytest.raises(EndpointError, match="not an http"):
        async with attached(vllm.ADAPTER, "localhost:8000", name="remote"):
            pass


async def test_not_openai_compatible(tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path
    )
    try:
        for _ in range(100):
            if port_in_use("127.0.0.1", port):
                break
            await asyncio.sleep(0.05)
        with pytest.raises(EndpointError, match="is not OpenAI-compatible: GET /v1/models gave HTTP 404"):
            async with attached(vllm.ADAPTER, f"http://127.0.0.1:{port}", name="web"):
                pass
    finally:
        server.terminate()
        server.wait(10)


PARENT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from test_process import fake_adapter, CFG
    from adapters.process import launched

    async def main():
        adapter = fake_adapter(Path({script!r}), Path({pidfile!r}))
        async with launched(adapter, CFG, Path({log!r}), ready_timeout=30):
            print("ready", flush=True)
            await asyncio.sleep(600)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupting_bench_stops_the_engine(script: Path, tmp_path: Path, sig: signal.Signals) -> None:
    """`bench` killed with SIGTERM (handler) or interrupted with SIGINT (unwinding) leaves no engine behind."""
    pidfile = tmp_path / "pids"
    parent_py = tmp_path / "parent.py"
    root = str(Path(__file__).resolve().parents[1])
    parent_py.write_text(
        PARENT.format(
            root=root,
            tests=str(Path(__file__).parent),
            script=str(script),
            pidfile=str(pidfile),
            log=str(tmp_path / "fake.log"),
        )
    )
    parent = subprocess.Popen([sys.executable, str(parent_py)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        pids = tree_pids(pidfile)
        assert all(running(p) for p in pids)
        parent.send_signal(sig)
        code = parent.wait(timeout=30)
        assert code != 0
        if sig == signal.SIGTERM:
            assert code == -signal.SIGTERM  # the handler re-delivers the signal after cleaning up
        assert not any(running(p) for p in pids), "the engine outlived bench"
    finally:
        if parent.poll() is None:
            parent.kill()


FAKE_RUNTIME = textwrap.dedent(
    """
    import os, sys
    calls, script, pidfile = sys.argv[1], sys.argv[2], sys.argv[3]
    args = sys.argv[4:]
    with open(calls, "a") as f:
        f.write(" ".join(args[:3]) + "\\n")
    if args[0] == "run":
        port = args[args.index("-p") + 1].rsplit(":", 1)[1]
        os.execv(sys.executable, [sys.executable, script, port, "0.1", pidfile])
    """
)


async def test_container_mode_runs_the_image_argv_and_removes_the_container(
    script: Path, tmp_path: Path
) -> None:
    """A stand-in container runtime: `run` serves like the image would, `rm -f NAME` is recorded."""
    runtime = tmp_path / "fake-docker"
    calls, pidfile = tmp_path / "calls", tmp_path / "pids"
    runtime.write_text(
        f'#!/bin/sh\nexec {sys.executable} {tmp_path / "rt.py"} {calls} {script} {pidfile} "$@"\n'
    )
    runtime.chmod(0o755)
    (tmp_path / "rt.py").write_text(FAKE_RUNTIME)
    cfg = EngineConfig(model="org/model", port=0, env={"HF_TOKEN": "secret"})
    async with launched(
        vllm.ADAPTER, cfg, tmp_path / "c.log", 30, container=True, runtime=str(runtime)
    ) as ep:
        assert ep.mode == "container" and ep.model == "fake-model"
        assert ep.launch_argv[:3] == (str(runtime), "run", "--rm") and vllm.CPU_IMAGE in ep.launch_argv
        entry = ep.manifest_entry("vllm")
        assert entry["config"]["env"] == {"HF_TOKEN": "***"} and "HF_TOKEN=secret" in ep.launch_argv
        assert "HF_TOKEN=***" in entry["launch_argv"] and "HF_TOKEN=secret" not in entry["launch_argv"]
        pids = tree_pids(pidfile)
    port = ep.base_url.rsplit(":", 1)[1]
    assert calls.read_text().splitlines() == ["run --rm --name", f"rm -f enginebench-vllm-{port}"]
    assert not any(running(p) for p in pids)


async def test_a_picked_port_taken_before_the_engine_binds_is_replaced(script: Path, tmp_path: Path) -> None:
    """The race `free_port` cannot exclude: another process binds the port first; the engine exits and is
    started again on a fresh port."""
    squatters: list[socket.socket] = []
    pidfiles: list[Path] = []

    def argv(cfg: EngineConfig) -> list[str]:
        if not squatters:  # first launch: someone else takes the port just before the engine binds it
            s = socket.socket()
            s.bind(("127.0.0.1", cfg.port))
            s.listen()
            squatters.append(s)
        pidfiles.append(tmp_path / f"pids-{len(pidfiles)}")
        return fake_adapter(script, pidfiles[-1]).launch_argv(cfg)

    base = fake_adapter(script, tmp_path / "unused")
    try:
        async with launched(
            replace(base, launch_argv=argv), CFG, tmp_path / "fake.log", ready_timeout=30
        ) as ep:
            taken = squatters[0].getsockname()[1]
            assert ep.alive() and ep.model == "fake-model"
            assert ep.base_url != f"http://127.0.0.1:{taken}"
        assert "Address already in use" in (tmp_path / "fake.log").read_text()
        # the failed first engine had already spawned its children, one in its own session: none may survive
        assert len(pidfiles) == 2
        assert not any(running(p) for f in pidfiles for p in tree_pids(f))
    finally:
        for s in squatters:
            s.close()


def test_a_descendant_that_left_the_group_and_lost_its_parent_is_still_stopped(
    script: Path, tmp_path: Path
) -> None:
    """Found by the tag every descendant inherits, though no snapshot of the tree ever saw it."""
    code = (
        "import subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
        f"open({str(tmp_path / 'orphan')!r}, 'w').write(str(p.pid))"
    )
    proc = EngineProcess("orphaner", [sys.executable, "-c", code], dict(os.environ), tmp_path / "o.log")
    proc.start()
    deadline = time.monotonic() + 10
    while proc.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    orphan = int((tmp_path / "orphan").read_text())
    assert running(orphan) and psutil.Process(orphan).ppid() != proc.pid  # reparented, out of the group
    proc.stop()
    assert not running(orphan)
