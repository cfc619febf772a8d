"""Ingest workers stop when their parent dies, at any moment: while they start, import, or wait.

A pool's workers hold both ends of their task queue, so a dead parent never reads as the end of it:
a worker that misses its parent's death waits forever, holding its memory (over 1 GiB with torch).
Each test starts a real ingest run in a child process, kills it with SIGKILL at a chosen point of its
workers' start-up (marker files tell the test where they are), and waits for the workers to go.
The waits poll with a bound only a hang reaches; a worker still alive at the end is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, process_alive

HANG = 600.0  # seconds: only a hang takes this long (the workers stop within a few seconds)

# The parent: an ingest run with 2 workers. When the file "hold-bootstrap" exists, each worker, while it
# imports its parent's main module (the first thing a spawned process does, before any meddx code of its
# own runs: where it would import torch), leaves a marker and waits for "release".
PARENT = """
import os, sys, time
from pathlib import Path

MARKS = Path(os.environ["MEDDX_TEST_MARKS"])
if __name__ == "__mp_main__" and (MARKS / "hold-bootstrap").exists():
    (MARKS / f"boot-{os.getpid()}").touch()
    while not (MARKS / "release").exists():
        time.sleep(0.05)

if __name__ == "__main__":
    from meddx.cohort import load_cohort
    from meddx.ingest.runner import ingest_cohort

    ingest_cohort(load_cohort(sys.argv[1]), sys.argv[2], workers=2, progress=False, plugins=("slow_plugin",))
"""

# A plugin whose import never ends in a worker: the workers' initializer (which imports plugins) still runs.
PLUGIN = """
import multiprocessing, os, time
from pathlib import Path

if multiprocessing.parent_process() is not None:  # a worker (the parent imports plugins too)
    (Path(os.environ["MEDDX_TEST_MARKS"]) / f"init-{os.getpid()}").touch()
    while True:
        time.sleep(0.05)
"""


def wait_for(condition: Callable[[], bool], what: str, parent: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + HANG
    while not condition():
        if parent is not None and parent.poll() is not None:
            pytest.fail(f"the ingest run ended before {what}: {parent.stdout.read().decode() if parent.stdout else ''}")
        assert time.monotonic() < deadline, f"no {what} after {HANG:g} s: something hangs"
        time.sleep(0.05)


def marked(marks: Path, prefix: str) -> list[int]:
    return sorted(int(p.name.split("-", 1)[1]) for p in marks.glob(f"{prefix}-*"))


@pytest.fixture
def ingest_run(tmp_path: Path) -> Iterator[Callable[[], tuple[subprocess.Popen, Path]]]:
    """Start the parent ingest run; every worker it left is killed afterwards, whatever happened."""
    marks, code = tmp_path / "marks", tmp_path / "code"
    marks.mkdir()
    code.mkdir()
    (code / "parent.py").write_text(PARENT)
    (code / "slow_plugin.py").write_text(PLUGIN)
    rows = ["patient_id,index_time,audio"]
    for i in range(2):  # a task for each worker
        (tmp_path / f"p{i}.txt").write_text("ok")
        rows.append(f"p{i},2024-03-05T14:00:00Z,p{i}.txt")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    env = {
        **os.environ,
        "MEDDX_TEST_MARKS": str(marks),
        "PYTHONPATH": os.pathsep.join([str(REPO), str(code), os.environ.get("PYTHONPATH", "")]),
    }
    started: list[subprocess.Popen] = []

    def start() -> tuple[subprocess.Popen, Path]:
        args = [sys.executable, str(code / "parent.py"), str(tmp_path / "manifest.csv"), str(tmp_path / "cache")]
        started.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path))
        return started[-1], marks

    yield start
    for process in started:
        process.kill()
        process.wait()
    for pid in marked(marks, "boot") + marked(marks, "init"):
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)


def kill(parent: subprocess.Popen) -> None:
    parent.send_signal(signal.SIGKILL)
    parent.wait()


def test_workers_stop_when_the_parent_dies_while_they_import_plugins(ingest_run) -> None:
    parent, marks = ingest_run()
    wait_for(lambda: len(marked(marks, "init")) == 2, "two workers in their initializer", parent)
    workers = marked(marks, "init")
    kill(parent)
    wait_for(lambda: not any(process_alive(pid) for pid in workers), "end of the orphaned workers")


def test_workers_stop_when_the_parent_dies_before_they_run_any_meddx_code(ingest_run, tmp_path: Path) -> None:
    """The case a worker-side ``os.getppid()`` misses: the parent is gone before the worker could ask."""
    (tmp_path / "marks" / "hold-bootstrap").touch()
    parent, marks = ingest_run()
    wait_for(lambda: len(marked(marks, "boot")) == 2, "two workers starting", parent)
    workers = marked(marks, "boot")
    kill(parent)
    (marks / "release").touch()  # the workers finish starting, orphans already
    wait_for(lambda: not any(process_alive(pid) for pid in workers), "end of the orphaned workers")
    assert marked(marks, "init") == []  # they stopped before their initializer imported a plugin
