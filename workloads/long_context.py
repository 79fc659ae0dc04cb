"""The `long-context` workload: prompts at fractions of the model's context window, with short outputs.

Request i uses fraction `fractions[i % len(fractions)]`, so every length is measured across the whole run (not one
length early, another late). The input is `floor(fraction * max_context)` prefilled tokens, lowered when needed so
that input + output fit the window. Tags carry the fraction and input length for "TTFT and prefill tokens/s by
input length". Every prompt is fresh: the cache is expected to serve the chat template's tokens at most
(`cache_expected_tokens`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from harness.errors import ConfigError
from workloads.model import LongContextSpec
from workloads.spec import RequestSpec
from workloads.text import PromptBuilder, tags_of
from workloads.tokenizer import Tokenizer

if TYPE_CHECKING:
    from workloads.registry import Workload

__all__ = ["GENERATOR_VERSION", "generate", "input_length", "requests"]

GENERATOR_VERSION = 1


def input_length(spec: LongContextSpec, fraction: float) -> int:
    target = min(math.floor(fraction * spec.max_context), spec.max_context - spec.output_tokens)
    if target < 1:
        raise ConfigError(
            f"workload {spec.name}: output_tokens ({spec.output_tokens}) leaves no room for input in "
            f"max_context {spec.max_context}"
        )
    return target


def generate(
    workload: Workload, n: int, seed: int, tokenizer: Tokenizer, prompts: str = ""
) -> list[RequestSpec]:
    return list(itertools.islice(requests(workload, seed, tokenizer, prompts), n))


def requests(workload: Workload, seed: int, tokenizer: Tokenizer, prompts: str = "") -> Iterator[RequestSpec]:
    spec = workload.params
    assert isinstance(spec, LongContextSpec)
    builder = PromptBuilder(tokenizer, salt=prompts)
    for i in itertools.count():
        fraction = spec.fractions[i % len(spec.fractions)]
        target = input_length(spec, fraction)
        built = builder.prompt(target, spec.api, (seed, "long-context", i))
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
                        "fraction": f"{fraction:g}",
                        "input_tokens": built.input_tokens,
                        "content_tokens": built.content_tokens,
                        "cache_expected_tokens": builder.template_tokens(spec.api),
                    }
                ),
            )
        )
