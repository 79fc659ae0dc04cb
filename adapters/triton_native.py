"""NVIDIA Triton Inference Server through its native protocol, with vLLM behind it: the `triton` engine.

Here it runs as "Triton core + python backend serving vLLM CPU": tritonserver 2.51.0 from PyPI `nvidia-pytriton`
0.7.0 (`adapters.triton_install`), one decoupled python-backend model (`adapters/triton_vllm_model.py`, copied into a
model repository written at launch) running vLLM's AsyncLLM from the vLLM CPU venv, with the request and response
contract of Triton's own vLLM backend (triton-inference-server/vllm_backend src/model.py, commit 8de0c148). Against
NVIDIA's `tritonserver:*-vllm-python-py3` image (`container_argv`, or `--endpoint triton=http://HOST:8000`) the same
requests reach the real vLLM backend. The OpenAI-compatible frontend is the `triton-openai` engine (adapters/triton.py).

The protocol (server docs/protocol/extension_generate.md; http_server.cc of the bundled 2.51.0): POST
`/v2/models/<model>/generate_stream` with a JSON object whose keys name the model's inputs answers Server-Sent Events,
one `data: {"model_name", "model_version", <outputs>}` per response and no `[DONE]`: the body ends after the FINAL
response. An error is `data: {"error": "..."}`. Readiness `/v2/health/ready`, server version at `GET /v2`, models at
`POST /v2/repository/index`. Metrics (`nv_inference_*`, per model) are on their own port (`--metrics-port`).

Output length is pinned with `sampling_parameters` (`max_tokens`, `min_tokens`, `ignore_eos`: vLLM SamplingParams
fields, which the vLLM backend passes through). The chat template is applied here, client-side, as a Triton user
does: the model's own template (its Hugging Face folder, `TRITON_TOKENIZER` in the environment or the shipped
model's), so the prompt the server prefills is the one EngineBench counted.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from adapters.base import (
    EngineConfig,
    EngineInfo,
    FunctionAdapter,
    HttpCall,
    MetricMap,
    StreamDelta,
    Usage,
    no_tokenizer,
    require,
)
from adapters.knowledge import ENGINE_FACTS, docker_gpu_run
from adapters.process import TAG_VAR
from workloads.spec import RequestSpec

__all__ = [
    "ADAPTER",
    "IMAGE",
    "INFO",
    "METRICS",
    "build",
    "config_pbtxt",
    "container_argv",
    "default_config",
    "launch_argv",
    "launch_env",
    "metrics_url",
    "model_json",
    "parse_event",
    "parse_response",
]

IMAGE = "nvcr.io/nvidia/tritonserver:26.07-vllm-python-py3"
_FACTS = ENGINE_FACTS["triton"]
METRICS_PORT_VAR = "TRITON_METRICS_PORT"
_OWN_KEYS = (METRICS_PORT_VAR, "TRITON_TOKENIZER", "TRITON_REPOSITORY")
DEFAULT_METRICS_PORT = 8002  # tritonserver --metrics-port default (docs/user_guide/metrics.md)
MODEL_SOURCE = Path(__file__).with_name("triton_vllm_model.py")

INFO = EngineInfo(
    name="triton",
    display_name="Triton + vLLM (here: Triton core 2.51 + python backend serving vLLM CPU)",
    hardware=_FACTS.hardware,
    honours_ignore_eos=True,  # sampling_parameters reach vLLM's SamplingParams (vllm_backend utils/request.py)
    honours_min_tokens=True,
    usage_in_stream=False,  # counts come as num_input_tokens / num_output_tokens outputs, not OpenAI usage
    tokens_per_chunk="one",  # num_output_tokens states each response's count; vLLM CPU: one token per step
    tokenize_path=None,
    health_path="/v2/health/ready",
    version_path="/v2",
    metrics_path=None,  # on the metrics port: `metrics_url`
    maintenance=_FACTS.maintenance,
    sources=_FACTS.sources,
    container_image=IMAGE,
)

# Triton core's per-model series (docs/user_guide/metrics.md; names seen on the bundled 2.51.0's metrics port).
# nv_inference_request_success counts requests (a decoupled request once, when its FINAL response is sent).
METRICS = MetricMap(
    names={
        "nv_inference_pending_request_count": "requests_waiting",
        "nv_inference_request_success": "requests_finished_total",
    }
)

# EngineConfig field -> vLLM AsyncEngineArgs field in model.json (what the vLLM backend reads, and our model too)
_ENGINE_ARGS = {
    "dtype": "dtype",
    "max_context": "max_model_len",
    "max_num_seqs": "max_num_seqs",
    "prefix_caching": "enable_prefix_caching",
    "kv_cache_dtype": "kv_cache_dtype",
    "quantization": "quantization",
    "gpu_memory_fraction": "gpu_memory_utilization",
}


def model_json(cfg: EngineConfig) -> dict[str, Any]:
    """The vLLM engine arguments of the model repository (`<repo>/<model>/1/model.json`). Eager mode, as the vLLM
    CPU launch does: compiling costs minutes on these machines (shared/ENGINES-CPU.md)."""
    out: dict[str, Any] = {"model": cfg.model, "enforce_eager": True, "disable_log_stats": True}
    if cfg.served_model_name:
        out["served_model_name"] = cfg.served_model_name
    for field, key in _ENGINE_ARGS.items():
        value = getattr(cfg, field)
        if value is not None:
            out[key] = value
    if cfg.tensor_parallel != 1:
        out["tensor_parallel_size"] = cfg.tensor_parallel
    return out


def _served(cfg: EngineConfig) -> str:
    return cfg.served_model_name or Path(cfg.model).name or "model"


def config_pbtxt(name: str) -> str:
    """The model configuration: decoupled python backend with the vLLM backend's inputs and outputs (the ones this
    model implements), batching left to vLLM (max_batch_size 0), one instance on the CPU."""
    inputs = [
        ("text_input", "TYPE_STRING", False),
        ("stream", "TYPE_BOOL", True),
        ("sampling_parameters", "TYPE_STRING", True),
        ("exclude_input_in_output", "TYPE_BOOL", True),
        ("return_finish_reason", "TYPE_BOOL", True),
        ("return_num_input_tokens", "TYPE_BOOL", True),
        ("return_num_output_tokens", "TYPE_BOOL", True),
    ]
    outputs = [
        ("text_output", "TYPE_STRING", "-1"),
        ("finish_reason", "TYPE_STRING", "-1"),
        ("num_input_tokens", "TYPE_UINT32", "1"),
        ("num_output_tokens", "TYPE_UINT32", "-1"),
    ]
    lines = [f'name: "{name}"', 'backend: "python"', "max_batch_size: 0"]
    lines.append("model_transaction_policy { decoupled: true }")
    lines.append("input [")
    lines += [
        f'  {{ name: "{n}" data_type: {t} dims: [ 1 ]{" optional: true" if opt else ""} }},'
        for n, t, opt in inputs
    ]
    lines[-1] = lines[-1].rstrip(",")
    lines += ["]", "output ["]
    lines += [f'  {{ name: "{n}" data_type: {t} dims: [ {d} ] }},' for n, t, d in outputs]
    lines[-1] = lines[-1].rstrip(",")
    lines += ["]", "instance_group [ { count: 1 kind: KIND_CPU } ]", ""]
    return "\n".join(lines)


def _repository(cfg: EngineConfig) -> Path:
    """Where the launch writes the repository: named by its content, so a launch never changes another's files."""
    from adapters.triton_install import repositories_dir

    digest = hashlib.sha256(
        orjson.dumps([model_json(cfg), config_pbtxt(_served(cfg)), MODEL_SOURCE.read_bytes().decode()])
    ).hexdigest()[:16]
    return repositories_dir() / digest


def _metrics_port(cfg: EngineConfig) -> int | None:
    raw = cfg.env.get(METRICS_PORT_VAR)
    if raw is None:
        return None
    require(raw.isdigit() and 0 < int(raw) < 65536, f"triton: {METRICS_PORT_VAR}={raw} is not a port number")
    return int(raw)


def _server_flags(cfg: EngineConfig, host: str, repository: str) -> list[str]:
    # tritonserver --help of the bundled 2.51.0: gRPC off (nothing of ours speaks it), HTTP and metrics on `host`
    flags = ["--model-repository", repository, "--http-address", host, "--http-port", str(cfg.port)]
    flags += ["--allow-grpc", "false", "--allow-metrics", "true", "--metrics-address", host]
    port = _metrics_port(cfg)
    if port is not None:
        flags += ["--metrics-port", str(port)]
    flags += ["--allow-gpu-metrics", "false", "--allow-cpu-metrics", "false", "--exit-timeout-secs", "10"]
    return [*flags, *cfg.extra_args]


def launch_argv(cfg: EngineConfig) -> list[str]:
    """`python -m adapters.triton_native REPO SPEC_JSON -- tritonserver ...`: it writes the model repository, then
    runs the server and stops its whole tree when `bench` is gone (`_main`), so launching stays an argv."""
    from adapters.triton_install import backends_dir, tritonserver_bin

    require(cfg.threads is None or cfg.threads > 0, "triton: threads must be a positive number")
    repository = _repository(cfg)
    server = [str(tritonserver_bin()), "--backend-directory", str(backends_dir())]
    server += _server_flags(cfg, cfg.host, str(repository))
    spec = json.dumps({"name": _served(cfg), "engine_args": model_json(cfg)}, sort_keys=True)
    return [sys.executable, "-m", "adapters.triton_native", str(repository), spec, "--", *server]


def launch_env(cfg: EngineConfig) -> dict[str, str]:
    from adapters.triton_install import launch_env_paths, launch_paths

    env = launch_env_paths(launch_paths().get("python_libdir"))
    # vLLM CPU as adapters/vllm.py launches it; VLLM_HOST_IP keeps its internal sockets on loopback
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_HOST_IP": "127.0.0.1",
            "VLLM_CPU_KVCACHE_SPACE": "2",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    if cfg.threads is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{cfg.threads - 1}"
    env.update({k: v for k, v in cfg.env.items() if k not in _OWN_KEYS})
    return env


def container_argv(cfg: EngineConfig, runtime: str = "docker") -> list[str]:
    """NVIDIA's image with its real vLLM backend: `cfg.model` is a model repository whose model has
    `backend: "vllm"` and a model.json (vllm_backend samples/model_repository); the same native protocol."""
    inner = replace(cfg, env={k: v for k, v in cfg.env.items() if k not in _OWN_KEYS})
    argv, repository = docker_gpu_run(
        IMAGE, inner, runtime=runtime, name="triton", extra=(), model_mount="/models"
    )
    return [*argv, "tritonserver", *_server_flags(cfg, "0.0.0.0", repository)]


def metrics_url(cfg: EngineConfig, base_url: str) -> str | None:
    """Triton's metrics port on the engine's host: the one EngineBench gave it, else Triton's default."""
    port = _metrics_port(cfg) or DEFAULT_METRICS_PORT
    host = base_url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    return f"{base_url.split('://', 1)[0]}://{host}:{port}/metrics"


# ------------------------------------------------------------------------------------------------------- codec


@functools.lru_cache(maxsize=4)
def _chat_renderer(path: str) -> Any:
    from workloads.tokenizer import LocalTokenizer

    return LocalTokenizer(path)


def _template_source() -> str:
    from adapters.install import hf_model_dir

    return os.environ.get("TRITON_TOKENIZER") or str(hf_model_dir())


def prompt_of(spec: RequestSpec) -> str:
    """The text the model prefills: a completions prompt as it is, chat messages through the model's template."""
    if spec.api != "chat":
        return spec.prompt
    return str(_chat_renderer(_template_source()).chat_prompt(spec.messages))


def build(spec: RequestSpec, model: str, stream: bool) -> HttpCall:
    params: dict[str, Any] = {"max_tokens": spec.max_tokens, "temperature": 0.0}
    if spec.pin_output:
        params.update({"ignore_eos": True, "min_tokens": spec.max_tokens})
    body = {
        "text_input": prompt_of(spec),
        "stream": stream,
        "exclude_input_in_output": True,
        "return_finish_reason": True,
        "return_num_input_tokens": True,
        "return_num_output_tokens": True,
        "sampling_parameters": json.dumps(params),
    }
    return HttpCall("POST", f"/v2/models/{model}/{'generate_stream' if stream else 'generate'}", body, stream)


def _count(value: Any) -> int | None:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _delta(obj: Any) -> StreamDelta:
    if not isinstance(obj, dict):
        return StreamDelta(error=f"not a JSON object: {str(obj)[:200]}")
    if "error" in obj:
        return StreamDelta(error=str(obj["error"]))
    text = obj.get("text_output", "")
    text = "".join(map(str, text)) if isinstance(text, list) else str(text)
    reason = obj.get("finish_reason")
    reason = reason[0] if isinstance(reason, list) and reason else reason
    finish = None if reason in (None, "None", "") else str(reason)
    tokens = _count(obj.get("num_output_tokens"))
    prompt = _count(obj.get("num_input_tokens"))
    usage = Usage(prompt_tokens=prompt) if prompt is not None and finish else None
    if tokens is None:  # a server without return_num_output_tokens: one token per non-empty response
        return StreamDelta(text=text, tokens=1 if text else 0, finish_reason=finish, usage=usage)
    return StreamDelta(text=text, tokens=tokens, tokens_exact=True, finish_reason=finish, usage=usage)


def parse_event(data: bytes) -> StreamDelta | None:
    return _delta(orjson.loads(data))


def parse_response(body: bytes) -> StreamDelta:
    delta = _delta(orjson.loads(body))
    if delta.usage is None and delta.tokens_exact:
        return delta
    usage = Usage(
        delta.usage.prompt_tokens if delta.usage else None, delta.tokens if delta.tokens_exact else None
    )
    return replace(delta, usage=usage)


def version_from(payload: Mapping[str, Any]) -> str | None:
    version = payload.get("version")
    return f"tritonserver {version}" if isinstance(version, str) else None


tokenize_call, tokens_from = no_tokenizer(
    "triton: Triton has no tokenize endpoint; the model's files give the counts"
)


def local_status() -> tuple[bool, str]:
    from adapters import install

    st = install.status("triton")
    if not st.installed:
        return False, f"triton: not installed here ({st.detail}); `bench engines install triton`"
    for part in ("vllm", "model-hf"):
        dep = install.status(part)
        if not dep.installed:
            return False, f"triton: {part} missing ({dep.detail}); `bench engines install triton`"
    return True, (
        "triton: Triton core + python backend serving vLLM CPU (tritonserver from nvidia-pytriton, "
        f"{st.detail})"
    )


def default_config() -> EngineConfig:
    """What `bench run --engines triton` launches here: the vLLM CPU settings of adapters.registry's vLLM launch."""
    from adapters import install
    from adapters.hostcpu import choose_cpu_dtype, cpu_flags
    from adapters.process import free_port
    from adapters.registry import SERVED_MODEL

    return EngineConfig(
        model=str(install.hf_model_dir()),
        served_model_name=SERVED_MODEL,
        dtype=choose_cpu_dtype(cpu_flags()).dtype,
        max_context=4096,
        max_num_seqs=8,
        port=0,
        env={METRICS_PORT_VAR: str(free_port())},
    )


# ------------------------------------------------------------------------------------------------------- adapter


@dataclass(frozen=True)
class TritonAdapter(FunctionAdapter):
    """The function adapter, plus where the metrics are (adapters.base.ScrapesElsewhere) and how Triton lists its
    models (adapters.base.ListsModels)."""

    def metrics_url(self, cfg: EngineConfig, base_url: str) -> str | None:
        return metrics_url(cfg, base_url)

    def models_call(self) -> HttpCall:
        return HttpCall("POST", "/v2/repository/index", {}, False)

    def model_ids_from(self, payload: Any) -> list[str]:
        """Ready models of a `POST /v2/repository/index` answer ([{"name", "version", "state"}])."""
        if not isinstance(payload, list):
            return []
        return [
            str(m["name"])
            for m in payload
            if isinstance(m, dict) and m.get("state") == "READY" and "name" in m
        ]


ADAPTER = TritonAdapter(
    info=INFO,
    metrics=METRICS,
    launch_argv=launch_argv,
    launch_env=launch_env,
    container_argv=container_argv,
    build=build,
    parse_event=parse_event,
    parse_response=parse_response,
    version_from=version_from,
    local_status=local_status,
    tokenize_call=tokenize_call,
    tokens_from=tokens_from,
)


# ------------------------------------------------------------------------------------------------------- launcher


def _write_repository(repository: Path, name: str, engine_args: Mapping[str, Any]) -> None:
    if (repository / name / "1" / "model.py").is_file():
        return
    tmp = repository.with_name(f".{repository.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    version = tmp / name / "1"
    version.mkdir(parents=True)
    (tmp / name / "config.pbtxt").write_text(config_pbtxt(name))
    (version / "model.json").write_text(json.dumps(dict(engine_args), indent=2) + "\n")
    shutil.copyfile(MODEL_SOURCE, version / "model.py")
    try:
        os.replace(tmp, repository)
    except OSError:  # written meanwhile by another launch: same content by construction
        shutil.rmtree(tmp, ignore_errors=True)


def _tagged(tag: str) -> list[Any]:
    import psutil

    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and proc.environ().get(TAG_VAR) == tag:
                found.append(proc)
    return found


def _stop_tree(tag: str | None, seen: Sequence[Any], grace: float = 15.0) -> None:
    """SIGTERM every process of the engine: those seen below the launcher and those carrying its tag (vLLM's retitled
    processes can hide their environment; an engine core outlives a stub that died, seen here), then SIGKILL what is
    left after `grace`."""
    import psutil

    procs = {p.pid: p for p in [*seen, *(_tagged(tag) if tag else [])]}
    for proc in procs.values():
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, left = psutil.wait_procs(list(procs.values()), timeout=grace)
    for proc in left + (_tagged(tag) if tag else []):
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _below(seen: dict[int, Any]) -> None:
    import psutil

    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            seen.setdefault(child.pid, child)


def _main(argv: Sequence[str]) -> int:
    """Write the repository, run the server as a child and watch two things: the server's end (then everything it
    started goes too) and `bench`'s end, even by SIGKILL, which no handler of its own sees (then the whole tagged
    tree is stopped). SIGTERM / SIGINT / SIGHUP are passed on to the server, which shuts down gracefully."""
    if len(argv) < 4 or argv[2] != "--":
        raise SystemExit("usage: python -m adapters.triton_native REPOSITORY SPEC_JSON -- tritonserver ...")
    spec = json.loads(argv[1])
    repository = Path(argv[0])
    repository.parent.mkdir(parents=True, exist_ok=True)
    _write_repository(repository, spec["name"], spec["engine_args"])
    tag, parent = os.environ.get(TAG_VAR), os.getppid()
    server = subprocess.Popen(list(argv[3:]))
    seen: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: server.send_signal(signal.SIGTERM))
    while server.poll() is None:
        _below(seen)  # remembered: a process whose parent died leaves the tree
        if os.getppid() != parent:
            print(f"adapters.triton_native: parent {parent} is gone: stopping the server", flush=True)
            server.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=15)
            break
        time.sleep(0.5)
    _stop_tree(tag, list(seen.values()))
    return server.wait()


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
