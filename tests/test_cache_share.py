"""Issue 21 without a real engine: fresh prompts of the same distribution, each workload's expected cache share, the
measured share and its reconciliation, the warm-cache verdict rule, the reset routes (against small servers that
answer as the engines' sources do), and a prompt supply that never holds up a send (scripted server, slow
tokenizer). The real engines: tests/test_live_cache.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import orjson
import pytest
from aiohttp import web

from adapters.base import CacheReset, EngineInfo
from adapters.registry import get as adapter
from harness.cache import block_tokens_from, cache_share, reset_prefix_cache
from harness.calibration import ScriptConfig, serve_in_process
from harness.client import Target
from harness.records import RequestRecord
from harness.runner import StopRule, run_point
from harness.supply import PromptSupply
from harness.verdict import PointChecks, judge
from workloads.arrival import LoadPoint
from workloads.registry import load_workload
from workloads.tokenizer import SimpleTokenizer

TOK = SimpleTokenizer()


# -- fresh prompts ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["synthetic", "chat", "shared-prefix", "long-context"])
def test_a_prompt_key_changes_the_words_and_nothing_else(name: str) -> None:
    w = load_workload(name)
    a, b, a2 = (w.generate(12, 5, tokenizer=TOK, prompts=k) for k in ("run-a", "run-b", "run-a"))
    assert a == a2  # the same key: the same prompts (what --replay-prompts relies on)
    shape = [(r.request_id, r.input_tokens, r.max_tokens, r.session, r.turn, r.think_time) for r in a]
    assert shape == [(r.request_id, r.input_tokens, r.max_tokens, r.session, r.turn, r.think_time) for r in b]
    texts_a = [r.prompt or orjson.dumps(r.messages).decode() for r in a]
    texts_b = [r.prompt or orjson.dumps(r.messages).decode() for r in b]
    assert all(x != y for x, y in zip(texts_a, texts_b, strict=True))
    # the distribution's fingerprint is the seed's, whatever the key
    assert w.fingerprint_for(5) == w.fingerprint_for(5)


def test_the_iterator_gives_the_same_requests_as_generate() -> None:
    for name in ("chat", "shared-prefix"):
        w = load_workload(name)
        it = w.requests(3, tokenizer=TOK, prompts="k")
        assert [next(it) for _ in range(9)] == w.generate(9, 3, tokenizer=TOK, prompts="k")


def test_each_workload_states_what_it_expects_from_the_cache() -> None:
    synthetic = load_workload("synthetic").generate(3, tokenizer=TOK)
    assert {r.tags["cache_expected_tokens"] for r in synthetic} == {"0"}  # completions: no template
    sp = load_workload("shared-prefix").generate(10, tokenizer=TOK)
    for r in sp:
        expected = int(r.tags["cache_expected_tokens"])
        if r.tags["role"] == "reuse":
            assert expected == 1024  # the shared prefix (the test tokenizer counts words)
        else:
            assert expected == 0  # warm-ups and controls share nothing
    chat = load_workload("chat").generate(20, tokenizer=TOK)
    by_id = {r.request_id: r for r in chat}
    template = TOK.count_chat([{"role": "user", "content": " the"}]) - 1
    for r in chat:
        expected = int(r.tags["cache_expected_tokens"])
        if r.history_from is None:
            assert expected == template
        else:  # the previous turn's prompt and its (pinned) reply, and the template
            prev = by_id[r.history_from]
            assert expected == min(r.input_tokens or 0, (prev.input_tokens or 0) + prev.max_tokens + template)


# -- measured share, expected share, reconciliation, the verdict ----------------------------------------------------


def _rec(i: int, prompt: int, cached: int | None, expected: int, phase: str = "measure") -> RequestRecord:
    return RequestRecord(
        request_id=f"r{i}", engine="e", point="concurrency=1", phase=phase,  # type: ignore[arg-type]
        scheduled=float(i), sent=float(i), done=float(i) + 0.5, prompt_tokens=prompt, cached_tokens=cached,
        tags={"cache_expected_tokens": str(expected)},
    )  # fmt: skip


def test_cache_share_from_requests_expected_in_blocks_and_reconciled() -> None:
    # 4 measured requests of 300 tokens: the workload expects 200 of each from the cache; the engine served 256
    # (two 128-token blocks) of each; a warm-up of 300 tokens served 0
    recs = [_rec(i, 300, 256, 200) for i in range(4)] + [_rec(9, 300, 0, 0, "warmup")]
    counters = {"prompt_tokens_total": 1500.0, "prompt_tokens_cached_total": 1024.0}
    share = cache_share(recs, counters, block_tokens=128)
    assert share.basis == "requests" and share.requests_counted == 4
    assert share.measured == pytest.approx(256 / 300)
    assert share.expected == pytest.approx(200 / 300)
    assert share.expected_in_blocks == pytest.approx(128 / 300)  # 200 tokens fill one whole block
    assert share.engine_share == pytest.approx(1024 / 1500)
    assert share.reconciled == "agree" and share.client_cached_tokens == 1024
    off = cache_share(recs, {**counters, "prompt_tokens_cached_total": 1536.0}, block_tokens=128)
    assert off.reconciled == "disagree" and "1024" in off.reconcile_note and "1536" in off.reconcile_note


def test_without_per_request_counts_the_engine_counters_are_the_basis() -> None:
    recs = [_rec(i, 200, None, 0) for i in range(3)]
    share = cache_share(recs, {"prefix_cache_queries_total": 600.0, "prefix_cache_hits_total": 150.0})
    assert share.basis == "engine" and share.measured == pytest.approx(0.25)
    assert share.engine_basis == "prefix_cache_hits_total / prefix_cache_queries_total"
    assert cache_share(recs, None).basis == "none" and cache_share(recs, None).measured is None


def _checks(share: float, expected: float, replayed: bool = False) -> PointChecks:
    return PointChecks(measured=40, duration_s=20.0, closed_loop=True, cache_share=share,
                       cache_expected_share=expected, cache_replayed=replayed)  # fmt: skip


def test_the_warm_cache_rule() -> None:
    warm = judge(_checks(255 / 256, 0.0))  # the second run: 255 of 256 tokens from the cache
    assert warm.status == "INVALID" and [r.code for r in warm.reasons] == ["warm_cache"]
    assert "warm cache: 100% of prompt tokens came from the engine's cache; the workload expects 0%" in (
        warm.reasons[0].message
    )
    assert "fresh prompts" in warm.recommendation and "restart the engine" in warm.recommendation
    assert judge(_checks(0.04, 0.0)).status == "VALID"  # a word or two found by chance
    assert judge(_checks(0.70, 0.68)).status == "VALID"  # shared-prefix at its design
    assert judge(_checks(0.80, 0.68)).status == "INVALID"
    assert judge(_checks(0.99, 0.0, replayed=True)).status == "VALID"  # replayed: a warm cache is expected


def test_block_size_from_vllm_metrics() -> None:
    text = (
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
        'vllm:cache_config_info{block_size="128",cache_dtype="auto",enable_prefix_caching="True",engine="0"} 1.0\n'
    )
    assert block_tokens_from(text) == 128
    assert block_tokens_from("llamacpp:prompt_tokens_total 10\n") is None


# -- resets, against servers that answer as the engines' sources say --------------------------------------------


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def test_reset_routes_and_what_a_refusal_says() -> None:
    import aiohttp

    calls: list[str] = []

    async def vllm_reset(request: web.Request) -> web.Response:  # false while blocks are held, then true
        calls.append(request.path)
        return web.json_response({"success": len(calls) > 1})

    async def props(request: web.Request) -> web.Response:
        return web.json_response({"total_slots": 3})

    async def slot(request: web.Request) -> web.Response:
        calls.append(f"{request.path}?{request.query_string}")
        return web.json_response({"id_slot": int(request.match_info["i"]), "n_erased": 10})

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/reset_prefix_cache", vllm_reset)
        app.router.add_get("/props", props)
        app.router.add_post("/slots/{i}", slot)
        runner, url = await _serve(app)
        try:
            async with aiohttp.ClientSession() as s:
                vllm = adapter("vllm").info
                out = await reset_prefix_cache(s, url, vllm, retry_wait_s=0.01)
                assert out == {"route": "POST /reset_prefix_cache", "ok": True} and len(calls) == 2
                calls.clear()
                out = await reset_prefix_cache(s, url, adapter("llamacpp").info)
                assert out["ok"] and out["slots"] == 3 and "--cache-ram" in out["leaves"]
                assert calls == [f"/slots/{i}?action=erase" for i in range(3)]
                # a route the server does not have: what it said, and what it needs
                out = await reset_prefix_cache(s, url, adapter("sglang").info)
                assert (
                    not out["ok"]
                    and out["status"] == 404
                    and "POST /flush_cache answered 404" in out["reason"]
                )
                bare = EngineInfo(**{**vars(vllm), "cache_reset": None})
                assert "offers no route" in (await reset_prefix_cache(s, url, bare))["reason"]
                gone = EngineInfo(
                    **{**vars(vllm), "cache_reset": CacheReset("POST", "/nope", needs="a flag")}
                )
                out = await reset_prefix_cache(s, url, gone)
                assert not out["ok"] and "it needs a flag" in out["reason"]
        finally:
            await runner.cleanup()

    asyncio.run(main())


# -- the prompt supply ------------------------------------------------------------------------------------------


class SlowTokenizer(SimpleTokenizer):
    """The test tokenizer behind a round trip: each call blocks `delay_s`, as an engine's /tokenize over a network."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        time.sleep(self.delay_s)
        return super().encode(text)

    def count_prompt(self, text: str) -> int:
        return len(self.encode(text))

    def count_chat(self, messages: Sequence[Mapping[str, str]]) -> int:
        self.calls += 1
        time.sleep(self.delay_s)
        return super().count_chat(messages)


def test_supply_hands_out_the_workloads_requests_in_order_and_builds_ahead() -> None:
    w = load_workload("synthetic")
    supply = PromptSupply(lambda: w.requests(0, SlowTokenizer(0.0), "k"), first=5)
    supply.prepare()
    assert supply.built_ahead == 5
    with supply:
        got = [next(supply) for _ in range(40)]
    assert got == w.generate(40, 0, tokenizer=TOK, prompts="k")
    assert supply.built_during_point >= 35
    stats = supply.stats()
    assert stats["specs_built_ahead"] == 5 and stats["specs_built_during_point"] == supply.built_during_point


def test_a_trace_supply_ends_with_its_rows() -> None:
    supply = PromptSupply(lambda: iter(load_workload("synthetic").generate(3, tokenizer=TOK)), first=2)
    with supply:
        assert len(list(supply)) == 3


def test_a_duration_point_never_waits_for_a_prompt(tmp_path: Path) -> None:
    """The issue's scenario: a 15 s point at concurrency 1, 12 prompts built before it, the rest with a tokenizer
    that takes 5 ms a call (several calls a prompt, ~half a request's time): no send waits for a prompt, and every
    send leaves within 1 ms of its due time (p99). Before, sends after each top-up left 0.2-1.4 s late."""
    tok = SlowTokenizer(0.005)
    w = load_workload("synthetic", overrides={"input_tokens": 64, "output_tokens": 8})
    with serve_in_process(ScriptConfig(ttft=0.03, itl=0.003, output_tokens=8)) as url:
        target = Target("scripted", url, adapter("scripted"), "scripted")
        supply = PromptSupply(lambda: w.requests(0, tok, "k"), first=12)
        supply.prepare()
        records: list[RequestRecord] = []
        start = time.perf_counter()
        with supply:
            outcome = asyncio.run(
                run_point(target, supply, LoadPoint("concurrency", 1, "closed"), StopRule(duration_s=15.0), records.append,
                          start)
            )  # fmt: skip
    measured = [r for r in records if r.phase == "measure" and r.ok]
    assert len(measured) > 100  # ~55 ms a request: the 12 built ahead ran out within the first second
    assert supply.built_during_point > 80 and tok.calls > 300
    lags = np.array([r.sent - r.scheduled for r in measured if r.sent is not None]) * 1000.0
    p99 = float(np.percentile(lags, 99))
    if p99 >= 1.0:
        wait = outcome.client_cpu.cpu_wait
        if wait is not None and wait > 0.10:
            pytest.skip(
                f"the client waited for a CPU {wait:.0%} of the point (other processes); p99 {p99:.2f} ms"
            )
    assert supply.waits == 0, f"{supply.waits} sends waited {supply.waited_s:.3f} s for a prompt"
    assert p99 < 1.0, f"send lag p99 {p99:.2f} ms"


# -- `bench run` end to end against the scripted server (no prefix cache, no reset route) --------------------------


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_bench_run_fresh_keys_repeats_and_replay(tmp_path: Path) -> None:
    with serve_in_process(ScriptConfig(ttft=0.005, itl=0.001, output_tokens=4)) as url:
        common = ["--endpoint", f"scripted={url}", "--workload", "synthetic", "--set", "input_tokens=32",
                  "--set", "output_tokens=4", "--concurrency", "1", "--requests", "3", "--warmup", "0"]  # fmt: skip
        a, b = tmp_path / "a", tmp_path / "b"
        for out, extra in ((a, ["--repeat", "2"]), (b, [])):
            done = _bench("run", *common, "--seed", "3", *extra, "--out", str(out))
            assert done.returncode == 0, done.stderr[-2000:]
        manifests = [orjson.loads((d / "manifest.json").read_bytes()) for d in (a, b)]
        keys = [m["workload"]["prompts"]["key"] for m in manifests]
        assert all(keys) and keys[0] != keys[1]  # the same seed, fresh prompts
        assert manifests[0]["workload"]["fingerprint"] == manifests[1]["workload"]["fingerprint"]
        events = [orjson.loads(line) for line in (a / "events.jsonl").read_bytes().splitlines()]
        starts = [e for e in events if e.get("kind") == "point_start"]
        assert [e["repeat"] for e in starts] == [1, 2]  # every repeat: the run's one fingerprint
        assert {e["workload_fingerprint"] for e in starts} == {manifests[0]["workload"]["fingerprint"]}
        resets = [e for e in events if e.get("kind") == "cache_reset"]
        assert len(resets) == 2 and not any(e["ok"] for e in resets)  # the scripted server offers none...
        assert "offers no route" in resets[0]["reason"]
        assert (
            "no route to empty" in manifests[0]["engines"][0]["cache_reset_none"]
        )  # ...said in the manifest
        ends = [e for e in events if e.get("kind") == "point_end"]
        assert all(e["specs_waits"] == 0 for e in ends)
        # replay: the first run's key; another seed is refused with one line naming the fix
        c = tmp_path / "c"
        done = _bench("run", *common, "--seed", "3", "--replay-prompts", str(a), "--out", str(c))
        assert done.returncode == 0, done.stderr[-2000:]
        replay = orjson.loads((c / "manifest.json").read_bytes())["workload"]["prompts"]
        assert replay["key"] == keys[0] and replay["replayed_from"] == str(a.resolve())
        bad = _bench("run", *common, "--seed", "4", "--replay-prompts", str(a), "--out", str(tmp_path / "d"))
        assert bad.returncode != 0 and "give the same --workload, --set and --seed" in bad.stderr
        assert "Traceback" not in bad.stderr


def test_cache_share_reaches_the_summary_table_and_decide(tmp_path: Path) -> None:
    """Records with the engine's cached-token counts -> summary.json's `cache` -> the run table's column and
    `bench decide`'s inputs, beside TTFT."""
    from harness.decide import load_run
    from harness.rundir import RunDir
    from harness.summary import rebuild_summary, render_table

    run = RunDir.create(tmp_path / "run")
    run.start(run_id="run", workload={"name": "synthetic", "kind": "synthetic", "fingerprint": "sha256:x"})
    for i in range(4):
        rec = _rec(i, 200, 150, 0)
        rec.first_byte, rec.chunk_times, rec.chunk_tokens = i + 0.1, [i + 0.1], [1]
        rec.output_tokens, rec.token_source = 1, "server_usage"
        run.append_record(rec)
    run.close()
    summary = rebuild_summary(run.path)
    (p,) = summary.points
    assert p.cache is not None and p.cache.measured == pytest.approx(0.75) and p.cache.expected == 0.0
    assert "warm_cache" in {r.code for r in p.verdict.reasons}
    from rich.console import Console

    console = Console(width=220, record=True)
    console.print(render_table(summary))
    assert "75% (0%)" in console.export_text()
    points, _, _, description = load_run(run.path)
    assert points[0].cache_share == pytest.approx(0.75) and points[0].cache_expected_share == 0.0
    (row,) = description["cache_share"]
    assert row["measured"] == pytest.approx(0.75) and row["ttft_p50_ms"] == pytest.approx(100.0)
