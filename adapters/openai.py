"""The OpenAI-compatible codec most engines share: request bodies and stream / response parsing.

Built from functions, not inheritance: an engine adapter composes these with its own quirks (extra body fields,
where usage and timings live). Field semantics follow the OpenAI Chat Completions and Completions APIs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from adapters.base import HttpCall, StreamDelta, Usage
from workloads.spec import RequestSpec

_loads = orjson.loads

__all__ = ["build_openai", "parse_openai_event", "parse_openai_response", "usage_from"]

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


def build_openai(
    spec: RequestSpec,
    model: str,
    stream: bool,
    *,
    pin_fields: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    temperature: float | None = 0.0,
) -> HttpCall:
    """A chat or completions call. `pin_fields` are the engine's way to force exactly `max_tokens` output
    (e.g. {"ignore_eos": True} or {"min_tokens": n}); they are added only when the spec asks to pin.
    `temperature=None` leaves the field out, for an engine that rejects 0 (DeepSpeed-MII)."""
    body: dict[str, Any] = {"model": model, "max_tokens": spec.max_tokens}
    if temperature is not None:
        body["temperature"] = temperature
    body["stream"] = stream
    if spec.api == "chat":
        body["messages"] = [dict(m) for m in spec.messages]
        path = CHAT_PATH
    else:
        body["prompt"] = spec.prompt
        path = COMPLETIONS_PATH
    if stream:
        body["stream_options"] = {"include_usage": True}
    if spec.pin_output and pin_fields:
        body.update(pin_fields)
    if extra:
        body.update(extra)
    return HttpCall("POST", path, body, stream)


def usage_from(obj: Mapping[str, Any] | None) -> Usage | None:
    if not obj or not isinstance(obj, Mapping):
        return None
    details = obj.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    return Usage(_count(obj.get("prompt_tokens")), _count(obj.get("completion_tokens")), _count(cached))


def _count(value: Any) -> int | None:
    """A token count from the network: a whole number >= 0, else unknown (never a string or a list in a record)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _text_of(choice: Mapping[str, Any]) -> str:
    delta = choice.get("delta")
    if type(delta) is dict or isinstance(delta, Mapping):  # `type is` first: the ABC check costs per event
        # reasoning models stream thinking in a separate field; those are output tokens too
        content = delta.get("content") or ""
        if "reasoning_content" not in delta and "reasoning" not in delta:
            return content if type(content) is str else f"{content}"
        reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
        return f"{reasoning}{content}"
    text = choice.get("text")
    if isinstance(text, str):
        return text
    message = choice.get("message")
    if isinstance(message, Mapping):
        return (message.get("reasoning_content") or "") + (message.get("content") or "")
    return ""


def parse_openai_event(data: bytes, token_text: str | None = None) -> StreamDelta | None:
    """One `data:` payload of an OpenAI-style stream. Role-only, empty and usage-only chunks carry 0 tokens.

    A content chunk counts 1 token, unless `token_text` is given: a server whose every token is that text (the
    scripted server) has the chunk's tokens counted exactly. This runs once per streamed event, the client's hot
    path (benchmarks/README.md): one `orjson.loads`, one dict walk, one StreamDelta."""
    obj = _loads(data)
    if type(obj) is not dict:
        return StreamDelta(error=f"unexpected SSE payload: {data[:200]!r}")
    choices = obj.get("choices")
    if not choices:
        if "error" in obj:
            err = obj["error"]
            msg = err.get("message") if isinstance(err, Mapping) else str(err)
            return StreamDelta(error=str(msg))
        choices = ()
    if type(choices) is list and len(choices) == 1:  # the common chunk: one choice
        choice = choices[0]
        text = _text_of(choice)
        finish = choice.get("finish_reason")
    else:
        text, finish = "", None
        for choice in choices:
            text += _text_of(choice)
            finish = choice.get("finish_reason") or finish
    raw_usage = obj.get("usage")
    usage = usage_from(raw_usage) if raw_usage else None
    extra = {"timings": obj["timings"]} if "timings" in obj else None
    if not text:
        return StreamDelta("", 0, False, finish or None, usage, None, extra)
    if token_text:
        return StreamDelta(text, max(1, text.count(token_text)), True, finish or None, usage, None, extra)
    return StreamDelta(text, 1, False, finish or None, usage, None, extra)


def parse_openai_response(body: bytes) -> StreamDelta:
    obj = orjson.loads(body)
    if not isinstance(obj, dict):
        return StreamDelta(error=f"unexpected response body: {body[:200]!r}")
    if "error" in obj and not obj.get("choices"):
        err = obj["error"]
        return StreamDelta(error=str(err.get("message") if isinstance(err, Mapping) else err))
    choices = obj.get("choices") or []
    text = "".join(_text_of(c) for c in choices)
    finish = next((c.get("finish_reason") for c in choices if c.get("finish_reason")), None)
    usage = usage_from(obj.get("usage"))
    tokens = usage.completion_tokens if usage and usage.completion_tokens is not None else 0
    return StreamDelta(
        text=text, tokens=tokens, tokens_exact=usage is not None, finish_reason=finish, usage=usage
    )
