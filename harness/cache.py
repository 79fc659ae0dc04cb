"""The engine's prefix cache made visible: how much of a point's prompt tokens it served, against what the workload
meant it to serve, and emptying it between load points where the engine offers a way.

- `cache_share(records, counters, ...)` is pure: the point's records (each carries `cached_tokens` where the engine
  reports it, and the workload's `cache_expected_tokens` tag) and the engine's counter deltas over the point in, a
  `CacheShare` out. Measured share: the requests' own counts where most successful measured requests carry one,
  else the engine's counters (`prompt_tokens_cached_total / prompt_tokens_total`, else `prefix_cache_hits_total /
  prefix_cache_queries_total`). The two are reconciled over the whole point (every phase reached the engine).
  Expected share: the workload's, each request's expected tokens rounded down to whole cache blocks where the engine
  caches whole blocks only (vLLM's `block_size`, read from its `cache_config_info` metric at the run's start).
- `reset_prefix_cache(...)` calls the engine's reset route (`adapters.base.CacheReset`) and says what happened.
- `block_tokens_from(metrics_text)` reads a block size from a Prometheus text.

Definitions and the verdict rule that uses them: docs/metrics.md ("Cache share").
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import aiohttp
from pydantic import BaseModel, ConfigDict

from adapters.base import EngineInfo
from harness.records import RequestRecord

__all__ = ["CacheShare", "block_tokens_from", "cache_share", "expected_tokens", "reset_prefix_cache"]

EXPECTED_TAG = "cache_expected_tokens"
# per-request counts are the basis when at least this share of successful measured requests carries one
_REQUESTS_BASIS = 0.5


class CacheShare(BaseModel):
    """One point's prefix-cache share of prompt tokens (fractions 0..1; None: not known)."""

    model_config = ConfigDict(frozen=True)

    measured: float | None = None  # the share the verdict judges: `basis` says which of the two below
    basis: Literal["requests", "engine", "none"] = "none"
    requests_share: float | None = (
        None  # sum(cached_tokens) / sum(prompt_tokens), successful measured requests
    )
    requests_counted: int = 0  # of those, how many carried a cached_tokens count
    engine_share: float | None = None  # from the engine's counter deltas over the point (every phase)
    engine_basis: str | None = None
    expected: float | None = None  # what the workload means the cache to serve (its `cache_expected_tokens`)
    expected_in_blocks: float | None = None  # the same, each request's rounded down to whole cache blocks
    block_tokens: int | None = None
    replayed: bool = False  # the prompts replay an earlier run's: a warm cache is expected
    # client (every record of the point) against the engine's prompt_tokens_cached_total delta
    client_cached_tokens: int | None = None
    engine_cached_tokens: float | None = None
    reconciled: Literal["agree", "disagree", "unavailable"] = "unavailable"
    reconcile_note: str = ""
    reset: str | None = None  # what was done to empty the cache before the point (None: nothing recorded)


def expected_tokens(rec: RequestRecord) -> int | None:
    raw = rec.tags.get(EXPECTED_TAG)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _prompt(rec: RequestRecord) -> int | None:
    return rec.prompt_tokens if rec.prompt_tokens is not None else rec.expected_input_tokens


def cache_share(
    records: Iterable[RequestRecord],
    counters: Mapping[str, float] | None,
    *,
    block_tokens: int | None = None,
    replayed: bool = False,
    reset: str | None = None,
) -> CacheShare:
    recs = list(records)
    ok = [r for r in recs if r.phase == "measure" and r.ok and (_prompt(r) or 0) > 0]
    counted = [r for r in ok if r.cached_tokens is not None]
    requests_share = None
    if counted:
        requests_share = sum(r.cached_tokens or 0 for r in counted) / sum(_prompt(r) or 0 for r in counted)
    expected = expected_blocks = None
    planned = [(e, _prompt(r) or 0) for r in ok if (e := expected_tokens(r)) is not None]
    if planned and len(planned) == len(ok):
        total = sum(p for _, p in planned)
        expected = sum(min(e, p) for e, p in planned) / total
        block = block_tokens if block_tokens and block_tokens > 1 else 1
        expected_blocks = sum(min(e, p) // block * block for e, p in planned) / total
    engine_share, engine_basis = _engine_share(counters or {})
    basis: Literal["requests", "engine", "none"] = "none"
    measured = None
    if requests_share is not None and len(counted) >= _REQUESTS_BASIS * len(ok):
        basis, measured = "requests", requests_share
    elif engine_share is not None:
        basis, measured = "engine", engine_share
    client_cached, engine_cached, verdict, note = _reconcile(recs, counters or {}, block_tokens)
    return CacheShare(
        measured=measured,
        basis=basis,
        requests_share=requests_share,
        requests_counted=len(counted),
        engine_share=engine_share,
        engine_basis=engine_basis,
        expected=expected,
        expected_in_blocks=expected_blocks,
        block_tokens=block_tokens,
        replayed=replayed,
        client_cached_tokens=client_cached,
        engine_cached_tokens=engine_cached,
        reconciled=verdict,
        reconcile_note=note,
        reset=reset,
    )


def _engine_share(c: Mapping[str, float]) -> tuple[float | None, str | None]:
    if c.get("prompt_tokens_total") and "prompt_tokens_cached_total" in c:
        return c["prompt_tokens_cached_total"] / c["prompt_tokens_total"], (
            "prompt_tokens_cached_total / prompt_tokens_total"
        )
    if c.get("prefix_cache_queries_total") and "prefix_cache_hits_total" in c:
        return c["prefix_cache_hits_total"] / c["prefix_cache_queries_total"], (
            "prefix_cache_hits_total / prefix_cache_queries_total"
        )
    return None, None


def _reconcile(
    recs: list[RequestRecord], c: Mapping[str, float], block_tokens: int | None
) -> tuple[int | None, float | None, Literal["agree", "disagree", "unavailable"], str]:
    """Client's cached tokens over every record of the point against the engine's counter. They count the same
    thing (llama.cpp: `cache_n` and `prompt_tokens_cached_total` both add the slot's reused prefix, build 11434
    server-context.cpp; vLLM 0.32: usage `cached_tokens` and `vllm:prompt_tokens_cached` both take the request's
    `num_cached_tokens`, v1/metrics/loggers.py), so they agree within a block (a request still in prefill when
    the point ended) or 1 % of the prompt tokens."""
    with_counts = [r for r in recs if r.cached_tokens is not None]
    engine = c.get("prompt_tokens_cached_total")
    client = sum(r.cached_tokens or 0 for r in with_counts) if with_counts else None
    if engine is None:
        return client, None, "unavailable", "the engine has no cached-prompt-token counter"
    if client is None:
        return None, engine, "unavailable", "no request carries the engine's cached-token count"
    prompts = sum(_prompt(r) or 0 for r in recs)
    tolerance = max(float(block_tokens or 1), 0.01 * prompts)
    missing = len([r for r in recs if r.ok]) - len([r for r in with_counts if r.ok])
    if abs(client - engine) <= tolerance and missing == 0:
        return client, engine, "agree", ""
    note = f"the requests' cached tokens sum to {client}, the engine's counter moved by {engine:g}"
    if missing:
        note += f" ({missing} successful request(s) carry no count)"
    failed = len([r for r in recs if not r.ok])
    if failed:
        note += f"; {failed} request(s) failed, whose cached tokens the engine may have counted"
    return client, engine, "disagree", note


_BLOCK = re.compile(r'^[A-Za-z_:]*cache_config_info\{[^}]*\bblock_size="(\d+)"', re.MULTILINE)


def block_tokens_from(metrics_text: str) -> int | None:
    """The cache block size an engine states in a `*cache_config_info{block_size="N",...}` series (vLLM)."""
    m = _BLOCK.search(metrics_text)
    return int(m.group(1)) if m else None


async def reset_prefix_cache(
    session: aiohttp.ClientSession,
    base_url: str,
    info: EngineInfo,
    *,
    retries: int = 5,
    retry_wait_s: float = 0.5,
) -> dict[str, Any]:
    """Empty the engine's prefix cache; the answer is the body of a `cache_reset` event: `ok`, `route`, and on
    failure `reason` (what the server said, and what it needs). A refusal because requests still hold the cache
    (vLLM `success: false`, SGLang 400) is tried again `retries` times."""
    reset = info.cache_reset
    if reset is None:
        return {
            "ok": False,
            "route": None,
            "reason": f"{info.display_name} offers no route to empty its cache",
        }
    out: dict[str, Any] = {"route": reset.route}
    if reset.leaves:
        out["leaves"] = reset.leaves
    paths = [reset.path]
    try:
        if "{slot}" in reset.path:
            slots = await _slot_count(session, base_url, reset.slots_path, reset.slots_field)
            if slots is None:
                return {
                    **out,
                    "ok": False,
                    "reason": f"could not read the slot count from {reset.slots_path}",
                }
            paths = [reset.path.replace("{slot}", str(i)) for i in range(slots)]
            out["slots"] = slots
        for path in paths:
            for attempt in range(retries + 1):
                async with session.request(reset.method, base_url + path) as resp:
                    body = await resp.text()
                    status = resp.status
                refused = status == 200 and '"success":false' in body.replace(" ", "")
                if status == 200 and not refused:
                    break
                busy = refused or status == 400
                if not busy or attempt == retries:
                    why = f"{reset.route} answered {status}: {body.strip()[:160]}"
                    if reset.needs and status in (404, 405, 501):
                        why += f"; it needs {reset.needs}"
                    return {**out, "ok": False, "status": status, "reason": why}
                await asyncio.sleep(retry_wait_s)
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        return {**out, "ok": False, "reason": f"{reset.route} failed: {type(e).__name__}: {e}"}
    return {**out, "ok": True}


async def _slot_count(
    session: aiohttp.ClientSession, base_url: str, path: str | None, field: str | None
) -> int | None:
    if not path or not field:
        return None
    async with session.get(base_url + path) as resp:
        if resp.status != 200:
            return None
        payload = await resp.json(content_type=None)
    value = payload.get(field) if isinstance(payload, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else None
