"""`notebooks/cto_review.ipynb` executed by a real Jupyter kernel (nbclient + ipykernel) on real run directories.

The parameters are injected papermill-style: a cell tagged `injected-parameters` right after the one tagged
`parameters`. The runs are the ones `tests/test_report.py` makes (two scripted engines of known speed, one
INVALID point), built once per session. Any cell error fails the test; the outputs must name the fast engine.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import nbformat
import pytest

from tests.test_report import HOSTILE_ENGINE, Runs, make_runs

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "cto_review.ipynb"


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return make_runs(tmp_path_factory.getbasetemp() / "report-runs")


def inject(nb: nbformat.NotebookNode, params: Mapping[str, object]) -> nbformat.NotebookNode:
    """Insert a cell assigning `params` right after the cell tagged `parameters` (what papermill does)."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    parts: list[str] = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out:
                data = out["data"]
                parts.append(str(data.get("text/markdown") or data.get("text/plain") or ""))
                parts.append(str(data.get("image/svg+xml") or ""))
            elif out.get("output_type") == "error":
                parts.append("\n".join(out.get("traceback", [])))
    return "\n".join(parts)


def test_notebook_runs_on_real_run_directories(runs: Runs, tmp_path: Path) -> None:
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = nb.cells[1]
    assert first.cell_type == "code" and "parameters" in first.metadata.get("tags", [])
    params = {
        "run_dirs": [str(runs.run), str(runs.run_b)],
        "profile": "latency-critical-chatbot",
        "plan": str(runs.plan),
        "slo": {"ttft_p95_ms": 40.0},
    }
    inject(nb, params)
    # "python3" resolves to the interpreter running the tests (jupyter_client swaps the kernelspec's bare
    # `python` for sys.executable); the first code cell prints it and we check below.
    client = NotebookClient(
        nb, kernel_name="python3", timeout=180, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on any cell error
    nbformat.write(nb, tmp_path / "executed.ipynb")

    text = _text(nb)
    assert f"kernel python {sys.executable}" in text
    assert "Recommended engine: fast" in text
    assert "1 INVALID point(s): excluded from the decision" in text and "measured for" in text
    assert "support-chat" in text  # the plan
    assert text.count("<svg") == 5  # totals, latency-throughput, TTFT and ITL CDFs, throughput
    assert "memory over time: not recorded" in text  # attached endpoints: no local process to read
    assert "requests_running" in text  # the scripted adapter's /metrics were sampled
    # the SLO: only fast is under 40 ms TTFT p95 (scripted 20 ms vs 40 and 50), and its concurrency=4 is INVALID
    assert "meeting the SLO: fast concurrency=1\n" in text
    assert HOSTILE_ENGINE[:20] in text  # user strings shown as they are (a notebook is not a web page)
    # the load-point table: ok / failed / cancelled apart and the memory peak column (not recorded for attached
    # endpoints); every cost is on a named instance; the host facts of the environment
    assert all(col in text for col in ("ok", "failed", "cancelled", "memory_peak_mib")), text[-3000:]
    assert "priced on aws-" in text and "instance" in text
    assert "CPU features:" in text and "GPUs:" in text


def test_notebook_refuses_missing_parameters(tmp_path: Path) -> None:
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    )
    with pytest.raises(CellExecutionError, match="set run_dirs"):
        client.execute()
