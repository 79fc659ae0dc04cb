"""The `chat` workload: simulated users each running a multi-turn session with think time between turns.

Every turn after the first names the previous turn in `history_from`: the runner sends that request's messages, the
assistant's actual reply and this turn's new user message, after waiting `think_time` seconds from the reply. So the
prompt grows turn by turn and a prefix cache can reuse the conversation so far.

Lengths of user messages and replies are lognormal, fitted on the Azure LLM inference trace (conversation, 2023) and
scaled to a small model's context; turns per session are geometric; think times exponential (docs/workloads.md).
`input_tokens` is the templated prompt length: exact for the first turn; for later turns an estimate that assumes
each earlier reply had exactly its `max_tokens` (tag `input_tokens_exact=false`), since the real reply is only known
at run time.

Expected cache share (`cache_expected_tokens`): a later turn's history (the previous turn's prompt and reply) plus
the template's tokens; a first turn's template tokens only (a system prompt is its session's own).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from workloads.model import ChatSpec, sample
from workloads.spec import Message, RequestSpec
from workloads.text import PromptBuilder, rng_for, tags_of
from workloads.tokenizer import Tokenizer

if TYPE_CHECKING:
    from workloads.registry import Workload

__all__ = ["GENERATOR_VERSION", "generate", "requests"]

GENERATOR_VERSION = 1


def generate(
    workload: Workload, n: int, seed: int, tokenizer: Tokenizer, prompts: str = ""
) -> list[RequestSpec]:
    return list(itertools.islice(requests(workload, seed, tokenizer, prompts), n))


def requests(workload: Workload, seed: int, tokenizer: Tokenizer, prompts: str = "") -> Iterator[RequestSpec]:
    spec = workload.params
    assert isinstance(spec, ChatSpec)
    builder = PromptBuilder(tokenizer, salt=prompts)
    for session in itertools.count():
        yield from _session(spec, builder, seed, session)


def _session(spec: ChatSpec, builder: PromptBuilder, seed: int, s: int) -> Iterator[RequestSpec]:
    rng = rng_for(seed, "chat-session", s)
    turns = max(1, int(sample(spec.turns, rng, 1, integer=True)[0]))
    users = sample(spec.user_tokens, rng, turns, integer=True)
    replies = sample(spec.reply_tokens, rng, turns, integer=True)
    thinks = sample(spec.think_time_s, rng, turns, integer=False)
    texts = builder.texts

    history: list[Message] = []
    if spec.system_prompt_tokens:
        history.append(
            {"role": "system", "content": texts.text(spec.system_prompt_tokens, (seed, "system", s))}
        )
    previous: str | None = None
    history_tokens = 0  # the previous turn's prompt and reply: what a prefix cache can serve this turn
    for t in range(1, turns + 1):
        u, r = max(1, int(users[t - 1])), max(1, int(replies[t - 1]))
        user: Message = {"role": "user", "content": texts.text(u, (seed, "user", s, t))}
        built = builder.chat([*history, user])
        if built.input_tokens + r > spec.max_context:
            if t > 1:
                break  # the conversation is full: the session ends, as a user would start a new one
            u = max(1, u - (built.input_tokens + r - spec.max_context))
            user = {"role": "user", "content": texts.text(u, (seed, "user", s, t))}
            built = builder.chat([*history, user])
        request_id = f"{spec.name}-{seed}-s{s:05d}-t{t:02d}"
        expected = min(built.input_tokens, history_tokens + builder.template_tokens("chat"))
        yield (
            RequestSpec(
                request_id=request_id,
                api="chat",
                max_tokens=r,
                messages=tuple(built.messages) if t == 1 else (user,),
                input_tokens=built.input_tokens,
                pin_output=spec.pin_output,
                session=f"{spec.name}-{seed}-s{s:05d}",
                turn=t,
                history_from=previous,
                think_time=float(thinks[t - 1]) if t > 1 else 0.0,
                tags=tags_of(
                    {
                        "workload": spec.name,
                        "turn": t,
                        "content_tokens": u,
                        "input_tokens": built.input_tokens,
                        "input_tokens_exact": t == 1,
                        "cache_expected_tokens": expected,
                    }
                ),
            )
        )
        history_tokens = built.input_tokens + r
        # stand-in for the reply the engine will give: pinned output makes it `r` tokens long
        history += [user, {"role": "assistant", "content": texts.text(r, (seed, "reply", s, t))}]
        previous = request_id
