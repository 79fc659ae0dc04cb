"""Real engines on this machine: launch, stream real requests through the harness client, check the engine's own
counters agree with what the client recorded, and check that nothing is left running after stop.

Skips (with the reason) when an engine is not installed: `bench engines install vllm llamacpp`.
vLLM takes ~30 s to start here; llama.cpp ~1 s.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import orjson
import psutil
import pytest

from adapters import registry
from adapters.base import Adapter, EngineConfig, FunctionAdapter
from adapters.process import Endpoint, launched
from adapters.prometheus import Histogram, Value, delta, scrape
from harness.client import Target, make_session, send_request, timeouts_for
from harness.records import RequestRecord
from workloads.spec import RequestSpec

pytestmark = [pytest.mark.live, pytest.mark.timeout(600)]

MAX_TOKENS = 24
# long enough (> one 128-token vLLM block) that a repeat can hit the prefix cache
SHARED = "You are a careful assistant. " + " ".join(
    f"Fact {i}: the number {i} squared is {i * i}." for i in range(20)
)


def specs() -> list[RequestSpec]:
    chat = [
        RequestSpec(
            f"chat-{i}",
            "chat",
            MAX_TOKENS,
            messages=({"role": "user", "content": f"Tell me about {topic}."},),
        )
        for i, topic in enumerate(("rivers", "mountains", "the sea"))
    ]
    cmpl = [RequestSpec("cmpl-0", "completions", MAX_TOKENS, prompt="Once upon a time, in a small village,")]
    return chat + cmpl


def engine_or_skip(name: str) -> Adapter:
    adapter = registry.get(name)
    avail = registry.availability(adapter)
    if not avail.runnable:
        pytest.skip(f"{name} cannot run here: {avail.reason}")
    return adapter


async def metrics(session: aiohttp.ClientSession, ep: Endpoint, adapter: Adapter) -> dict[str, Value]:
    async with session.get(ep.base_url + (adapter.info.metrics_path or "/metrics")) as r:
        assert r.status == 200
        return scrape(await r.text(), adapter.metrics)


async def send_all(ep: Endpoint, adapter: Adapter, batch: list[RequestSpec]) -> list[RequestRecord]:
    target = Target(engine=ep.name, base_url=ep.base_url, adapter=adapter, model=ep.model)
    start = time.perf_counter()
    async with make_session(target) as session:
        timeout = timeouts_for(True, 60.0, 120.0)
        return await asyncio.gather(
            *(
                send_request(session, target, s, point="live", phase="measure", scheduled=0.0, run_start=start,
                             timeout=timeout)
                for s in batch
            )
        )  # fmt: skip


def listeners(port: int) -> list[int | None]:
    """pids of processes listening on `port` (any address)."""
    return [
        c.pid
        for c in psutil.net_connections("tcp")
        if c.status == "LISTEN" and c.laddr and c.laddr[1] == port
    ]


def tree_and_listeners(ep: Endpoint) -> tuple[list[psutil.Process], int]:
    assert ep.process is not None
    procs = ep.process.tree()
    return procs, len(listeners(int(ep.base_url.rsplit(":", 1)[1])))


async def check_engine(name: str, tmp_path: Path, ready_timeout: float) -> dict[str, object]:
    adapter = engine_or_skip(name)
    cfg = registry.default_config(name)
    facts: dict[str, object] = {}
    try:
        async with launched(adapter, cfg, tmp_path / f"{name}.log", ready_timeout) as ep:
            facts.update(
                version=ep.version,
                cold_start_s=round(ep.cold_start_s or 0, 2),
                rss_mb=(ep.rss_bytes() or 0) >> 20,
            )
            procs, listening = tree_and_listeners(ep)
            port = int(ep.base_url.rsplit(":", 1)[1])
            assert procs and listening == 1
            assert ep.model == registry.SERVED_MODEL and ep.version
            async with aiohttp.ClientSession() as session:
                before = await metrics(session, ep, adapter)
                records = await send_all(ep, adapter, specs())
                # the same long prompt twice in a row: the second can reuse the first's prefix
                repeat = [RequestSpec(f"rep-{i}", "completions", 4, prompt=SHARED) for i in range(2)]
                records += await send_all(ep, adapter, repeat[:1]) + await send_all(ep, adapter, repeat[1:])
                after = await metrics(session, ep, adapter)
                assert isinstance(adapter, FunctionAdapter)
                tok_call = adapter.tokenize_call(SHARED, ep.model, add_special=True)
                async with session.post(ep.base_url + tok_call.path, json=tok_call.body) as r:
                    shared_tokens = len(adapter.tokens_from(orjson.loads(await r.read())))
            check_records(records)
            check_counters(name, records, delta(before, after), after)
            assert records[-1].prompt_tokens == shared_tokens  # the engine's tokenizer agrees with its usage
            facts["prompt_tokens_shared"] = shared_tokens
            facts["cached_on_repeat"] = records[-1].cached_tokens
            facts["rss_mb_after"] = (ep.rss_bytes() or 0) >> 20
            procs, _ = tree_and_listeners(ep)  # everything the engine spawned by now
            facts["processes"] = len(procs)
            stopping = time.perf_counter()
        facts["stop_s"] = round(time.perf_counter() - stopping, 2)
        assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], (
            "engine left behind"
        )
        assert not listeners(port), f"something still listens on {port}"
        argv_port = [
            p.pid for p in psutil.process_iter(["cmdline"]) if str(port) in (p.info["cmdline"] or [])
        ]
        assert not argv_port, f"processes launched with port {port} survive: {argv_port}"
    except BaseException as e:
        registry.record_live_test(name, False, str(facts.get("version")), f"{type(e).__name__}: {e}"[:300])
        raise
    registry.record_live_test(name, True, str(facts["version"]), orjson.dumps(facts).decode())
    return facts


def check_records(records: list[RequestRecord]) -> None:
    for rec in records:
        assert rec.ok, (rec.request_id, rec.status, rec.error)
        assert rec.token_source == "server_usage" and rec.prompt_tokens and rec.prompt_tokens > 0
        expected = MAX_TOKENS if not rec.request_id.startswith("rep") else 4
        assert rec.output_tokens == expected, (rec.request_id, rec.output_tokens)  # ignore_eos honoured
        assert rec.client_output_tokens == rec.output_tokens  # one token per chunk: the stream agrees
        assert rec.finish_reason == "length"


def check_counters(
    name: str, records: list[RequestRecord], d: dict[str, Value], after: dict[str, Value]
) -> None:
    """The engine's own counters against what the client recorded: exact for token counts."""
    prompt = sum(r.prompt_tokens or 0 for r in records)
    output = sum(r.output_tokens or 0 for r in records)
    assert d["generation_tokens_total"] == output
    assert d["prompt_tokens_total"] == prompt
    assert after["requests_running"] == 0 and after["requests_waiting"] == 0
    cached = d.get("prompt_tokens_cached_total")
    assert isinstance(cached, float) and cached >= 128, (
        f"the repeated prompt was not served from cache: {cached}"
    )
    if name == "vllm":
        assert d["requests_finished_total"] == len(records)
        ttft = d["ttft_seconds"]
        assert isinstance(ttft, Histogram) and ttft.count == len(records)
        usage = after["kv_cache_usage"]
        assert isinstance(usage, float) and 0.0 <= usage <= 1.0
        hits = d["prefix_cache_hits_total"]
        assert isinstance(hits, float) and hits >= 128


async def test_llamacpp_live(tmp_path: Path) -> None:
    facts = await check_engine("llamacpp", tmp_path, ready_timeout=120)
    print("llamacpp", facts)


async def test_llamacpp_prefix_cache_off(tmp_path: Path) -> None:
    """`prefix_caching=False` really disables reuse: the same prompt twice reports 0 cached tokens."""
    adapter = engine_or_skip("llamacpp")
    cfg: EngineConfig = replace(registry.default_config("llamacpp"), prefix_caching=False)
    async with launched(adapter, cfg, tmp_path / "llamacpp.log", 120) as ep:
        repeat = [RequestSpec(f"rep-{i}", "completions", 4, prompt=SHARED) for i in range(2)]
        records = await send_all(ep, adapter, repeat[:1]) + await send_all(ep, adapter, repeat[1:])
    assert all(r.ok for r in records)
    assert [r.cached_tokens for r in records] == [0, 0]


async def test_vllm_live(tmp_path: Path) -> None:
    facts = await check_engine("vllm", tmp_path, ready_timeout=400)
    print("vllm", facts)
