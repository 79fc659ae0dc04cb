"""Live checks of the GPU-class adapters against a real engine: one short streamed request through the adapter's own
codec (aiohttp + the harness SSE parser), and a metrics scrape that must map to canonical names.

Where an engine comes from, per engine NAME (sglang, lmdeploy, trtllm, tgi, ollama, mlc, triton, rayserve, mii):
- `ENGINEBENCH_ENDPOINT_<NAME>=http://host:port`: attach to a running engine (any machine);
- else, when `adapter.local_status()` says it can run here and `ENGINEBENCH_MODEL_<NAME>` names a model, launch it;
- else skip, with the reason. `ENGINEBENCH_METRICS_<NAME>=URL` overrides where metrics are scraped (Ray Serve
  exports them on a separate port).
The same suite therefore runs unchanged on a GPU machine.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from adapters import registry, tgi
from adapters.base import Adapter, EngineConfig, StreamDelta
from adapters.process import Endpoint, attached, launched
from adapters.prometheus import scrape
from harness.sse import SSEParser
from workloads.spec import RequestSpec

pytestmark = [pytest.mark.live, pytest.mark.timeout(1800)]

ENGINES = (
    "sglang",
    "lmdeploy",
    "trtllm",
    "tgi",
    "ollama",
    "mlc",
    "triton",
    "triton-trtllm",
    "rayserve",
    "mii",
)
MAX_TOKENS = 16
SPEC = RequestSpec(
    "live-0", "chat", MAX_TOKENS, messages=({"role": "user", "content": "Count from one to twenty."},)
)


def _env(prefix: str, name: str) -> str | None:
    return os.environ.get(f"ENGINEBENCH_{prefix}_{name.upper().replace('-', '_')}") or None


@contextlib.asynccontextmanager
async def engine(name: str, tmp_path: Path) -> AsyncIterator[tuple[Adapter, Endpoint]]:
    adapter = registry.get(name)
    url = _env("ENDPOINT", name)
    if url:
        async with attached(adapter, url, name=name) as ep:
            yield adapter, ep
        return
    runnable, why = adapter.local_status()
    model = _env("MODEL", name)
    if not runnable:
        pytest.skip(why)
    if model is None:
        pytest.skip(f"{name} can run here but ENGINEBENCH_MODEL_{name.upper()} names no model to serve")
    cfg = EngineConfig(model=model, port=0, max_context=4096)
    async with launched(adapter, cfg, tmp_path / f"{name}.log", ready_timeout=1500.0, name=name) as ep:
        yield adapter, ep


async def stream(
    session: aiohttp.ClientSession, base_url: str, call_body: dict[str, object], path: str, parse: object
) -> list[StreamDelta]:
    deltas: list[StreamDelta] = []
    parser = SSEParser()
    async with session.post(base_url + path, data=orjson.dumps(call_body),
                            headers={"Content-Type": "application/json"}) as r:  # fmt: skip
        body_start = b""
        if r.status != 200:
            body_start = await r.content.read(500)
        assert r.status == 200, f"POST {path}: HTTP {r.status} {body_start!r}"
        async for chunk in r.content.iter_any():
            for data in parser.feed(chunk):
                if data != b"[DONE]":
                    d = parse(data)  # type: ignore[operator]
                    if d is not None:
                        deltas.append(d)
        for data in parser.close():
            if data != b"[DONE]":
                d = parse(data)  # type: ignore[operator]
                if d is not None:
                    deltas.append(d)
    return deltas


@pytest.mark.parametrize("name", ENGINES)
async def test_live_streamed_request(name: str, tmp_path: Path) -> None:
    async with engine(name, tmp_path) as (adapter, ep), aiohttp.ClientSession() as session:
        call = adapter.build(SPEC, ep.model, True)
        assert call.body is not None
        deltas = await stream(session, ep.base_url, dict(call.body), call.path, adapter.parse_event)
        assert not [d.error for d in deltas if d.error]
        tokens = sum(d.tokens for d in deltas)
        assert tokens > 0, f"{name}: no output tokens in {len(deltas)} events"
        usage = next((d.usage for d in reversed(deltas) if d.usage), None)
        if adapter.info.usage_in_stream:
            assert usage is not None and usage.completion_tokens, f"{name} claims usage in streams; none came"
            if adapter.info.tokens_per_chunk == "one":
                assert tokens == usage.completion_tokens  # one token per chunk, as claimed
            if adapter.info.honours_ignore_eos or adapter.info.honours_min_tokens:
                assert usage.completion_tokens == MAX_TOKENS, f"{name} claims to pin output length"
        if name == "tgi":  # the native API beside the Messages API
            native = tgi.build_native(SPEC, ep.model, True)
            assert native.body is not None
            nd = await stream(session, ep.base_url, dict(native.body), native.path, tgi.parse_native_event)
            last = next(d for d in reversed(nd) if d.usage)
            assert last.usage is not None and last.usage.completion_tokens == sum(d.tokens for d in nd) > 0


@pytest.mark.parametrize("name", ENGINES)
async def test_live_metrics_map_to_canonical_names(name: str, tmp_path: Path) -> None:
    adapter = registry.get(name)
    if adapter.info.metrics_path is None and _env("METRICS", name) is None:
        pytest.skip(
            f"{name} exposes no Prometheus metrics on its HTTP port (set ENGINEBENCH_METRICS_{name.upper()})"
        )
    async with engine(name, tmp_path) as (adapter, ep), aiohttp.ClientSession() as session:
        call = adapter.build(SPEC, ep.model, True)
        assert call.body is not None
        await stream(session, ep.base_url, dict(call.body), call.path, adapter.parse_event)
        url = _env("METRICS", name) or ep.base_url + str(adapter.info.metrics_path)
        async with session.get(url) as r:
            assert r.status == 200, f"GET {url}: HTTP {r.status}"
            text = await r.text()
        mapped = scrape(text, adapter.metrics)
        assert mapped, f"{name}: none of {sorted(adapter.metrics.names)} in {url}"
