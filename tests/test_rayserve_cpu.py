"""Ray Serve LLM's CPU launch (adapters/rayserve.py + adapters/rayserve_driver.py) without starting it: the driver's
argument carries what the live run needs, and Ray's own `LLMConfig` (ray 2.60.0, in the vLLM CPU venv once
`bench engines install rayserve` ran; skipped otherwise) accepts it and resolves it to CPU."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import pytest

from adapters import install, rayserve, registry
from adapters.base import EngineConfig
from harness.errors import ConfigError


def cpu_spec(cfg: EngineConfig | None = None) -> tuple[list[str], dict[str, object]]:
    cfg = replace(cfg or registry.default_config("rayserve"), port=9001)
    argv = rayserve.launch_argv(cfg)
    return argv, json.loads(argv[-1])


def test_cpu_launch_runs_the_driver_in_the_vllm_venv() -> None:
    argv, spec = cpu_spec()
    # -P: adapters/ (which holds vllm.py) must not shadow the vllm package
    assert argv[:3] == [str(install.vllm_python()), "-P", str(install.rayserve_driver())]
    assert install.rayserve_driver().is_file()
    assert (spec["host"], spec["port"]) == ("127.0.0.1", 9001)
    llm = spec["llm_config"]
    assert isinstance(llm, dict)
    assert llm["accelerator_config"] == {"kind": "cpu"} and "accelerator_type" not in llm
    assert llm["experimental_configs"] == {"stream_batching_interval_ms": 0}
    assert llm["model_loading_config"] == {
        "model_id": registry.SERVED_MODEL,
        "model_source": str(install.hf_model_dir()),
    }
    kwargs = llm["engine_kwargs"]
    assert (
        kwargs["enforce_eager"] is True
        and kwargs["max_model_len"] == 4096
        and kwargs["dtype"] in ("bfloat16", "float32")
    )


def test_cpu_environment_keeps_ray_on_loopback_and_metrics_where_the_driver_puts_them() -> None:
    cfg = registry.default_config("rayserve")
    env = rayserve.launch_env(cfg)
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and env["VLLM_HOST_IP"] == "127.0.0.1"
    assert not any(k.startswith("RAYSERVE_") for k in env)  # EngineBench's own keys stay out of the engine
    port = int(cfg.env["RAYSERVE_METRICS_PORT"])  # picked free by default_config, once
    _, spec = cpu_spec(cfg)
    assert spec["metrics_port"] == port
    assert rayserve.ADAPTER.metrics_url(cfg, "http://127.0.0.1:9001") == f"http://127.0.0.1:{port}/metrics"
    # an attached app (no port EngineBench chose): no guess
    assert rayserve.ADAPTER.metrics_url(replace(cfg, env={}), "http://h:1") is None


def test_cpu_launch_refusals() -> None:
    cfg = registry.default_config("rayserve")
    with pytest.raises(ConfigError, match="RAYSERVE_METRICS_PORT"):
        rayserve.launch_argv(replace(cfg, env={"RAYSERVE_ACCELERATOR": "cpu"}))
    with pytest.raises(ConfigError, match="not a port number"):
        rayserve.launch_argv(replace(cfg, env={**cfg.env, "RAYSERVE_METRICS_PORT": "x"}))
    with pytest.raises(ConfigError, match="gpu_memory_fraction"):
        rayserve.launch_argv(replace(cfg, gpu_memory_fraction=0.5))


def test_ready_is_a_first_completion() -> None:
    cfg = registry.default_config("rayserve")
    (call,) = rayserve.ADAPTER.prepare_calls(cfg)
    assert (call.method, call.path) == ("POST", "/v1/completions")
    assert (
        call.body is not None and call.body["model"] == registry.SERVED_MODEL and call.body["max_tokens"] == 1
    )
    assert rayserve.ADAPTER.ready_after_prepare  # adapters.process counts it in the cold start


def test_ray_llmconfig_accepts_the_cpu_spec() -> None:
    if not install.status("rayserve").installed:
        pytest.skip("ray[serve] is not in the vLLM venv: `bench engines install rayserve`")
    _, spec = cpu_spec()
    probe = (
        "import json, sys; from ray.serve.llm import LLMConfig; "
        "c = LLMConfig(**json.loads(sys.argv[1])); "
        "print(json.dumps({'kind': c.accelerator_config.kind, 'interval': c.experimental_configs, "
        "'kwargs': c.get_engine_config().get_initialization_kwargs()['distributed_executor_backend']}))"
    )
    done = subprocess.run(
        [str(install.vllm_python()), "-P", "-c", probe, json.dumps(spec["llm_config"])],
        capture_output=True,
        text=True,
        timeout=300,
        env={"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.splitlines()[-1])
    # CPUConfig -> vLLM's multiprocessing executor (ray 2.60.0 engines/vllm/vllm_models.py), not Ray's GPU path
    assert got == {"kind": "cpu", "interval": {"stream_batching_interval_ms": 0}, "kwargs": "mp"}
