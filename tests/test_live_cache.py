"""Issue 21 on the real engines: a second run against the same running server, with the same seed.

Each engine is launched once for its test (llama.cpp ~1 s, vLLM ~30-140 s) at nice 19 and every run attaches to
it through the library `bench run` calls (`harness.orchestrate.execute`), as `--endpoint NAME=URL` does:
- a second run with the same seed sends fresh prompts: its cache share is below 5 % and no warm-cache reason;
- a run that sends the first run's very prompts to a cache it does not empty (the issue's scenario) is not VALID,
  with the warm-cache reason;
- `--replay-prompts` sends them again and expects the warm cache (a note, not a reason);
- where the engine offers a reset (vLLM with VLLM_SERVER_DEV_MODE, EngineBench's default; llama.cpp with
  --slot-save-path), the same prompts after the reset find the cache empty;
- shared-prefix and chat keep their designed cache share, without the warm-cache reason.
Sizes are tiny (a few requests of a few hundred tokens): the default policy calls every point INVALID for too few
requests, so the checks read the cache share and the reason codes, never the status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from adapters import registry
from adapters.base import EngineConfig
from harness.orchestrate import EngineChoice, RunConfig, RunResult, execute
from harness.runner import StopRule
from harness.summary import PointSummary
from workloads.arrival import LoadPoint

pytestmark = [pytest.mark.live, pytest.mark.timeout(1200)]


def need(engine: str) -> None:
    avail = registry.availability(registry.get(engine))
    if not avail.runnable:
        pytest.skip(f"{engine} cannot run here: {avail.reason}")


@pytest.fixture
def engine_server(tmp_path: Path) -> Iterator[Any]:
    """`start(name, cfg)` launches the engine on an event loop in a helper thread and returns its URL; stopped at
    the end of the test."""
    threads: list[tuple[threading.Thread, threading.Event]] = []

    def start(name: str, cfg: EngineConfig) -> str:
        from adapters.process import launched

        ready, stop = threading.Event(), threading.Event()
        box: dict[str, Any] = {}

        async def serve() -> None:
            try:
                async with launched(registry.get(name), cfg, tmp_path / f"{name}.log", 900.0, nice=19) as ep:
                    box["url"] = ep.base_url
                    ready.set()
                    while not stop.is_set():
                        await asyncio.sleep(0.1)
            except BaseException as e:
                box["error"] = e
                ready.set()

        thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
        thread.start()
        threads.append((thread, stop))
        ready.wait(960)
        if "url" not in box:
            raise AssertionError(
                f"{name} did not start: {box.get('error')!r}; log {tmp_path / f'{name}.log'}"
            )
        return str(box["url"])

    yield start
    for thread, stop in threads:
        stop.set()
        thread.join(120)


def run(
    url: str,
    engine: str,
    out: Path,
    workload: str = "synthetic",
    sets: dict[str, Any] | None = None,
    requests: int = 3,
    **extra: Any,
) -> RunResult:
    cfg = RunConfig(
        engines=(EngineChoice(engine, engine, url),),
        workload=workload,
        points=(LoadPoint("concurrency", 1, "closed"),),
        stop=StopRule(requests=requests, warmup=0),
        out=out,
        seed=7,
        overrides=sets or {"input_tokens": 64, "output_tokens": 2},
        **extra,
    )
    result = execute(cfg, lambda _: None)
    assert result.summary is not None and result.exit_code == 0, result.engines
    return result


def only_point(result: RunResult) -> PointSummary:
    assert result.summary is not None and len(result.summary.points) == 1
    return result.summary.points[0]


def codes(p: PointSummary) -> set[str]:
    return {r.code for r in p.verdict.reasons}


def key_of(result: RunResult) -> str:
    return str(orjson.loads((result.run_dir / "manifest.json").read_bytes())["workload"]["prompts"]["key"])


def resets(result: RunResult) -> list[dict[str, Any]]:
    lines = (result.run_dir / "events.jsonl").read_bytes().splitlines()
    return [e for e in map(orjson.loads, lines) if e.get("kind") == "cache_reset"]


def check_fresh_then_warm(
    url: str, engine: str, tmp_path: Path, *, warm_at_least: float, sets: dict[str, Any] | None = None
) -> RunResult:
    first = run(url, engine, tmp_path / "first", sets=sets)
    # the scenario: the first run's very prompts again, to a cache nobody empties
    again = run(url, engine, tmp_path / "again", sets=sets, prompt_key=key_of(first), cache_reset=False)
    p = only_point(again)
    assert p.cache is not None and p.cache.measured is not None and p.cache.measured >= warm_at_least, p.cache
    assert "warm_cache" in codes(p)
    reason = next(r for r in p.verdict.reasons if r.code == "warm_cache")
    assert "of prompt tokens came from the engine's cache; the workload expects 0%" in reason.message
    assert p.cache.reconciled == "agree", (
        p.cache.reconcile_note
    )  # the requests' counts and the engine's counter
    # replayed on purpose: the same prompts, a warm cache expected (a note, no reason), nothing emptied
    replay = run(url, engine, tmp_path / "replay", sets=sets, replay_of=str(first.run_dir))
    p = only_point(replay)
    assert key_of(replay) == key_of(first) and "warm_cache" not in codes(p)
    assert p.cache is not None and p.cache.replayed and p.cache.measured is not None
    assert p.cache.measured >= warm_at_least
    assert any(n.startswith("replayed prompts:") for n in p.verdict.notes)
    assert [e.get("skipped") for e in resets(replay)] == [True]
    # a new run with the same seed, as a user re-runs: fresh prompts, whatever the cache holds
    second = run(url, engine, tmp_path / "second", sets=sets)
    p = only_point(second)
    assert key_of(first) != key_of(second)
    assert p.cache is not None and p.cache.measured is not None and p.cache.basis == "requests"
    assert p.cache.measured < 0.05, p.cache
    assert "warm_cache" not in codes(p)
    return first


def test_llamacpp_second_run_is_fresh_or_warm_and_invalid(engine_server: Any, tmp_path: Path) -> None:
    need("llamacpp")
    url = engine_server("llamacpp", registry.default_config("llamacpp"))  # as a user starts it: no slot erase
    first = check_fresh_then_warm(url, "llamacpp", tmp_path, warm_at_least=0.9)  # token-granular: 63 of 64
    (event,) = resets(first)
    assert not event["ok"] and "--slot-save-path" in event["reason"]  # it cannot be emptied: said why
    manifest = orjson.loads((first.run_dir / "manifest.json").read_bytes())
    assert manifest["engines"][0]["cache_reset"] == "POST /slots/{slot}?action=erase"


def test_llamacpp_slot_erase_empties_the_cache(engine_server: Any, tmp_path: Path) -> None:
    need("llamacpp")
    cfg = registry.default_config("llamacpp")
    slots = tmp_path / "slots"
    slots.mkdir()
    # --cache-ram 0: the host-memory prompt cache, which no route empties, off
    extra = (*cfg.extra_args, "--slot-save-path", str(slots), "--cache-ram", "0")
    url = engine_server("llamacpp", dataclasses.replace(cfg, extra_args=extra))
    first = run(url, "llamacpp", tmp_path / "first")
    again = run(url, "llamacpp", tmp_path / "again", prompt_key=key_of(first))  # emptied before the point
    (event,) = resets(again)
    assert event["ok"] and event["slots"] >= 1
    p = only_point(again)
    assert p.cache is not None and p.cache.measured is not None and p.cache.measured < 0.05, p.cache
    assert "warm_cache" not in codes(p) and p.cache.reset and p.cache.reset.startswith("emptied")


def test_llamacpp_shared_prefix_and_chat_keep_their_design(engine_server: Any, tmp_path: Path) -> None:
    need("llamacpp")
    url = engine_server("llamacpp", registry.default_config("llamacpp"))
    sets = {"groups": 2, "prefix_tokens": 64, "cache_block_tokens": 32, "suffix_tokens": 8, "output_tokens": 2,
            "control_every": 3}  # fmt: skip
    r = run(url, "llamacpp", tmp_path / "sp", "shared-prefix", sets, requests=6)
    p = only_point(r)
    assert p.cache is not None and p.cache.expected is not None and p.cache.measured is not None
    assert p.cache.expected > 0.4 and abs(p.cache.measured - p.cache.expected) < 0.05, p.cache
    assert "warm_cache" not in codes(p)
    chat = {"turns.mean": 3, "turns.max": 3, "user_tokens.scale": 0.05, "reply_tokens.scale": 0.02,
            "reply_tokens.min": 2, "think_time_s.mean": 0.05}  # fmt: skip
    r = run(url, "llamacpp", tmp_path / "chat", "chat", chat, requests=5)
    p = only_point(r)
    assert p.cache is not None and p.cache.expected is not None and p.cache.measured is not None
    assert p.cache.expected > 0.2, p.cache  # later turns resend their history
    assert p.cache.measured <= p.cache.expected + 0.05 and "warm_cache" not in codes(p), p.cache


def test_vllm_second_run_is_fresh_or_warm_and_invalid(engine_server: Any, tmp_path: Path) -> None:
    need("vllm")
    url = engine_server("vllm", registry.default_config("vllm"))
    # 160-token prompts in 128-token blocks: 128 cached (80 %)
    short = {"input_tokens": 160, "output_tokens": 2}
    first = check_fresh_then_warm(url, "vllm", tmp_path, warm_at_least=0.75, sets=short)
    manifest = orjson.loads((first.run_dir / "manifest.json").read_bytes())
    assert manifest["engines"][0]["cache_block_tokens"] == 128  # from vllm:cache_config_info
    (event,) = resets(first)
    assert event["ok"], event  # VLLM_SERVER_DEV_MODE=1 is in EngineBench's launch environment
    # the same prompts after the reset: the cache is empty again
    after = run(url, "vllm", tmp_path / "after", sets=short, prompt_key=key_of(first))
    p = only_point(after)
    assert p.cache is not None and p.cache.measured is not None and p.cache.measured < 0.05, p.cache
    # shared-prefix: the design (two 128-token blocks of a 256-token prefix) and no warm-cache reason
    sets = {"groups": 2, "prefix_tokens": 256, "suffix_tokens": 8, "output_tokens": 2, "control_every": 3}
    p = only_point(run(url, "vllm", tmp_path / "sp", "shared-prefix", sets, requests=5))
    assert p.cache is not None and p.cache.expected_in_blocks is not None and p.cache.measured is not None
    assert p.cache.expected_in_blocks > 0.3 and "warm_cache" not in codes(p), p.cache
    assert abs(p.cache.measured - p.cache.expected_in_blocks) < 0.1, p.cache
