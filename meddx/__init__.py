"""meddx: multimodal medical diagnosis on a foundation model.

The public names are importable from the package itself. ``import meddx`` stays cheap:
only the error types load with it; every other name loads its module on first use
(NumPy, pandas, pydantic and, where needed, torch come in then, not at import).

Example:
    >>> import meddx
    >>> cohort = meddx.load_cohort("sample_data/manifest.csv")
    >>> len(cohort), sorted(cohort.tasks)
    (60, ['disease'])
    >>> report = meddx.ingest_cohort(cohort, "runs/cache", out_dir="runs/ingest-1")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from meddx._version import __version__
from meddx.errors import (
    ConfigError,
    IngestError,
    LeakageError,
    ManifestError,
    ManifestProblem,
    MeddxError,
    ModelError,
    NotFittedError,
)

# public name -> the module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    **dict.fromkeys(("Cohort", "CohortRow", "TaskSpec", "load_cohort"), "meddx.cohort"),
    **dict.fromkeys(("IngestConfig",), "meddx.config"),
    **dict.fromkeys(
        (
            "MODALITIES",
            "Event",
            "Modality",
            "ModalityRecord",
            "PatientBatch",
            "PatientRecord",
            "PatientTensors",
            "collate",
            "is_available",
            "keep_available",
            "parse_time",
        ),
        "meddx.records",
    ),
    **dict.fromkeys(("Aligner",), "meddx.align"),
    **dict.fromkeys(("RecordCache",), "meddx.cache"),
    **dict.fromkeys(
        (
            "IngestRequest",
            "Ingestor",
            "Tensorizer",
            "register_ingestor",
            "registered_ingestors",
            "unregister_ingestor",
        ),
        "meddx.ingest",
    ),
    **dict.fromkeys(("IngestReport", "ingest_cohort"), "meddx.ingest.runner"),
    **dict.fromkeys(("generate_cohort",), "meddx.synth"),
    **dict.fromkeys(("CohortDataset", "PreparedCohort", "prepare_cohort"), "meddx.data"),
    **dict.fromkeys(("BackboneConfig", "FoundationBackbone"), "meddx.models"),
    **dict.fromkeys(("DiagnosisModel",), "meddx.models.diagnosis"),
    **dict.fromkeys(("finetune",), "meddx.training"),
    **dict.fromkeys(("pretrain",), "meddx.training"),
    **dict.fromkeys(("DiagnoseResult", "diagnose"), "meddx.batch.run"),
    **dict.fromkeys(("predict_cohort",), "meddx.batch.predict"),
}

__all__ = [
    "__version__",
    "ConfigError",
    "IngestError",
    "LeakageError",
    "ManifestError",
    "ManifestProblem",
    "MeddxError",
    "ModelError",
    "NotFittedError",
    "Aligner",
    "Cohort",
    "CohortRow",
    "Event",
    "IngestConfig",
    "IngestReport",
    "IngestRequest",
    "Ingestor",
    "MODALITIES",
    "Modality",
    "ModalityRecord",
    "PatientBatch",
    "PatientRecord",
    "PatientTensors",
    "RecordCache",
    "TaskSpec",
    "Tensorizer",
    "collate",
    "generate_cohort",
    "ingest_cohort",
    "is_available",
    "keep_available",
    "load_cohort",
    "parse_time",
    "register_ingestor",
    "registered_ingestors",
    "unregister_ingestor",
    "BackboneConfig",
    "CohortDataset",
    "DiagnosisModel",
    "FoundationBackbone",
    "PreparedCohort",
    "finetune",
    "prepare_cohort",
    "pretrain",
    "DiagnoseResult",
    "diagnose",
    "predict_cohort",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'meddx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # static checkers see the real objects
    from meddx.align import Aligner
    from meddx.batch.predict import predict_cohort
    from meddx.batch.run import DiagnoseResult, diagnose
    from meddx.cache import RecordCache
    from meddx.cohort import Cohort, CohortRow, TaskSpec, load_cohort
    from meddx.config import IngestConfig
    from meddx.data import CohortDataset, PreparedCohort, prepare_cohort
    from meddx.ingest import (
        Ingestor,
        IngestRequest,
        Tensorizer,
        register_ingestor,
        registered_ingestors,
        unregister_ingestor,
    )
    from meddx.ingest.runner import IngestReport, ingest_cohort
    from meddx.models import BackboneConfig, FoundationBackbone
    from meddx.models.diagnosis import DiagnosisModel
    from meddx.records import (
        MODALITIES,
        Event,
        Modality,
        ModalityRecord,
        PatientBatch,
        PatientRecord,
        PatientTensors,
        collate,
        is_available,
        keep_available,
        parse_time,
    )
    from meddx.synth import generate_cohort
    from meddx.training import finetune, pretrain
