"""Raw per-request records: the one thing a run measures. Everything else is derived from these.

Times are seconds on a monotonic clock (`time.perf_counter()`), as offsets from the run's start, which the manifest
anchors to wall-clock time once. Latency counts from `scheduled`, the time the arrival process said the request was
due, never from when the client got round to sending it (`send_lag = sent - scheduled`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["RECORD_SCHEMA_VERSION", "Phase", "RequestRecord", "Status", "TokenSource", "latest_attempts"]

RECORD_SCHEMA_VERSION = 1

Phase = Literal["warmup", "measure", "cooldown"]
# ok: finished normally. Anything else is a failure, counted by kind:
Status = Literal[
    "ok",
    "http_error",  # non-2xx status (see http_status)
    "connect_error",  # refused / reset before a response
    "read_error",  # connection dropped mid-stream
    "timeout",  # no byte for longer than the stall timeout, or overall timeout
    "stream_error",  # malformed SSE / JSON, an error event, a stream without an end
    "cancelled",  # the run stopped before the request finished (duration, error budget, SIGINT)
]
TokenSource = Literal["server_usage", "engine_tokenizer", "client_estimate", "none"]


@dataclass(slots=True)
class RequestRecord:
    """One request, appended to `records.jsonl` as soon as it ends (a run killed halfway keeps these)."""

    request_id: str
    engine: str
    point: str  # load point id, e.g. "concurrency=8" or "rate=4"
    phase: Phase
    scheduled: float
    sent: float | None = None
    first_byte: float | None = None  # first response byte (headers)
    chunk_times: list[float] = field(
        default_factory=list
    )  # arrival time of every chunk that carried output tokens
    chunk_tokens: list[int] = field(default_factory=list)  # output tokens each of those chunks carried
    done: float | None = None
    # when the client read the `[DONE]` whose bytes arrived at `done` (the kernel's receive time, where the client
    # has it): a closed loop's slot is free from here. None where the client did not see a `[DONE]`
    done_read: float | None = None
    status: Status = "ok"
    error: str | None = None
    http_status: int | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    token_source: TokenSource = "none"
    client_output_tokens: int = 0  # sum(chunk_tokens): what the stream itself showed
    cached_tokens: int | None = None
    expected_input_tokens: int | None = None
    expected_output_tokens: int | None = None
    output_text: str | None = None  # kept only when asked (quality checks, chat history)
    worker: int = 0
    # how late, at most, the client read the first token: a hold-up of its event loop that ended at that read
    # (harness.loopwatch); 0 when the token is stamped with the kernel's arrival time (no late read in it); None
    # where nothing watched the loop (other clients, older runs)
    read_stall: float | None = None
    tags: dict[str, str] = field(default_factory=dict)
    kind: Literal["request"] = "request"
    schema_version: int = RECORD_SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestRecord:
        from harness.errors import SchemaError

        version = d.get("schema_version")
        if version != RECORD_SCHEMA_VERSION:
            raise SchemaError(
                f"record schema_version {version!r} is not supported (this EngineBench reads "
                f"{RECORD_SCHEMA_VERSION}); re-run with the EngineBench version that wrote it, or upgrade"
            )
        return cls(**{k: v for k, v in d.items() if k in _FIELDS})


_FIELDS = frozenset(RequestRecord.__dataclass_fields__)


def latest_attempts(records: list[RequestRecord]) -> tuple[list[RequestRecord], int]:
    """The records without the failures a later resume segment sent again (`bench run --resume --resend-failed`
    writes a second record under the same id), and how many were dropped."""

    def key(r: RequestRecord) -> tuple[str, str, str, str]:
        return (r.engine, r.point, r.tags.get("repeat", "1"), r.request_id)

    def segment(r: RequestRecord) -> int:
        return int(r.tags.get("segment", "1"))

    last: dict[tuple[str, str, str, str], int] = {}
    for r in records:
        k = key(r)
        last[k] = max(last.get(k, 1), segment(r))
    kept = [r for r in records if r.ok or segment(r) >= last[key(r)]]
    return kept, len(records) - len(kept)
