"""JSON Schemas of meddx's file contracts, exported from the pydantic models.

``python -m meddx.schemas schemas`` rewrites the files in ``schemas/``; a test fails
when the committed files drift from the code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from meddx.cohort import ManifestRow
from meddx.config import IngestConfig
from meddx.models.checkpoint import BackboneCheckpoint
from meddx.models.config import BackboneConfig
from meddx.pipelines import Pipeline

_PROBABILITY_CELL: JsonDict = {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "null"}]}


class PredictionRow(BaseModel):
    """One row of ``predictions.parquet`` / ``predictions.csv``: a patient, an index time, a task.

    Binary tasks use ``probability``/``raw_probability`` (of class 1) and the classes ``0``/``1``.
    Multiclass tasks also carry ``probability:<class>`` and ``raw_probability:<class>`` for every
    class (each row sums to 1); their ``probability`` is that of the predicted class. Optional
    ``ablation:<modality>`` (binary) or ``ablation:<modality>:<class>`` (multiclass) hold the
    calibrated probabilities with that modality withheld, empty where it was absent. Extra
    manifest columns (``sex``, ``site``...) are copied after these.
    """

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "patternProperties": {
                "^probability:.+$": {**_PROBABILITY_CELL, "description": "calibrated probability of class <class>"},
                "^raw_probability:.+$": {
                    **_PROBABILITY_CELL,
                    "description": "uncalibrated probability of class <class>",
                },
                "^ablation:.+$": {
                    **_PROBABILITY_CELL,
                    "description": "calibrated probability (binary: of class 1; "
                    "multiclass ablation:<modality>:<class>: of <class>) with <modality> withheld; "
                    "empty where it was absent",
                },
                "^contribution:.+$": {
                    "anyOf": [{"type": "number"}, {"type": "null"}],
                    "description": "change of the task's logit when that present modality is withheld",
                },
            }
        },
    )

    patient_id: str
    index_time: AwareDatetime
    task: str
    probability: float | None = Field(
        None,
        ge=0,
        le=1,
        description="calibrated probability: of class 1 (binary) or of the predicted class (multiclass)",
    )
    raw_probability: float | None = Field(
        None, ge=0, le=1, description="uncalibrated model probability, same class as `probability`"
    )
    prediction: str | None = Field(None, description="predicted class (0/1 for binary tasks)")
    prediction_set: str | None = Field(
        None,
        description="conformal set at the model's alpha: class names '|'-joined ('0', '1', '0|1' for binary); "
        "empty = the empty set, or no set when every row of the task is empty",
    )
    modalities: str = Field("", description="modalities used, '|'-joined")
    modality_errors: str = Field("", description="modalities that failed to ingest, '|'-joined")
    ood: float | None = Field(
        None,
        ge=0,
        description="the row's fused out-of-distribution score over its threshold (above 1: flagged; "
        "ood:<modality> columns: each modality's); absent when the model has no OOD scores",
    )
    ood_inputs: str = Field(
        "",
        description="acquisition facts beyond the training rows' range ('modality.fact', '|'-joined, e.g. "
        "imaging.slice_spacing_mm); absent when none is",
    )
    status: Literal["ok", "error", "abstain"] = Field(
        description="ok; error: not diagnosed; abstain: flagged out of distribution, its prediction still written"
    )


SCHEMAS: dict[str, type[BaseModel]] = {
    "manifest_row.schema.json": ManifestRow,
    "prediction_row.schema.json": PredictionRow,
    "ingest_config.schema.json": IngestConfig,
    "backbone_config.schema.json": BackboneConfig,
    "backbone_checkpoint.schema.json": BackboneCheckpoint,  # config.json of a save_pretrained folder
    "pipeline.schema.json": Pipeline,  # pipelines/*.yaml, run by `meddx run`
}


def schema_documents() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema document, as exported."""
    docs = {}
    for name, model in SCHEMAS.items():
        doc = {"$schema": "https://json-schema.org/draft/2020-12/schema", **model.model_json_schema()}
        docs[name] = doc
    return docs


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def export_schemas(folder: str | Path) -> list[Path]:
    """Write every schema into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, doc in schema_documents().items():
        path = folder / name
        path.write_text(render(doc))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in export_schemas(sys.argv[1] if len(sys.argv) > 1 else "schemas"):
        sys.stdout.write(f"wrote {path}\n")
