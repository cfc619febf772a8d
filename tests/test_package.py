"""The package as a whole: public names, a cheap import, one unfitted error, modules split along interfaces."""

from __future__ import annotations

import ast
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

import meddx
from meddx.align import Aligner
from meddx.errors import ModelError, NotFittedError
from meddx.ingest.base import Tensorizer
from meddx.ingest.registry import registered_ingestors
from meddx.records import ModalityRecord, PatientRecord

ROOT = Path(__file__).resolve().parents[1]
INDEX = datetime(2024, 3, 5, 14, tzinfo=timezone.utc)


def test_import_meddx_is_cheap_and_every_public_name_resolves() -> None:
    code = (
        "import sys, meddx\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'pandas', 'pydantic', 'monai'})\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    assert len(meddx.__all__) == len(set(meddx.__all__))
    for name in meddx.__all__:
        assert getattr(meddx, name) is not None, name
    assert meddx.load_cohort.__module__ == "meddx.cohort"
    assert meddx.ingest_cohort.__module__ == "meddx.ingest.runner"
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        meddx.nothing_here  # noqa: B018


def fitted_tensorizers() -> list[Tensorizer]:
    """One new tensorizer of every registered reader whose tensorizer learns from data."""
    tensorizers = [cls().tensorizer() for cls in registered_ingestors().values()]
    return [t for t in tensorizers if type(t).fit is not Tensorizer.fit]


def test_every_unfitted_tensorizer_and_the_aligner_raise_one_error_type() -> None:
    learners = fitted_tensorizers()
    assert {type(t).__name__ for t in learners} >= {"EhrTensorizer", "DeviceLogTensorizer"}
    for tensorizer in learners:
        record = ModalityRecord(modality=tensorizer.modality, source="x", meta={"index_time": INDEX.isoformat()})
        with pytest.raises(NotFittedError, match="not fitted"):
            tensorizer.transform(record)
    with pytest.raises(NotFittedError, match="not fitted"):
        Aligner().transform(PatientRecord("p1", INDEX))
    assert issubclass(NotFittedError, ModelError)  # callers catching ModelError keep working


def test_no_module_imports_another_modules_private_names() -> None:
    found = []
    for path in sorted((ROOT / "meddx").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("meddx"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.module} {private}")
    assert not found, "make these public in the module that owns them:\n" + "\n".join(found)


def test_all_lists_every_lazy_name() -> None:
    from meddx import _LAZY

    assert set(_LAZY) <= set(meddx.__all__)
