"""Config parity between the engines of one comparison: every biasing difference gives one line naming both values
and the fix; equal or unknown settings give none."""

from __future__ import annotations

import pytest

from adapters import mii, ollama, sglang, tgi
from adapters.base import EngineConfig
from adapters.parity import EngineSide, ParityWarning, parity_check

BASE = EngineConfig(
    model="/models/Llama-3.1-8B-Instruct", dtype="bfloat16", max_context=8192, prefix_caching=True
)


def side(name: str, **changes: object) -> EngineSide:
    fields = {k: v for k, v in changes.items() if k in EngineConfig.__dataclass_fields__}
    reported = {k: v for k, v in changes.items() if k not in fields}
    cfg = EngineConfig(**{**BASE.__dict__, **fields})
    return EngineSide(name=name, config=cfg, **reported)  # type: ignore[arg-type]


def kinds(warnings: list[ParityWarning]) -> list[str]:
    return [w.kind for w in warnings]


def test_identical_settings_give_no_warning() -> None:
    assert parity_check([side("vllm"), side("sglang"), side("lmdeploy")]) == []
    assert parity_check([]) == [] and parity_check([side("vllm")]) == []


def test_same_weights_under_different_folders_are_the_same_model() -> None:
    assert parity_check([side("vllm"), side("sglang", model="/mnt/llama-3.1-8b-instruct/")]) == []


@pytest.mark.parametrize(
    ("other", "kind", "message"),
    [
        (
            side("llamacpp", model="/m/Llama-3.1-8B-Instruct-Q4_K_M.gguf"),
            "model_file",
            "different model files: vllm serves llama-3.1-8b-instruct, llamacpp serves "
            "llama-3.1-8b-instruct-q4_k_m.gguf; serve the same weights on both (or compare them as different models)",
        ),
        (
            side("sglang", dtype="float16"),
            "precision",
            "different precision: vllm runs bf16, sglang runs fp16; use the same dtype/quantization on both "
            "(--dtype / --quantization) or report it as a precision comparison",
        ),
        (
            side("sglang", max_context=4096),
            "max_context",
            "different max context: vllm allows 8192 tokens, sglang allows 4096; set the same --max-context on both "
            "(it sizes the KV cache and batch)",
        ),
        (
            side("sglang", prefix_caching=False),
            "prefix_caching",
            "prefix caching differs: vllm has it on, sglang has it off; set --prefix-caching or "
            "--no-prefix-caching for both",
        ),
        (
            side("sglang", kv_cache_dtype="fp8_e5m2"),
            None,  # unknown on the reference side: not compared
            None,
        ),
        (
            side("sglang", tensor_parallel=2),
            "tensor_parallel",
            "different tensor parallelism: vllm uses 1 GPUs, sglang uses 2; set the same --tp on both or compare "
            "per GPU",
        ),
    ],
)
def test_each_difference_is_one_line_with_both_values_and_the_fix(
    other: EngineSide, kind: str | None, message: str | None
) -> None:
    warnings = parity_check([side("vllm"), other])
    if kind is None:
        assert warnings == []
        return
    assert kinds(warnings) == [kind]
    (w,) = warnings
    assert w.engines == ("vllm", other.name) and w.message == message and "\n" not in w.message


def test_reported_values_override_requested_ones() -> None:
    # both asked for 8192, but the engine clamped to what the model supports
    warnings = parity_check([side("vllm"), EngineSide("tgi", BASE, max_context=4096)])
    assert kinds(warnings) == ["max_context"] and "tgi allows 4096" in warnings[0].message


def test_engine_default_prefix_caching_is_used_when_not_requested() -> None:
    ref = EngineSide("sglang", EngineConfig(model="m"))  # RadixAttention is on by default
    lm = EngineSide("lmdeploy", EngineConfig(model="m"))  # --enable-prefix-caching is off by default
    (w,) = parity_check([ref, lm])
    assert w.kind == "prefix_caching" and "sglang has it on, lmdeploy has it off" in w.message
    # vLLM's default is on (vllm/engine/arg_utils.py): LMDeploy against vLLM, both at their defaults, differ
    (w,) = parity_check([EngineSide("vllm", EngineConfig(model="m")), lm])
    assert w.kind == "prefix_caching" and "vllm has it on, lmdeploy has it off" in w.message


@pytest.mark.parametrize("name", ["vllm", "llamacpp", "trtllm", "tgi", "triton", "rayserve"])
def test_every_engine_with_a_known_prefix_cache_default_is_compared(name: str) -> None:
    """Each of these caches prefixes unless told not to (sources in adapters/parity.py): at their defaults they
    differ from LMDeploy, and agree with it once told --no-prefix-caching."""
    lm = EngineSide("lmdeploy", EngineConfig(model="m"))
    assert [w.kind for w in parity_check([EngineSide(name, EngineConfig(model="m")), lm])] == [
        "prefix_caching"
    ]
    off = EngineSide(name, EngineConfig(model="m", prefix_caching=False))
    assert parity_check([off, lm]) == []


def test_chat_templates_compare_modulo_whitespace() -> None:
    a = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    same = "{% for m in messages %}{{ m.content }} {% endfor %}"
    assert parity_check([side("vllm", chat_template=a), side("sglang", chat_template=same)]) == []
    (w,) = parity_check([side("vllm", chat_template=a), side("ollama", chat_template="{{ .Prompt }}")])
    assert w.kind == "chat_template" and "ollama applies '{{ .Prompt }}'" in w.message
    assert "--chat-template" in w.message


def test_engines_that_cannot_pin_output_length_are_named() -> None:
    sides = [
        EngineSide("sglang", BASE, info=sglang.INFO),
        EngineSide("tgi", BASE, info=tgi.INFO),
        EngineSide("mii", BASE, info=mii.INFO),  # no ignore_eos, but min_tokens pins the length
        EngineSide("ollama", BASE, info=ollama.INFO),
    ]
    warnings = parity_check(sides)
    assert kinds(warnings) == ["output_pinning", "output_pinning"]
    assert warnings[0].message == (
        "output length pinning not honoured: sglang runs to max_tokens, tgi stops at EOS (no ignore_eos/min_tokens); "
        "compare per-token metrics only, or unpin the workload (pin_output: false) for all engines"
    )
    assert warnings[1].engines == ("sglang", "ollama")
    assert parity_check(sides, pinned=False) == []


def test_observed_pinning_failure_beats_the_engine_claim() -> None:
    sides = [EngineSide("sglang", BASE, info=sglang.INFO), EngineSide("mlc", BASE, pinning_honoured=False)]
    (w,) = parity_check(sides)
    assert w.engines == ("sglang", "mlc")


def test_all_differences_are_reported_together() -> None:
    other = side("llamacpp", model="/m/other.gguf", dtype=None, quantization="Q4_1", max_context=2048,
                 prefix_caching=False)  # fmt: skip
    assert kinds(parity_check([side("vllm"), other])) == [
        "model_file",
        "precision",
        "max_context",
        "prefix_caching",
    ]
