"""The `quantized` workload: one base workload run against precision variants of one model, plus a quality check.

- Variants (F16, Q8_0, Q4_0, Q4_1, ...) are GGUF files made locally from the shipped model with
  `llama-quantize --allow-requantize` and cached; a variant of the source's own file type is the source file itself.
  Caveat: the shipped SmolLM2 GGUF is Q4_1, so "F16" is the exact dequantization of those Q4_1 weights, not the
  original bf16 model: quality differences measure requantization loss relative to the shipped weights.
- Speed: `generate` is the base workload's requests, the same for every variant (same fingerprint).
- Quality: a fixed set of short factual prompts answered greedily by each variant; `quality_report` compares each
  variant's outputs with the reference variant's (greedy agreement, and log-probability drift where the engine
  returned logprobs). Pure functions: the orchestration that launches an engine per variant lives elsewhere.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import ConfigError, EngineError
from workloads.gguf import FILE_TYPES, read_metadata
from workloads.model import QuantizedSpec
from workloads.spec import RequestSpec
from workloads.tokenizer import Tokenizer

if TYPE_CHECKING:
    from workloads.registry import Workload

__all__ = [
    "DEFAULT_QUANTIZE_BIN",
    "DEFAULT_VARIANT_DIR",
    "GENERATOR_VERSION",
    "QUALITY_PROMPTS",
    "QualityOutput",
    "Variant",
    "generate",
    "gguf_file_type",
    "output_from_openai",
    "quality_report",
    "quality_requests",
    "requests",
    "variants",
]

GENERATOR_VERSION = 1
DEFAULT_QUANTIZE_BIN = "~/.cache/enginebench/llamacpp/11434/bin/llama-quantize"
DEFAULT_VARIANT_DIR = "~/.cache/enginebench/quantized"

QUALITY_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "How many days are there in a week?",
    "What is the chemical symbol for water?",
    "Who wrote the play Romeo and Juliet?",
    "What is the largest planet in our solar system?",
    "What is 12 multiplied by 12?",
    "What colour do you get by mixing blue and yellow?",
    "What is the boiling point of water in degrees Celsius at sea level?",
    "Which ocean lies between Europe and North America?",
    "How many legs does a spider have?",
    "What gas do plants absorb from the air?",
    "What is the freezing point of water in degrees Fahrenheit?",
    "Which planet is known as the Red Planet?",
    "What is the square root of 81?",
    "In which continent is Egypt?",
    "What is the longest river in South America?",
    "How many minutes are there in an hour?",
    "What language is mainly spoken in Brazil?",
    "What is the opposite of the word 'ancient'?",
    "Name the three primary colours of light.",
)


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    file_type: str
    path: Path


def generate(
    workload: Workload, n: int, seed: int, tokenizer: Tokenizer, prompts: str = ""
) -> list[RequestSpec]:
    return _base(workload).generate(n, seed, tokenizer=tokenizer, prompts=prompts)


def requests(workload: Workload, seed: int, tokenizer: Tokenizer, prompts: str = "") -> Iterator[RequestSpec]:
    return _base(workload).requests(seed, tokenizer=tokenizer, prompts=prompts)


def _base(workload: Workload) -> Workload:
    from workloads.registry import Workload as _Workload

    spec = workload.params
    assert isinstance(spec, QuantizedSpec)
    return _Workload(spec.base, workload.source, workload.base_dir)


# --------------------------------------------------------------------------------------------- variant files


def gguf_file_type(path: str | Path) -> str | None:
    """The file type a GGUF declares (`general.file_type`), e.g. "Q4_1"; None when it declares none."""
    value = read_metadata(path, {"general.file_type"}).get("general.file_type")
    return None if value is None else FILE_TYPES.get(int(value), str(value))


def variants(
    workload: Workload | QuantizedSpec,
    *,
    source: str | Path | None = None,
    out_dir: str | Path = DEFAULT_VARIANT_DIR,
    quantize_bin: str | Path = DEFAULT_QUANTIZE_BIN,
    make: bool = True,
    threads: int = 2,
) -> list[Variant]:
    """One model file per variant, made once with llama-quantize and cached in `out_dir` (a file that exists is
    reused). With make=False, only the paths are computed (nothing runs)."""
    spec = workload if isinstance(workload, QuantizedSpec) else workload.params
    if not isinstance(spec, QuantizedSpec):
        raise ConfigError(f"workload {spec.name} is not a quantized workload")
    if source is not None:
        src = Path(source).expanduser()
    elif isinstance(workload, QuantizedSpec):
        src = Path(spec.source_model).expanduser()
    else:
        src = workload.resolve_path(spec.source_model)
    out = Path(out_dir).expanduser()
    if make and not src.is_file():
        raise ConfigError(f"source model {src} not found: set source_model to the shipped GGUF")
    source_type = gguf_file_type(src) if src.is_file() else None
    stem = src.name.removesuffix(".gguf")
    result = []
    for v in spec.variants:
        if v.file_type == source_type:
            result.append(Variant(v.name, v.file_type, src))
            continue
        path = out / f"{stem}.{v.file_type}.gguf"
        if make and not path.is_file():
            _quantize(Path(quantize_bin).expanduser(), src, path, v.file_type, threads)
        result.append(Variant(v.name, v.file_type, path))
    return result


def _quantize(binary: Path, src: Path, dst: Path, file_type: str, threads: int) -> None:
    if not binary.is_file():
        raise ConfigError(f"llama-quantize not found at {binary}: build llama.cpp or pass quantize_bin=")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    argv = [str(binary), "--allow-requantize", str(src), str(tmp), file_type, str(threads)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EngineError(f"llama-quantize {file_type} failed (exit {done.returncode}): {tail[0]}")
    tmp.replace(dst)  # atomic: a half-written file is never mistaken for a cached variant


# --------------------------------------------------------------------------------------------- quality


def quality_requests(workload: Workload | QuantizedSpec) -> list[RequestSpec]:
    """The fixed quality prompts as greedy chat requests (not pinned: answers end where the model ends them).
    Ask the engine for logprobs (OpenAI `logprobs: true, top_logprobs: N`) to get drift as well."""
    spec = workload if isinstance(workload, QuantizedSpec) else workload.params
    if not isinstance(spec, QuantizedSpec):
        raise ConfigError(f"workload {spec.name} is not a quantized workload")
    return [
        RequestSpec(
            request_id=f"quality-{i:02d}",
            api="chat",
            max_tokens=spec.quality_max_tokens,
            messages=({"role": "user", "content": text},),
            pin_output=False,
            tags={"workload": spec.name, "quality": "true", "prompt_id": f"quality-{i:02d}"},
        )
        for i, text in enumerate(QUALITY_PROMPTS)
    ]


@dataclass(frozen=True, slots=True)
class QualityOutput:
    """A greedy answer: its text, and where the engine gave them, its tokens and their log-probabilities."""

    text: str
    tokens: tuple[str, ...] | None = None
    logprobs: tuple[float, ...] | None = None


def output_from_openai(body: Mapping[str, Any]) -> QualityOutput:
    """From a non-streamed OpenAI chat/completions response (llama.cpp, vLLM: `choices[0].logprobs.content`)."""
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    text = message.get("content") if isinstance(message, Mapping) else None
    if text is None:
        text = choice.get("text") or ""
    lp = choice.get("logprobs")
    content = lp.get("content") if isinstance(lp, Mapping) else None
    if not content:
        return QualityOutput(str(text))
    return QualityOutput(
        str(text),
        tuple(str(c.get("token", "")) for c in content),
        tuple(float(c["logprob"]) for c in content),
    )


def _units(out: QualityOutput) -> tuple[tuple[str, ...], str]:
    return (out.tokens, "tokens") if out.tokens is not None else (tuple(out.text.split()), "words")


def _common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def quality_report(
    reference_outputs: Mapping[str, QualityOutput | str],
    variant_outputs: Mapping[str, Mapping[str, QualityOutput | str]],
) -> dict[str, Any]:
    """Per variant, against the reference (prompt id -> output):
    `exact_match` fraction of prompts answered identically; `agreement` mean over prompts of (length of the common
    prefix) / (longer answer's length), in tokens where known, else words; `first_divergence_mean` mean index of the
    first differing unit; `logprob_drift_mean_abs` / `_max_abs` |logprob difference| of the same chosen tokens over
    the common prefix (only where both sides have logprobs). Prompts missing on either side are counted, not scored.
    """

    def as_output(o: QualityOutput | str) -> QualityOutput:
        return o if isinstance(o, QualityOutput) else QualityOutput(o)

    ref = {k: as_output(v) for k, v in reference_outputs.items()}
    report: dict[str, Any] = {"prompts": len(ref), "variants": {}}
    for name, outputs in variant_outputs.items():
        common = [k for k in ref if k in outputs]
        exact, agreement, divergence, drift, unit = 0, [], [], [], "tokens"
        for k in common:
            r, v = ref[k], as_output(outputs[k])
            (ru, unit_r), (vu, unit_v) = _units(r), _units(v)
            if unit_r != unit_v:  # compare like with like
                ru, vu, unit_r = tuple(r.text.split()), tuple(v.text.split()), "words"
            unit = unit_r if unit == "tokens" else unit
            exact += r.text == v.text
            p = _common_prefix(ru, vu)
            longest = max(len(ru), len(vu))
            agreement.append(1.0 if longest == 0 else p / longest)
            divergence.append(p)
            if r.logprobs is not None and v.logprobs is not None and unit_r == "tokens":
                drift += [abs(a - b) for a, b in zip(r.logprobs[:p], v.logprobs[:p], strict=False)]
        scored = len(common)
        report["variants"][name] = {
            "prompts_scored": scored,
            "prompts_missing": len(ref) - scored,
            "unit": unit,
            "exact_match": exact / scored if scored else None,
            "agreement": sum(agreement) / scored if scored else None,
            "first_divergence_mean": sum(divergence) / scored if scored else None,
            "logprob_tokens": len(drift),
            "logprob_drift_mean_abs": sum(drift) / len(drift) if drift else None,
            "logprob_drift_max_abs": max(drift) if drift else None,
        }
    return report
