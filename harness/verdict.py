"""Every load point judges itself: VALID or INVALID, each reason with what to do about it.

`judge(checks, policy)` is a pure function of the facts a summary measured about the point (`PointChecks`) and the
thresholds (`VerdictPolicy`). The rules are stated in docs/metrics.md ("Verdict rules"); downstream (matrix, gate)
refuses INVALID points.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from harness.errors import ConfigError

__all__ = [
    "ApproximateInputs",
    "PointChecks",
    "Verdict",
    "VerdictPolicy",
    "VerdictReason",
    "judge",
    "load_policy",
]

ReasonCode = Literal[
    "too_few_requests",
    "too_short",
    "rate_not_achieved",
    "send_lag",
    "read_stall",
    "slot_idle",
    "client_cpu_saturated",
    "error_rate",
    "token_count_mismatch",
    "output_length_mismatch",
    "engine_disagrees",
    "warm_cache",
]


class VerdictPolicy(BaseModel):
    """Thresholds of the verdict rules (defaults in docs/metrics.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_requests: int = 30
    min_duration_s: float = 10.0
    min_send_rate_fraction: float = 0.95
    max_send_lag_p99_ms: float = 10.0
    # the read stall is judged against the TTFT it can inflate: max(this many ms, this share of TTFT p50); an upper
    # bound (it also counts hold-ups while nothing waited to be read)
    max_read_stall_p99_ms: float = 10.0
    max_read_stall_ttft_share: float = 0.10
    # closed loop: the share of the slots' time spent between a stream's end arriving and the client reading it
    # (the engine then had that much less than the stated concurrency)
    max_slot_idle_share: float = 0.05
    max_client_cpu_util: float = 0.90
    # the client's loop waited for a CPU this share of the point or more: other processes held the cores, and the
    # client-side rules that fire say so (the cause, not a rule of its own: a starved client that kept up is fine)
    starved_cpu_wait: float = 0.10
    max_error_rate: float = 0.01
    max_token_count_mismatch: float = 0.02
    max_output_length_mismatch: float = 0.02
    # the engine's prefix cache served this many points (of the prompt tokens) more than the workload meant it to:
    # a cache warmed by an earlier run or point (pitfalls 9 and 12). 5 points: fresh prompts share at most the
    # template's tokens, and a token-granular cache also finds a word or two by chance
    max_cache_excess: float = 0.05


def load_policy(path: Path) -> VerdictPolicy:
    """A VerdictPolicy from a YAML or JSON file of thresholds (unknown keys refused)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read verdict policy {path}: {e}") from None
    try:
        return VerdictPolicy.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(
            f"verdict policy {path}: {'.'.join(map(str, first['loc']))}: {first['msg']} "
            f"(known keys: {', '.join(VerdictPolicy.model_fields)})"
        ) from None


class ApproximateInputs(BaseModel):
    """Prompts built with a stand-in tokenizer, not the served model's: which, why, and the input lengths the
    workload asked for against those the server counted (its usage), over successful measured requests."""

    model_config = ConfigDict(frozen=True)

    tokenizer: str
    why: str
    target_mean: float | None = None  # RequestRecord.expected_input_tokens
    server_mean: float | None = None  # RequestRecord.prompt_tokens (usage)
    server_min: int | None = None
    server_max: int | None = None
    counted: int = 0  # requests whose usage gave a prompt token count


class PointChecks(BaseModel):
    """What the verdict looks at, as measured over the point's measured requests (None: not measurable)."""

    model_config = ConfigDict(frozen=True)

    measured: int  # measured requests that completed (ok or failed; not cancelled by the run's end)
    duration_s: float | None
    closed_loop: bool
    scheduled_rate_per_s: float | None = None  # the rate the schedule asked for, over the measured requests
    achieved_rate_per_s: float | None = None  # the rate the client actually sent them
    send_lag_p99_ms: float | None = None
    read_stall_p99_ms: float | None = None  # RequestRecord.read_stall over successful measured requests
    # closed loop: sum(done_read - done) / sum(done_read - scheduled) over successful measured requests
    slot_idle_share: float | None = None
    ttft_p50_ms: float | None = None
    client_cpu_util: float | None = None  # mean, as a fraction of one core
    client_cpu_saturated: bool | None = None
    client_cpu_wait: float | None = None  # share of the point the client's loop was runnable but had no CPU
    error_rate: float | None = None  # failed / measured, not counting requests cancelled by the run's end
    token_count_mismatch: float | None = (
        None  # mean |server − client| / server over requests with server usage
    )
    output_length_mismatch: float | None = (
        None  # mean |actual − expected| / expected over pinned-length requests
    )
    output_length_mismatched: int = 0  # requests whose output length differs from the pinned length
    # where the client's counts or TTFT disagree with the engine's own counters / histogram beyond their
    # resolution (harness.reconcile): the disagreements, one line each; empty when they agree or cannot be compared
    engine_disagreements: list[str] = []
    # findings that do not make the point invalid by themselves: TTFT above the engine's histogram by the server's
    # time outside it, or by the client's own delays (harness.reconcile's outside_engine / client_delayed)
    engine_notes: list[str] = []
    # share of the prompt tokens the engine's prefix cache served, and the share the workload meant it to serve
    # (harness.cache); `cache_replayed`: the prompts replay an earlier run's, so a warm cache is expected
    cache_share: float | None = None
    cache_expected_share: float | None = None
    cache_replayed: bool = False
    # set where the prompts were built with a stand-in tokenizer (a note, not a reason: the server's counts are used)
    approximate_inputs: ApproximateInputs | None = None


class VerdictReason(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: ReasonCode
    message: str
    recommendation: str


class Verdict(BaseModel):
    model_config = ConfigDict(frozen=True)

    status: Literal["VALID", "INVALID"]
    reasons: list[VerdictReason] = []
    recommendation: str = ""
    notes: list[str] = []  # what the point showed that does not change its status (PointChecks.engine_notes)


_CLIENT = "the client cannot keep up: lower --rate or spread the load over client processes (--distributed)"
_STALLED = (
    "the client was busy or waited for a CPU (beside the engine on a small machine): give it a core of its own "
    "(taskset), lower the load or spread it (--distributed), or run on a quieter machine"
)


_WARM = (
    "send fresh prompts (a new `bench run` does, unless it replays an earlier run's with --replay-prompts), reset "
    "the engine's prefix cache (vLLM: run it with VLLM_SERVER_DEV_MODE=1 and EngineBench calls /reset_prefix_cache; "
    "llama.cpp: --slot-save-path DIR for slot erase, and --cache-ram 0), or restart the engine"
)


def _judge_cache(c: PointChecks, p: VerdictPolicy, fail: Callable[[ReasonCode, str, str], None]) -> None:
    """A fresh run whose prompts the cache served well beyond the workload's design is a warm cache; replayed
    prompts are expected warm (the note in `judge` says how warm)."""
    if c.cache_share is None or c.cache_expected_share is None or c.cache_replayed:
        return
    if c.cache_share > c.cache_expected_share + p.max_cache_excess:
        fail(
            "warm_cache",
            f"warm cache: {c.cache_share:.0%} of prompt tokens came from the engine's cache; the workload "
            f"expects {c.cache_expected_share:.0%}",
            _WARM,
        )


def _starved(c: PointChecks, p: VerdictPolicy) -> str | None:
    if c.client_cpu_wait is None or c.client_cpu_wait < p.starved_cpu_wait:
        return None
    return (
        f"the client waited for a CPU {c.client_cpu_wait:.0%} of the point (other processes held the cores: "
        "the engine beside it, a neighbour): launch the engine below it (--engine-nice 19), pin them apart "
        "(taskset), or run on a quieter machine"
    )


def _run_longer(c: PointChecks, p: VerdictPolicy) -> str:
    # 20 % above the minimums, at the rate this point ran: a random schedule may finish early
    rate = c.measured / c.duration_s if c.duration_s and c.measured else None
    n = math.ceil(1.2 * max(p.min_requests, rate * p.min_duration_s if rate else 0))
    s = math.ceil(1.2 * max(p.min_duration_s, p.min_requests / rate if rate else 0))
    return f"run longer: --requests {n} / --duration {s}"


def judge(c: PointChecks, p: VerdictPolicy | None = None) -> Verdict:
    p = p or VerdictPolicy()
    reasons: list[VerdictReason] = []
    starved = _starved(c, p)  # when it applies, the cause of every client-side finding

    def fail(code: ReasonCode, message: str, recommendation: str) -> None:
        reasons.append(VerdictReason(code=code, message=message, recommendation=recommendation))

    if c.measured < p.min_requests:
        fail(
            "too_few_requests",
            f"{c.measured} measured requests completed (< {p.min_requests})",
            _run_longer(c, p),
        )
    if c.duration_s is None or c.duration_s < p.min_duration_s:
        got = "no duration" if c.duration_s is None else f"{c.duration_s:.1f} s"
        fail("too_short", f"measured for {got} (< {p.min_duration_s:g} s)", _run_longer(c, p))
    if (
        not c.closed_loop
        and c.scheduled_rate_per_s
        and c.achieved_rate_per_s is not None
        and c.achieved_rate_per_s < p.min_send_rate_fraction * c.scheduled_rate_per_s
    ):
        fail(
            "rate_not_achieved",
            f"sent {c.achieved_rate_per_s:.2f} req/s of the {c.scheduled_rate_per_s:.2f} req/s scheduled "
            f"(< {p.min_send_rate_fraction:.0%})",
            starved or _CLIENT,
        )
    if c.send_lag_p99_ms is not None and c.send_lag_p99_ms > p.max_send_lag_p99_ms:
        fail(
            "send_lag",
            f"p99 send lag {c.send_lag_p99_ms:.1f} ms (> {p.max_send_lag_p99_ms:g} ms): requests left late",
            starved or _CLIENT,
        )
    stall_limit = max(p.max_read_stall_p99_ms, p.max_read_stall_ttft_share * (c.ttft_p50_ms or 0.0))
    if c.read_stall_p99_ms is not None and c.read_stall_p99_ms > stall_limit:
        fail(
            "read_stall",
            f"p99 read stall {c.read_stall_p99_ms:.1f} ms (> {stall_limit:.1f} ms, max({p.max_read_stall_p99_ms:g} "
            f"ms, {p.max_read_stall_ttft_share:.0%} of TTFT p50)): the client's loop was held up before it read "
            "first tokens, so TTFTs may hold that much of the client's own delay",
            starved or _STALLED,
        )
    if c.closed_loop and c.slot_idle_share is not None and c.slot_idle_share > p.max_slot_idle_share:
        fail(
            "slot_idle",
            f"slots idle {c.slot_idle_share:.1%} of the time (> {p.max_slot_idle_share:.0%}): streams had ended but "
            "the client read their ends late, so the engine ran with less than the stated concurrency",
            starved or _STALLED,
        )
    # one rule, the policy's: the runner's stored flag counts only for a point whose mean use is unknown
    if c.client_cpu_util is not None:
        saturated: bool | None = c.client_cpu_util > p.max_client_cpu_util
    else:
        saturated = c.client_cpu_saturated
    if saturated:
        util = "" if c.client_cpu_util is None else f" (mean {c.client_cpu_util:.0%} of a core)"
        fail("client_cpu_saturated", f"client CPU saturated{util}", _CLIENT)
    if c.error_rate is not None and c.error_rate > p.max_error_rate:
        fail(
            "error_rate",
            f"error rate {c.error_rate:.1%} (> {p.max_error_rate:.1%})",
            "inspect errors by kind in records.jsonl (status, error, http_status)",
        )
    if c.token_count_mismatch is not None and c.token_count_mismatch > p.max_token_count_mismatch:
        fail(
            "token_count_mismatch",
            f"server usage and streamed chunks disagree on output tokens by {c.token_count_mismatch:.1%} "
            f"on average (> {p.max_token_count_mismatch:.0%})",
            "chunks carry several tokens or the stream drops some: ITL from chunks is unreliable; "
            "check the adapter's tokens-per-chunk and whether the engine streams usage",
        )
    if c.output_length_mismatch is not None and c.output_length_mismatch > p.max_output_length_mismatch:
        fail(
            "output_length_mismatch",
            f"{c.output_length_mismatched} requests' output length differs from the pinned length "
            f"(mean {c.output_length_mismatch:.1%} off, > {p.max_output_length_mismatch:.0%})",
            "engine may not honour ignore_eos; compare engines on tokens/s and TPOT, not on requests/s or E2E, "
            "or pin lengths another way (min_tokens)",
        )
    if c.engine_disagreements:
        fail(
            "engine_disagrees",
            "client and engine disagree: " + "; ".join(c.engine_disagreements),
            "find out which side is right before trusting either: look for dropped or cut streams, a proxy "
            "between client and engine, or requests the engine counted that the client did not send",
        )
    _judge_cache(c, p, fail)
    recommendation = "; ".join(dict.fromkeys(r.recommendation for r in reasons))
    notes = list(c.engine_notes)
    if c.approximate_inputs is not None:
        notes.append(_approximate_note(c.approximate_inputs))
    return Verdict(
        status="INVALID" if reasons else "VALID",
        reasons=reasons,
        recommendation=recommendation,
        notes=notes,
    )


def _approximate_note(a: ApproximateInputs) -> str:
    asked = f"the workload asked for {a.target_mean:.0f} input tokens on average" if a.target_mean else ""
    if a.counted and a.server_mean is not None:
        counted = (
            f"the server counted {a.server_mean:.0f} (min {a.server_min}, max {a.server_max}) over {a.counted} "
            "requests, which the input tokens/s use"
        )
    else:
        counted = "the server reported no prompt token counts, so they are the stand-in's"
    lengths = "; ".join(x for x in (asked, counted) if x)
    return (
        f"input lengths approximate: {a.why}; {lengths}. Make them exact with --tokenizer PATH (the served "
        "model's Hugging Face folder, tokenizer.json or .gguf)"
    )
