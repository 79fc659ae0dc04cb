"""Secrets and exposure: an API key reaches the server and nothing else (no manifest, log, event, record, summary,
report or decision holds it); the recorded command line has secret values redacted; launched engines bind to
loopback unless told otherwise; launch commands are argv lists, never shell strings. (Escaping of user- and
model-supplied text in reports is covered by tests/test_report.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from adapters import registry
from adapters.base import EngineConfig
from harness.calibration import ScriptConfig, serve_in_process
from harness.cli.run import redacted_argv

BENCH = [sys.executable, "-m", "harness.cli"]
KEY = "sk-enginebench-PLANTED-7f3a9c1e55d04b2b"


class RecordingProxy:
    """A reverse proxy on loopback, in its own thread: forwards everything to `upstream` (streaming the answers
    through) and remembers the Authorization header of every request it saw."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization)
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _main(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with aiohttp.ClientSession(auto_decompress=False) as client:

            async def handle(request: web.Request) -> web.StreamResponse:
                self.seen.append((request.path, request.headers.get("Authorization")))
                body = await request.read()
                headers = {
                    k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
                }
                async with client.request(
                    request.method, self.upstream + request.path_qs, data=body, headers=headers
                ) as up:
                    resp = web.StreamResponse(status=up.status)
                    resp.content_type = up.content_type
                    await resp.prepare(request)
                    async for chunk in up.content.iter_any():
                        await resp.write(chunk)
                    await resp.write_eof()
                    return resp

            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}"
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()


@pytest.fixture(scope="module")
def proxy() -> Iterator[RecordingProxy]:
    with (
        serve_in_process(ScriptConfig(ttft=0.01, itl=0.002, output_tokens=6)) as url,
        RecordingProxy(url) as p,
    ):
        yield p


def bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BENCH, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


def _files_holding(root: Path, secret: str) -> list[Path]:
    needle = secret.encode()
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_api_key_reaches_the_server_and_nowhere_else(proxy: RecordingProxy, tmp_path: Path) -> None:
    key_file = tmp_path / "secret" / "key.txt"
    key_file.parent.mkdir()
    key_file.write_text(KEY + "\n")
    work = tmp_path / "work"
    runs = [work / "env-run", work / "file-run"]
    common = ["--endpoint", f"scripted={proxy.url}", "--workload", "synthetic", "--set", "output_tokens=6"]
    common += ["--concurrency", "2", "--requests", "6", "--warmup", "1"]
    before = len(proxy.seen)
    r1 = bench(
        "run", *common, "--api-key-env", "EB_TEST_KEY", "--out", str(runs[0]), env={"EB_TEST_KEY": KEY}
    )
    r2 = bench("run", *common, "--api-key-file", str(key_file), "--out", str(runs[1]))
    outputs = [r1, r2]
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    # the server did get the key, on every completion request of both runs
    completions = [auth for path, auth in proxy.seen[before:] if path.endswith("/completions")]
    assert len(completions) == 2 * 7
    assert all(auth == f"Bearer {KEY}" for auth in completions)

    outputs.append(bench("summarize", str(runs[0])))
    outputs.append(bench("report", *map(str, runs), "-o", str(work / "report.html")))
    outputs.append(bench("decide", *map(str, runs), "--json", str(work / "decision.json")))
    for r in outputs:
        assert r.returncode == 0, r.stderr
        assert KEY not in r.stdout + r.stderr
    assert (work / "report.html").exists() and (work / "decision.json").exists()
    files = [p for p in work.rglob("*") if p.is_file()]
    assert len(files) >= 8  # manifests, records, events, summaries, the report, the decision
    assert _files_holding(work, KEY) == []
    assert _files_holding(work, KEY[:20]) == []  # not even a prefix
    # the manifest records how the key was given, not the key
    assert "EB_TEST_KEY" in (runs[0] / "manifest.json").read_text()


def test_a_key_on_the_command_line_is_redacted() -> None:
    argv = ["bench", "run", "--api-key", KEY, "--api-key=" + KEY, "--api-key-env", "NAME", "--token", KEY]
    argv += ["--api-key-file", "/tmp/k", "--endpoint", f"x=http://user:{KEY}@host:8000/v1", "--out", "r"]
    out = redacted_argv(argv)
    assert KEY not in " ".join(out)
    assert out[2:6] == ["--api-key", "***", "--api-key=***", "--api-key-env"]
    assert "NAME" in out and "/tmp/k" in out  # where the key is, not what it is
    assert "x=http://user:***@host:8000/v1" in out and out[-2:] == ["--out", "r"]


def test_credentials_in_an_endpoint_url_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = bench("run", "--endpoint", f"x=http://u:{KEY}@127.0.0.1:9/v1", "--out", str(out))
    assert r.returncode == 2 and "credentials in the URL" in r.stderr and "--api-key-env" in r.stderr
    assert KEY not in r.stdout + r.stderr and not out.exists()


def _config_for(name: str, tmp_path: Path) -> EngineConfig:
    model = "/models/m.gguf" if name == "llamacpp" else "/models/m"
    env = {"TRITON_TOKENIZER": "/models/m"} if name.startswith("triton") else {}
    extra: tuple[str, ...] = ()
    if name == "trtllm":  # its metrics switches have no flag: a launch needs them in its LLM API options YAML
        options = tmp_path / "llm_api_options.yaml"
        options.write_text("return_perf_metrics: true\nenable_iter_perf_stats: true\n")
        extra = ("--extra_llm_api_options", str(options))
    return EngineConfig(model=model, env=env, extra_args=extra)


@pytest.mark.parametrize("name", sorted(registry.adapters()))
def test_launched_engines_bind_to_loopback_by_default(name: str, tmp_path: Path) -> None:
    adapter = registry.get(name)
    cfg = _config_for(name, tmp_path)
    argv = adapter.launch_argv(cfg)
    assert (
        isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)
    )  # an argv, not a shell line
    env = adapter.launch_env(cfg)
    where = " ".join(argv) + " " + " ".join(f"{k}={v}" for k, v in env.items())
    assert "127.0.0.1" in where, where
    assert "0.0.0.0" not in where and "[::]" not in where
    # told otherwise, it binds where told
    wide = dataclasses.replace(cfg, host="0.0.0.0")
    assert "0.0.0.0" in " ".join(adapter.launch_argv(wide)) + " ".join(adapter.launch_env(wide).values())


def test_no_launch_goes_through_a_shell() -> None:
    # adapters/process.py starts engines with subprocess argv lists; a shell would interpret model paths
    source = (Path(__file__).parents[1] / "adapters" / "process.py").read_text()
    assert "shell=True" not in source and "os.system" not in source
    with contextlib.suppress(ImportError):
        import adapters.process as process

        assert "create_subprocess_shell" not in Path(process.__file__).read_text()
