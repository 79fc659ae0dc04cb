"""What EngineBench knows about the GPU-class engines beyond vLLM and llama.cpp, each fact with a source and a date.

Owns: the versioned knowledge document those adapters share (hardware, maintenance status, where each fact was
read), in the shape `matrix.knowledge.parse_knowledge` reads (`schema_version: 1`, `engines: {NAME: {aliases,
hardware, status, source, date, facts: [...]}}`; `facts` is extra detail that reader ignores), and the two
launch shapes the adapters share: a `docker run` of an official GPU image and the "can it run here" probe.
Dates are when the source was read (all on 2026-11-24 for this edition); a fetched repository snapshot is named by
its newest commit date. Nothing here opens a socket or reads a clock.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.base import EngineConfig

__all__ = [
    "ENGINE_FACTS",
    "KNOWLEDGE_SCHEMA_VERSION",
    "READ_ON",
    "EngineFacts",
    "Fact",
    "docker_gpu_run",
    "gpu_present",
    "knowledge_document",
    "local_gpu_status",
]

KNOWLEDGE_SCHEMA_VERSION = 1
READ_ON = "2026-11-24"


@dataclass(frozen=True, slots=True)
class Fact:
    claim: str
    source: str
    date: str = READ_ON


@dataclass(frozen=True, slots=True)
class EngineFacts:
    name: str
    aliases: tuple[str, ...]
    hardware: tuple[str, ...]
    status: str  # "active" | "maintenance" | "archived" | "inactive"
    maintenance: str  # one line for EngineInfo.maintenance
    facts: tuple[Fact, ...] = field(default_factory=tuple)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.source for f in self.facts))


_TGI_REPO = "github.com/huggingface/text-generation-inference (snapshot, newest commit 2026-01-08)"

ENGINE_FACTS: Mapping[str, EngineFacts] = {
    "sglang": EngineFacts(
        "sglang",
        ("sgl", "sglang-runtime"),
        ("nvidia", "amd", "cpu", "tpu"),
        "active",
        "active (sgl-project/sglang; docs.sglang.io read 2026-11-24)",
        (
            Fact(
                "launch: python -m sglang.launch_server --model-path M --tp N; OpenAI API on port 30000",
                "https://docs.sglang.io/advanced_features/server_arguments.html",
            ),
            Fact(
                "Prometheus metrics at /metrics with --enable-metrics (sglang:* names)",
                "https://docs.sglang.io/references/production_metrics.html",
            ),
            Fact(
                "hardware: NVIDIA, AMD, Ascend NPU, Intel Xeon CPU (AMX), TPU backends documented",
                "https://docs.sglang.io/docs/hardware-platforms/ascend-npus/ascend_npu_support_features",
            ),
        ),
    ),
    "lmdeploy": EngineFacts(
        "lmdeploy",
        ("turbomind",),
        ("nvidia",),
        "active",
        "active (InternLM/lmdeploy snapshot, newest commit 2026-08-21)",
        (
            Fact(
                "launch: lmdeploy serve api_server MODEL --server-port 23333 --tp N; image openmmlab/lmdeploy",
                "https://github.com/InternLM/lmdeploy/blob/main/docs/en/llm/api_server.md",
            ),
            Fact(
                "metrics on by default at /metrics (lmdeploy:* names), --disable-metrics turns them off",
                "https://github.com/InternLM/lmdeploy/blob/main/lmdeploy/metrics/loggers.py",
            ),
            Fact(
                "Ascend / Cambricon / MACA backends via dlinfer (docs/en/get_started/ascend)",
                "https://github.com/InternLM/lmdeploy/tree/main/docs/en/get_started",
            ),
        ),
    ),
    "trtllm": EngineFacts(
        "trtllm",
        ("tensorrt-llm", "trtllm-serve", "tensorrtllm"),
        ("nvidia",),
        "active",
        "active (NVIDIA/TensorRT-LLM; trtllm-serve docs read 2026-11-24)",
        (
            Fact(
                "launch: trtllm-serve MODEL --backend pytorch --tp_size N --max_batch_size B --max_seq_len L "
                "--kv_cache_free_gpu_memory_fraction F [--config extra.yml]",
                "https://github.com/NVIDIA/TensorRT-LLM/blob/main/tensorrt_llm/commands/serve.py",
            ),
            Fact(
                "image: nvcr.io/nvidia/tensorrt-llm/release; docker run --ipc host --gpus all "
                "--ulimit memlock=-1 --ulimit stack=67108864",
                "https://nvidia.github.io/TensorRT-LLM/1.2.0rc6/commands/trtllm-serve/run-benchmark-with-trtllm-serve.html",
            ),
            Fact(
                "/health, /metrics (JSON iteration stats), /version endpoints",
                "https://github.com/NVIDIA/TensorRT-LLM/blob/main/docs/source/commands/trtllm-serve.rst",
            ),
        ),
    ),
    "tgi": EngineFacts(
        "tgi",
        ("text-generation-inference", "text-generation-launcher"),
        ("nvidia", "amd", "intel-gpu", "gaudi", "neuron", "tpu"),
        "maintenance",
        "maintenance mode since 2025-12-11 (README banner, commit 'Maintenance mode (#3345)'); only minor fixes "
        "accepted; HF recommends vLLM / SGLang instead; newest commit in the snapshot read: 2026-01-08 (an archive "
        "date was not confirmed by any source found)",
        (
            Fact(
                "README: 'text-generation-inference is now in maintenance mode' (commit 2025-12-11, #3345)",
                _TGI_REPO,
            ),
            Fact("metrics listed in docs/source/reference/metrics.md (tgi_* names)", _TGI_REPO),
            Fact("installation docs for NVIDIA, AMD, Intel, Gaudi, Inferentia, TPU", _TGI_REPO),
        ),
    ),
    "ollama": EngineFacts(
        "ollama",
        (),
        ("cpu", "nvidia", "amd", "apple"),
        "active",
        "active (ollama/ollama snapshot, newest commit 2026-08-21)",
        (
            Fact(
                "server settings are environment variables: OLLAMA_HOST, OLLAMA_NUM_PARALLEL, "
                "OLLAMA_CONTEXT_LENGTH, OLLAMA_KV_CACHE_TYPE, OLLAMA_FLASH_ATTENTION",
                "https://github.com/ollama/ollama/blob/main/envconfig/config.go",
            ),
            Fact(
                "no Prometheus /metrics route; GET / answers 'Ollama is running', GET /api/version",
                "https://github.com/ollama/ollama/blob/main/server/routes.go",
            ),
            Fact(
                "image ollama/ollama: docker run -d --gpus=all -v ollama:/root/.ollama -p 11434:11434",
                "https://github.com/ollama/ollama/blob/main/docs/docker.mdx",
            ),
        ),
    ),
    "mlc": EngineFacts(
        "mlc",
        ("mlc-llm", "mlc_llm"),
        ("nvidia", "amd", "apple", "intel-gpu"),
        "active",
        "active but slow (mlc-ai/mlc-llm snapshot: last non-automated commit 2026-07-23)",
        (
            Fact(
                "launch: mlc_llm serve MODEL --mode server --host H --port P --overrides 'k=v;...'",
                "https://github.com/mlc-ai/mlc-llm/blob/main/python/mlc_llm/cli/serve.py",
            ),
            Fact(
                "/metrics renders engine stats as untyped 'name<TAB>value' lines (prefill_tokens_sum, ...)",
                "https://github.com/mlc-ai/mlc-llm/blob/main/python/mlc_llm/serve/engine_base.py",
            ),
        ),
    ),
    "triton": EngineFacts(
        "triton",
        ("tritonserver", "triton-openai"),
        ("nvidia",),
        "active",
        "active (triton-inference-server/server snapshot, newest commit 2026-08-19); OpenAI frontend is beta",
        (
            Fact(
                "launch: python3 openai_frontend/main.py --model-repository R --tokenizer T (port 9000) inside "
                "nvcr.io/nvidia/tritonserver:26.07-vllm-python-py3",
                "https://github.com/triton-inference-server/server/blob/main/python/openai/README.md",
            ),
            Fact(
                "frontend serves GET /metrics and GET /health/ready; Triton metrics nv_inference_*",
                "https://github.com/triton-inference-server/server/blob/main/docs/user_guide/metrics.md",
            ),
        ),
    ),
    "rayserve": EngineFacts(
        "rayserve",
        ("ray-serve-llm", "ray", "ray-serve"),
        ("nvidia", "amd", "tpu"),
        "active",
        "active (ray.serve.llm is alpha-stability public API; docs.ray.io read 2026-11-24)",
        (
            Fact(
                "launch: LLMConfig(model_loading_config=..., engine_kwargs=<vLLM args>); "
                "serve.run(build_openai_app({'llm_configs': [cfg]}), blocking=True)",
                "https://docs.ray.io/en/latest/serve/llm/quick-start.html",
            ),
            Fact(
                "engine metrics exported through Ray's Prometheus exporter (metrics export port)",
                "https://docs.ray.io/en/master/serve/llm/user-guides/observability.html",
            ),
        ),
    ),
    "mii": EngineFacts(
        "mii",
        ("deepspeed-mii", "deepspeed"),
        ("nvidia",),
        "inactive",
        "inactive: last release 0.3.3 (2025-03-25), last commit 2025-06-30 (deepspeedai/DeepSpeed-MII snapshot)",
        (
            Fact(
                "OpenAI server: python -m mii.entrypoints.openai_api_server --model M --tensor-parallel N",
                "https://github.com/deepspeedai/DeepSpeed-MII/blob/main/mii/entrypoints/openai_api_server.py",
            ),
            Fact(
                "kernels need NVIDIA compute capability >= 8.0, CUDA >= 11.6",
                "https://github.com/deepspeedai/DeepSpeed-MII/blob/main/README.md",
            ),
            Fact(
                "OpenAI server hard-codes ignore_eos=False; honours min_tokens; no usage in stream chunks",
                "https://github.com/deepspeedai/DeepSpeed-MII/blob/main/mii/entrypoints/openai_api_server.py",
            ),
        ),
    ),
}


def knowledge_document() -> dict[str, Any]:
    """The facts as a knowledge document `matrix.knowledge.parse_knowledge` accepts (no scores: those are the
    matrix's judgement, not facts)."""
    engines: dict[str, Any] = {}
    for name, e in ENGINE_FACTS.items():
        first = e.facts[0] if e.facts else Fact("", "", READ_ON)
        engines[name] = {
            "aliases": list(e.aliases),
            "hardware": list(e.hardware),
            "on_device": name in {"ollama", "mlc"},
            "status": e.status,
            "source": first.source,
            "date": first.date,
            "maintenance": e.maintenance,
            "facts": [{"claim": f.claim, "source": f.source, "date": f.date} for f in e.facts],
        }
    return {"schema_version": KNOWLEDGE_SCHEMA_VERSION, "kind": "knowledge", "engines": engines}


def gpu_present() -> bool:
    """An NVIDIA device node or the driver's CLI; the adapters here need a GPU to serve."""
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def local_gpu_status(
    name: str, *, binaries: Sequence[str] = (), modules: Sequence[str] = (), needs_gpu: bool = True
) -> tuple[bool, str]:
    """(runnable here, why): the engine's command or Python package must be installed, and a GPU present."""
    missing: list[str] = []
    found = [b for b in binaries if shutil.which(b)] + [m for m in modules if importlib.util.find_spec(m)]
    if not found:
        wanted = " / ".join([*binaries, *(f"python package {m}" for m in modules)])
        missing.append(f"{wanted} not installed")
    if needs_gpu and not gpu_present():
        missing.append("no NVIDIA GPU (no /dev/nvidia0, no nvidia-smi)")
    if missing:
        where = "run it on a GPU host" if needs_gpu else "install it, or run it elsewhere,"
        return False, (
            f"{name}: not runnable here ({'; '.join(missing)}); {where} and attach with "
            f"--endpoint {name}=http://HOST:PORT (or set ENGINEBENCH_ENDPOINT_{name.upper()})"
        )
    return True, f"{name}: {', '.join(found)} found" + (", GPU present" if needs_gpu else "")


def docker_gpu_run(
    image: str,
    cfg: EngineConfig,
    *,
    runtime: str = "docker",
    name: str,
    container_port: int | None = None,
    env: Mapping[str, str] | None = None,
    extra: Sequence[str] = ("--ipc=host",),
    model_mount: str = "/model",
) -> tuple[list[str], str]:
    """`docker run` of a GPU image publishing `cfg.port`; a local model path is mounted read-only.

    Returns the argv up to and including the image (the caller appends the engine's own arguments) and the model
    name those arguments should use inside the container."""
    inside = container_port or cfg.port
    argv = [runtime, "run", "--rm", "--name", f"enginebench-{name}-{cfg.port}", "--gpus", "all", *extra]
    argv += ["-p", f"{cfg.host}:{cfg.port}:{inside}"]
    model = cfg.model
    path = Path(model)
    if path.exists():
        target = model_mount if path.is_dir() else f"{model_mount}/{path.name}"
        argv += ["-v", f"{path.resolve()}:{target}:ro"]
        model = target
    for key, value in sorted({**cfg.env, **(env or {})}.items()):
        argv += ["-e", f"{key}={value}"]
    argv.append(image)
    return argv, model
