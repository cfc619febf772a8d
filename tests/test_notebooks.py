"""The notebooks in notebooks/ are committed with their outputs (figures included) and run top to bottom
without error, leaving nothing behind in the temp folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# What a committed output must not show: a temp or home folder of the machine that ran it.
LOCAL_PATH = re.compile("|".join(["/tmp/", "/home/", "/" + "root/", "/Users/", r"\\AppData\\"]))


def _outputs(notebook) -> list[dict]:
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def _images(notebook) -> int:
    return sum("image/png" in o.get("data", {}) for o in _outputs(notebook))


def _errors(notebook) -> list[str]:
    return [f"{o['ename']}: {o['evalue']}" for o in _outputs(notebook) if o.get("output_type") == "error"]


def test_there_are_notebooks() -> None:
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "calibration_audit.ipynb", "finetune_your_data.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_holds_its_outputs(path: Path) -> None:
    """Opened on GitHub or in Jupyter without running, a notebook shows its figures and results."""
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), "run top to bottom once"
    assert _images(notebook) >= 1, "no figure among the outputs"
    assert not _errors(notebook)
    for output in _outputs(notebook):
        text = output.get("text", "") + "".join(
            v for k, v in output.get("data", {}).items() if k.startswith("text/") and isinstance(v, str)
        )
        assert not LOCAL_PATH.search(text), f"an output shows a local path: {text[:200]!r}"


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path: Path, tmp_path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    temp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    temp.mkdir()
    cwd.mkdir()
    client = NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    # The notebooks work in tempfile.mkdtemp() folders, as a user's would; here TMPDIR is a folder of its own,
    # so the test sees what a run leaves there. TORCHINDUCTOR_CACHE_DIR: importing peft makes torch create its
    # (empty, shared, persistent) inductor cache folder under TMPDIR; that folder is torch's, not the notebook's.
    env = {**os.environ, "TMPDIR": str(temp), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "torchinductor")}
    client.execute(env=env)
    assert not _errors(notebook)
    assert _images(notebook) >= 1, "the executed notebook drew no figure"
    assert sorted(p.relative_to(temp).as_posix() for p in temp.rglob("*")) == [], "left behind in the temp folder"
