"""The notebooks run headless (nbclient, a real Jupyter kernel) and draw their plots.

The ramp and affinity notebooks use the package's simulators in-process; the quickstart and batch
notebooks call the session's SimEngine app over HTTP with the openai SDK; the autoscaling notebook
plots a benchmark's output. Run with ``EMBER_NOTEBOOKS_WRITE=1`` to save the executed notebooks
(outputs and plots) back into notebooks/.
"""

from __future__ import annotations

import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import DEMO_KEY, REPO_ROOT, SIM_MODEL

NOTEBOOKS = REPO_ROOT / "notebooks"


def _execute(name: str) -> nbformat.NotebookNode:
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    # The kernel inherits this environment; PYTHONPATH makes it import this tree's package.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    if os.environ.get("EMBER_NOTEBOOKS_WRITE") == "1":
        nbformat.write(nb, path)
    return nb


def _images(nb: nbformat.NotebookNode) -> int:
    return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "image/png" in o.get("data", {}))


def test_no_notebook_imports_from_tests():
    for path in NOTEBOOKS.glob("*.ipynb"):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code":
                assert "sys.path" not in cell.source, path
                assert not re.search(r"^\s*(from|import)\s+(tests|affinity|rate_limit|_common)\b", cell.source,
                                     re.M), path


@pytest.mark.parametrize("name, plots", [("rate_limit_ramp.ipynb", 3), ("affinity.ipynb", 3)])
def test_simulation_notebooks_run_headless_and_plot(name, plots):
    nb = _execute(name)
    assert _images(nb) >= plots


def test_quickstart_runs_against_a_live_app(sim_app, monkeypatch):
    monkeypatch.setenv("EMBER_BASE_URL", sim_app)
    monkeypatch.setenv("EMBER_API_KEY", DEMO_KEY)
    monkeypatch.setenv("EMBER_MODEL", SIM_MODEL)
    nb = _execute("quickstart.ipynb")
    assert _images(nb) >= 2
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "x-request-id" in text and "NotFound" not in text  # the 404 is caught and printed as a status
    assert "404" in text


def test_batch_notebook_runs_a_batch_against_a_live_app(sim_app, monkeypatch):
    monkeypatch.setenv("EMBER_URL", sim_app.removesuffix("/v1"))
    monkeypatch.setenv("EMBER_API_KEY", DEMO_KEY)
    monkeypatch.setenv("EMBER_MODEL", SIM_MODEL)
    nb = _execute("batch.ipynb")
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    text += "".join(str(o.get("data", {}).get("text/plain", "")) for c in nb.cells
                    if c.cell_type == "code" for o in c.outputs)
    assert "'completed'" in text, text  # the watch cell's (status, request_counts)
    assert re.search(r"\b20 lines, \d+/\d+ prompt tokens cached", text), text
    assert re.search(r"batch: [1-9]\d* requests", text), text


def test_autoscale_notebook_plots_a_benchmark_run():
    nb = _execute("autoscale_step.ipynb")
    assert _images(nb) >= 1
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "plotting " in text
