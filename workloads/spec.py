"""What to send: the request spec every workload produces and every adapter codec consumes.

A RequestSpec is engine-neutral. The adapter's codec turns it into an HTTP call for its engine; the harness never
looks inside the prompt. Workloads own these; they never open sockets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

__all__ = ["Api", "Message", "RequestSpec", "continued"]

Api = Literal["chat", "completions"]
Message = Mapping[str, str]  # {"role": ..., "content": ...}


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request to send.

    `input_tokens` is the prompt length the workload built (None when unknown); `max_tokens` the output length asked
    for. `pin_output` asks the engine to produce exactly `max_tokens` (ignore_eos / min_tokens) where it honours that.
    Chat sessions: `session` and `turn` identify the turn; `history_from` names the request whose conversation (its
    messages plus the assistant's actual reply) this turn extends, and `think_time` is the pause (seconds) after that
    reply before this turn is sent.
    """

    request_id: str
    api: Api
    max_tokens: int
    messages: tuple[Message, ...] = ()
    prompt: str = ""
    input_tokens: int | None = None
    pin_output: bool = True
    session: str | None = None
    turn: int | None = None
    history_from: str | None = None
    think_time: float = 0.0
    tags: Mapping[str, str] = field(default_factory=dict)


def continued(turn: RequestSpec, parent_sent: RequestSpec, reply: str) -> RequestSpec:
    """`turn` as sent: the conversation its parent was sent with, the parent's actual reply, then its own messages
    (for completions: the parent's prompt, the reply, then its own prompt)."""
    if turn.api == "chat":
        history = (*parent_sent.messages, {"role": "assistant", "content": reply})
        return replace(turn, messages=(*history, *turn.messages))
    return replace(turn, prompt=parent_sent.prompt + reply + turn.prompt)
