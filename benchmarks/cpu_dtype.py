"""Which precision should vLLM's CPU build run at on this CPU, and how far is it then from llama.cpp?

Each case is a real `bench run` (synthetic workload, one stream, `--requests N` of INPUT prompt tokens and OUTPUT
output tokens) of the shipped model, read back from its summary.json: TTFT p50 (prefill) and TPOT p50 (decode).

Cases: vLLM in bfloat16 and in float32, on this CPU as it is and with its AVX-512 hidden ("avx2": what a CPU
without AVX-512 runs): torch's `_is_avx512_supported` / `_is_avx512_bf16_supported` answer False (vLLM then loads
its `_C_AVX2` kernels, vllm/platforms/cpu.py `import_kernels`), `ATEN_CPU_CAPABILITY=avx2` caps PyTorch's kernels
and `ONEDNN_MAX_CPU_ISA=AVX2` caps oneDNN's, so a bf16 linear cannot be made by oneDNN and vLLM falls back to
torch's (vllm/model_executor/layers/utils.py `dispatch_cpu_unquantized_gemm`). The instructions are emulated, the
clock and caches are this machine's: the ratios carry over, the absolute times do not. llama.cpp's build is the
portable x86-64-v3 one (AVX2, adapters/install.py), so its one row stands for both.

    .venv/bin/python -m benchmarks.cpu_dtype --requests 4 --input 256 --output 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".venv" / "bin" / "bench"

# Loaded by every Python process of the engine (PYTHONPATH): hides AVX-512 from torch's CPU capability checks.
_HIDE_AVX512 = """
try:
    import torch.cpu as _cpu
except Exception:
    pass
else:
    _cpu._is_avx512_supported = lambda: False
    _cpu._is_avx512_bf16_supported = lambda: False
    _cpu._is_amx_tile_supported = lambda: False
"""


def _run(engine: str, dtype: str | None, isa: str, args: argparse.Namespace, work: Path) -> dict[str, object]:
    out = work / f"{engine}-{dtype or 'gguf'}-{isa}"
    env = dict(os.environ)
    if isa == "avx2":
        site = work / "hide-avx512"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(_HIDE_AVX512)
        env.update(PYTHONPATH=str(site), ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    argv = [str(BENCH), "run", "--engines", engine, "--workload", "synthetic"]
    argv += ["--set", f"input_tokens={args.input}", "--set", f"output_tokens={args.output}"]
    argv += ["--concurrency", "1", "--requests", str(args.requests), "--warmup", "1", "--out", str(out)]
    if dtype is not None:
        argv += ["--engine-set", f"{engine}.dtype={dtype}"]
    started = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    row: dict[str, object] = {"engine": engine, "dtype": dtype or "Q4_1 GGUF", "isa": isa}
    row["wall_s"] = round(time.monotonic() - started, 1)
    if done.returncode != 0:
        row["error"] = (done.stdout + done.stderr).strip().splitlines()[-1:]
        return row
    point = json.loads((out / "summary.json").read_text())["points"][0]
    row["ttft_p50_ms"] = point["ttft_ms"]["p50"]
    row["tpot_p50_ms"] = point["tpot_ms"]["p50"]
    row["verdict"] = point["verdict"]["status"]
    row["verdict_reasons"] = [r.get("code") or r.get("message") for r in point["verdict"]["reasons"]]
    log = next(out.glob("engines/*.log"), None)
    text = log.read_text(errors="replace") if log else ""
    row["onednn_fallback"] = "Failed to create oneDNN linear" in text
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--input", type=int, default=256)
    ap.add_argument("--output", type=int, default=32)
    ap.add_argument("--isa", default="native,avx2", help="native, avx2 or both (comma-separated)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cpu-dtype-") as tmp:
        for isa in args.isa.split(","):
            for dtype in ("bfloat16", "float32"):
                rows.append(_run("vllm", dtype, isa, args, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
        rows.append(_run("llamacpp", None, "avx2", args, Path(tmp)))
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n{'engine':9} {'dtype':10} {'isa':7} {'TTFT p50':>10} {'TPOT p50':>10}  oneDNN fallback",
        file=sys.stderr,
    )
    for r in rows:
        if "error" in r:
            print(f"{r['engine']:9} {r['dtype']!s:10} {r['isa']:7} failed: {r['error']}", file=sys.stderr)
            continue
        print(
            f"{r['engine']:9} {r['dtype']!s:10} {r['isa']:7} {r['ttft_p50_ms']:8.0f} ms {r['tpot_p50_ms']:8.1f} ms"
            f"  {r.get('onednn_fallback', '')}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
