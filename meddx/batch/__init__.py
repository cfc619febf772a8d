"""Batch diagnosis as a package (``from meddx.batch import diagnose, DiagnoseResult``):

* ``run``: :func:`diagnose`, the entry point (checks, plan, engine, writers, assembly, ``run.json``);
* ``run_folder``: the run folder (plan, lock, resume, each finished chunk's part files written by
  :class:`~meddx.batch.run_folder.ChunkWriter` as the stream arrives, assembling the final files);
* ``options``: the settings as small typed objects (:class:`RayOptions`, chunk and ingest settings);
* ``predict``: one ready chunk -> typed predictions; :func:`predict_cohort` for a whole cohort;
* ``engines``: the local and Ray engines, each a plan -> a stream of finished chunks.

The names are imported on first use, so importing the package (as the CLI does) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meddx.batch.options import RayOptions
    from meddx.batch.predict import predict_cohort
    from meddx.batch.run import DiagnoseResult, diagnose

_LAZY = {
    "diagnose": "meddx.batch.run",
    "DiagnoseResult": "meddx.batch.run",
    "RayOptions": "meddx.batch.options",
    "predict_cohort": "meddx.batch.predict",
}

__all__ = ["DiagnoseResult", "RayOptions", "diagnose", "predict_cohort"]


def __getattr__(name: str) -> Any:
    import importlib

    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'meddx.batch' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
