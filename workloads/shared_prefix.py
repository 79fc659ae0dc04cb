"""The `shared-prefix` workload: groups of requests sharing a long prefix, plus a control group sharing nothing.

The prefix plays a system prompt, few-shot examples or a RAG document: `prefix_tokens` long (at least two cache
blocks of `cache_block_tokens`: vLLM's prefix cache works in 128-token blocks, shorter prefixes never hit), followed
by a short distinct suffix per request. Chat puts the prefix in the system message and the suffix in the user
message; completions concatenate them.

Order: the first `groups` requests are one per group (`role=warm`: they fill the cache); after that requests cycle
over the groups (`role=reuse`), and every `control_every`-th one is a control (`group=control`, `shared=false`):
same lengths, a prefix of its own, so the difference between reuse and control is what the cache buys.

Expected cache share (`cache_expected_tokens`): a reuse request's shared prefix (templated) plus the template's
tokens; a warm-up or control request's template tokens only.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from workloads.model import SharedPrefixSpec
from workloads.spec import RequestSpec
from workloads.text import PromptBuilder, tags_of
from workloads.tokenizer import Tokenizer

if TYPE_CHECKING:
    from workloads.registry import Workload

__all__ = ["GENERATOR_VERSION", "generate", "requests", "slot"]

GENERATOR_VERSION = 1


def slot(spec: SharedPrefixSpec, i: int) -> tuple[str, str]:
    """(group, role) of request i: group is "g<k>" or "control"; role is warm, reuse or control."""
    if i < spec.groups:
        return f"g{i}", "warm"
    j = i - spec.groups
    if spec.control_every and j % spec.control_every == spec.control_every - 1:
        return "control", "control"
    shared_before = j - (j // spec.control_every if spec.control_every else 0)
    return f"g{shared_before % spec.groups}", "reuse"


def generate(
    workload: Workload, n: int, seed: int, tokenizer: Tokenizer, prompts: str = ""
) -> list[RequestSpec]:
    return list(itertools.islice(requests(workload, seed, tokenizer, prompts), n))


def requests(workload: Workload, seed: int, tokenizer: Tokenizer, prompts: str = "") -> Iterator[RequestSpec]:
    spec = workload.params
    assert isinstance(spec, SharedPrefixSpec)
    builder = PromptBuilder(tokenizer, salt=prompts)
    target = spec.prefix_tokens + spec.suffix_tokens
    shared_tokens: dict[str, int] = {}  # group -> its prefix's templated tokens
    for i in itertools.count():
        group, role = slot(spec, i)
        prefix_key = (seed, "prefix", group if group != "control" else f"control-{i}")
        prefix = builder.texts.text(spec.prefix_tokens, prefix_key)
        suffix_key = (seed, "suffix", i)
        expected = builder.template_tokens(spec.api)
        if role == "reuse":
            if group not in shared_tokens:
                shared_tokens[group] = (
                    builder.tokenizer.count_chat([{"role": "system", "content": prefix}])
                    if spec.api == "chat"
                    else builder.tokenizer.count_prompt(prefix)
                )
            expected += shared_tokens[group]
        if spec.api == "chat":
            system = {"role": "system", "content": prefix}
            built = builder.chat(
                [system, {"role": "user", "content": builder.texts.text(spec.suffix_tokens, suffix_key)}]
            )
        else:
            built = builder.prompt(
                builder.tokenizer.count_prompt(prefix) + spec.suffix_tokens,
                "completions",
                suffix_key,
                prefix=prefix,
            )
        yield (
            RequestSpec(
                request_id=f"{spec.name}-{seed}-{i:06d}",
                api=spec.api,
                max_tokens=spec.output_tokens,
                messages=built.messages,
                prompt=built.prompt,
                input_tokens=built.input_tokens,
                pin_output=spec.pin_output,
                tags=tags_of(
                    {
                        "workload": spec.name,
                        "group": group,
                        "shared": group != "control",
                        "role": role,
                        "prefix_tokens": spec.prefix_tokens,
                        "input_tokens": built.input_tokens,
                        "target_tokens": target,
                        "cache_expected_tokens": min(expected, built.input_tokens),
                    }
                ),
            )
        )
