"""The `synthetic` workload: every request has the same input and output length, and its own fresh prompt.

Prompts differ from their first word on, so a prefix cache finds nothing to reuse beyond the chat template
(pitfall 9: caches inflating results): each request's `cache_expected_tokens` tag is the template's tokens only.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from workloads.model import SyntheticSpec
from workloads.spec import RequestSpec
from workloads.text import PromptBuilder, tags_of
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
    assert isinstance(spec, SyntheticSpec)
    builder = PromptBuilder(tokenizer, salt=prompts)
    for i in itertools.count():
        built = builder.prompt(spec.input_tokens, spec.api, (seed, "synthetic", i))
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
                        "input_tokens": built.input_tokens,
                        "content_tokens": built.content_tokens,
                        "cache_expected_tokens": builder.template_tokens(spec.api),
                    }
                ),
            )
        )
