"""The committed JSON Schemas match the pydantic models they are exported from."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest

from meddx.schemas import render, schema_documents

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"


def test_committed_schemas_match_the_code() -> None:
    for name, doc in schema_documents().items():
        committed = SCHEMAS / name
        assert committed.is_file(), f"{committed} is missing; run `make schemas`"
        assert committed.read_text() == render(doc), f"{name} drifted from the code; run `make schemas`"


def test_manifest_schema_accepts_a_row_and_rejects_a_bad_split() -> None:
    schema = schema_documents()["manifest_row.schema.json"]
    row = {"patient_id": "p1", "index_time": "2024-03-05T14:00:00Z", "split": "train", "label:disease": 1, "sex": "F"}
    jsonschema.validate(row, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**row, "split": "holdout"}, schema)


def test_prediction_schema_checks_per_class_and_ablation_probabilities() -> None:
    schema = schema_documents()["prediction_row.schema.json"]
    row = {
        "patient_id": "p1",
        "index_time": "2024-03-05T14:00:00Z",
        "task": "stage",
        "status": "ok",
        "probability": 0.7,
        "prediction": "late",
        "prediction_set": "late|mid",
        "probability:late": 0.7,
        "probability:mid": 0.2,
        "probability:early": 0.1,
        "raw_probability:late": 0.9,
        "ablation:imaging:late": None,
        "contribution:imaging": -1.5,
        "sex": "F",
    }
    jsonschema.validate(row, schema)
    for column in ("probability:mid", "raw_probability:late", "ablation:imaging:late"):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**row, column: 1.5}, schema)
