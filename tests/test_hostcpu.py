"""The CPU engines' precision follows the host's instruction set (issue: vLLM's bf16 on fallback kernels on AVX2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters import registry
from adapters.base import EngineConfig
from adapters.hostcpu import choose_cpu_dtype, cpu_flags, isa_features, parse_cpu_flags
from harness.errors import ConfigError
from harness.orchestrate import parse_engines
from harness.rundir import host_info

# First lines of real /proc/cpuinfo texts (flags shortened to the ones that matter plus a few neighbours).
EPYC_ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse4_2 avx f16c fma avx2 bmi2 sha_ni
"""
EPYC_ZEN4 = """processor\t: 0
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse4_2 avx fma avx2 avx512f avx512bw avx512_vnni avx512_bf16 vaes
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: sse4_2 avx avx2 fma avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
GRAVITON = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm
"""


def test_flags_are_read_from_x86_and_arm_cpuinfo() -> None:
    assert isa_features(parse_cpu_flags(EPYC_ZEN3)) == ["sse4_2", "avx", "avx2", "fma", "f16c"]
    assert "amx_bf16" in isa_features(parse_cpu_flags(SAPPHIRE_RAPIDS))
    assert isa_features(parse_cpu_flags(GRAVITON)) == ["asimd"]
    assert parse_cpu_flags("no flags here") == frozenset()


@pytest.mark.parametrize(
    ("cpuinfo", "dtype"),
    [(EPYC_ZEN3, "float32"), (EPYC_ZEN4, "bfloat16"), (SAPPHIRE_RAPIDS, "bfloat16"), (GRAVITON, "float32")],
)
def test_bfloat16_only_with_native_bf16(cpuinfo: str, dtype: str) -> None:
    choice = choose_cpu_dtype(parse_cpu_flags(cpuinfo))
    assert (choice.dtype, choice.source, choice.warning) == (dtype, "auto", None)
    if dtype == "float32":
        assert "lacks AVX-512 BF16 and AMX" in choice.reason
    else:
        assert "native bf16" in choice.reason


def test_a_users_dtype_wins_with_a_warning_when_slow_here() -> None:
    slow = choose_cpu_dtype(parse_cpu_flags(EPYC_ZEN3), "bfloat16")
    assert (slow.dtype, slow.source) == ("bfloat16", "user")
    assert slow.warning is not None and "fallback kernels" in slow.warning and "float32" in slow.warning
    fine = choose_cpu_dtype(parse_cpu_flags(EPYC_ZEN4), "bfloat16")
    assert (fine.dtype, fine.source, fine.warning) == ("bfloat16", "user", None)
    assert choose_cpu_dtype(parse_cpu_flags(EPYC_ZEN3), "float32").warning is None


def test_the_launched_vllm_follows_this_hosts_cpu() -> None:
    want = choose_cpu_dtype(cpu_flags()).dtype
    assert registry.default_config("vllm").dtype == want
    argv = registry.get("vllm").launch_argv(registry.default_config("vllm"))
    assert argv[argv.index("--dtype") + 1] == want
    auto = registry.cpu_dtype_choice("vllm", registry.default_config("vllm"), user_set=False)
    assert auto is not None and auto.source == "auto" and auto.dtype == want
    # an engine on a GPU or a llama.cpp GGUF has no CPU dtype choice to record
    gpu = EngineConfig(model="m", env={"VLLM_TARGET_DEVICE": "cuda"})
    assert registry.cpu_dtype_choice("vllm", gpu, user_set=False) is None
    assert registry.cpu_dtype_choice("llamacpp", registry.default_config("llamacpp"), user_set=False) is None


def test_manifest_host_block_names_the_cpu_features() -> None:
    host = host_info()
    assert host.cpu_features == isa_features(cpu_flags())
    text = Path("/proc/cpuinfo").read_text()
    assert ("avx2" in (host.cpu_features or [])) == (" avx2" in text)
    assert json.loads(host.model_dump_json())["machine"]


def test_engine_set_parses_types_and_refuses_bad_input() -> None:
    (vllm,) = parse_engines(
        "vllm", [], ["vllm.dtype=float32", "vllm.max_num_seqs=4", "vllm.prefix_caching=off"]
    )
    assert dict(vllm.settings) == {"dtype": "float32", "max_num_seqs": "4", "prefix_caching": "off"}
    cfg = registry.apply_settings("vllm", registry.default_config("vllm"), dict(vllm.settings))
    assert (cfg.dtype, cfg.max_num_seqs, cfg.prefix_caching) == ("float32", 4, False)
    for bad, says in [
        ("vllm.colour=red", "unknown setting"),
        ("vllm.max_num_seqs=many", "give a whole number"),
        ("vllm=float32", "ENGINE.FIELD=VALUE"),
        ("tgi.dtype=float16", "no engine named 'tgi' in this run"),
    ]:
        with pytest.raises(ConfigError, match=says):
            parse_engines("vllm", [], [bad])
    with pytest.raises(ConfigError, match="attached endpoint"):
        parse_engines(None, ["x=http://127.0.0.1:1"], ["x.dtype=float32"])
    (x,) = parse_engines(
        None, ["x=http://127.0.0.1:1"], ["x.model=llama3"]
    )  # which served model, for an endpoint
    assert dict(x.settings) == {"model": "llama3"}


def _llama_marker(cache: Path, needs: list[str]) -> None:
    from adapters import install

    for tool in install.LLAMA_TOOLS:
        install.llama_bin(tool).parent.mkdir(parents=True, exist_ok=True)
        install.llama_bin(tool).touch()
    marker = install.llama_bin("llama-server").parent.parent / "ready.json"
    marker.write_text(
        json.dumps({"schema_version": 1, "versions": {"llama.cpp": install.LLAMA_BUILD}, "cpu_needs": needs})
    )


def test_a_llama_build_is_not_reused_on_a_cpu_without_its_instructions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapters import install

    monkeypatch.setenv("ENGINEBENCH_CACHE", str(tmp_path))
    have = sorted(cpu_flags())
    if not have:
        pytest.skip("this host's /proc/cpuinfo has no flags line")
    _llama_marker(tmp_path, have[:3])
    assert install.status("llamacpp").installed
    _llama_marker(tmp_path, [*have[:3], "no_such_isa_flag"])
    st = install.status("llamacpp")
    assert not st.installed
    assert "built for no_such_isa_flag, which this CPU lacks" in st.detail
    assert "python -m adapters.install llamacpp" in st.detail
    # the portable x86 build needs x86-64-v3 and no more
    if install.platform.machine() == "x86_64" and not install.LLAMA_NATIVE:
        assert install._llama_cpu_needs() == ["sse4_2", "avx", "avx2", "bmi2", "fma", "f16c"]
