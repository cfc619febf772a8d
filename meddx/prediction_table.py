"""Turn a model's outputs on a dataset into the predictions table (one row per patient × task).

The columns are the predictions contract (README, ``schemas/prediction_row.schema.json``):
identity, calibrated and raw probability, prediction, conformal set, modalities used,
status, per-class probabilities for multiclass tasks, and per present modality its
contribution (logit change when withheld) and ablation probability (calibrated probability
when withheld).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from meddx.models.diagnosis import probabilities_from_logits
from meddx.records import MODALITIES, PatientBatch

if TYPE_CHECKING:
    import pandas as pd

    from meddx.data import CohortDataset
    from meddx.models.diagnosis import DiagnosisModel

SET_SEPARATOR = "|"


def _batches(dataset: CohortDataset, batch_size: int) -> Iterator[PatientBatch]:
    from torch.utils.data import DataLoader

    yield from DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate)


def _chosen(logits: np.ndarray, kind: str, predicted: np.ndarray) -> np.ndarray:
    """The logit a contribution is measured on: positive class (binary) or the predicted class."""
    return logits if kind == "binary" else logits[np.arange(len(logits)), predicted]


def task_rows(
    model: DiagnosisModel, batch: PatientBatch, logits: dict, withheld: dict, contributions: bool
) -> list[dict[str, Any]]:
    """Prediction rows of one batch, every task."""
    present = batch.present.cpu().numpy()  # (B, M)
    rows: list[dict[str, Any]] = []
    for task, spec in model.tasks.items():
        raw = logits[task]
        calibrated = model.calibrated(task, raw)
        uncalibrated = probabilities_from_logits(raw, spec.kind)
        if spec.kind == "binary":
            predicted = (calibrated >= 0.5).astype(int)
            class_probs = np.stack([1 - calibrated, calibrated], axis=1)
        else:
            predicted = calibrated.argmax(axis=1)
            class_probs = calibrated
        sets = None
        entry = model.calibration.get(task)
        if entry is not None and entry.conformal is not None:
            sets = entry.conformal.predict_set(class_probs if spec.kind != "binary" else calibrated, present)
        for i in range(len(batch)):
            row: dict[str, Any] = {
                "patient_id": batch.patient_ids[i],
                "index_time": batch.index_times[i].isoformat().replace("+00:00", "Z"),
                "task": task,
                "status": "ok",
                "modalities": SET_SEPARATOR.join(m.value for j, m in enumerate(MODALITIES) if present[i, j]),
                "prediction": spec.classes[predicted[i]],
                "_row": int(batch.rows[i]) if batch.rows is not None else -1,
            }
            if spec.kind == "binary":
                row["probability"] = float(calibrated[i])
                row["raw_probability"] = float(uncalibrated[i])
            else:
                row["probability"] = float(calibrated[i, predicted[i]])
                row["raw_probability"] = float(uncalibrated[i, predicted[i]])
                for c, name in enumerate(spec.classes):
                    row[f"probability:{name}"] = float(calibrated[i, c])
                    row[f"raw_probability:{name}"] = float(uncalibrated[i, c])
            if sets is not None:
                row["prediction_set"] = SET_SEPARATOR.join(name for c, name in enumerate(spec.classes) if sets[i, c])
            rows.append(row)
        if contributions:
            base = _chosen(raw, spec.kind, predicted)
            for modality, outputs in withheld.items():
                j = MODALITIES.index(modality)
                without = outputs[task]
                change = base - _chosen(without, spec.kind, predicted)
                ablated = model.calibrated(task, without)
                for i in range(len(batch)):
                    row = rows[len(rows) - len(batch) + i]
                    if not present[i, j]:
                        continue  # absent: nothing to withhold, the cells stay empty
                    row[f"contribution:{modality.value}"] = float(change[i])
                    if spec.kind == "binary":
                        row[f"ablation:{modality.value}"] = float(ablated[i])
                    else:
                        for c, name in enumerate(spec.classes):
                            row[f"ablation:{modality.value}:{name}"] = float(ablated[i, c])
    return rows


def prediction_frame(
    model: DiagnosisModel,
    dataset: CohortDataset,
    batch_size: int = 64,
    contributions: bool = True,
    device: str = "cpu",
) -> pd.DataFrame:
    """The predictions table of every row of ``dataset`` (model in eval mode)."""
    import pandas as pd

    model.eval().to(device)
    rows: list[dict[str, Any]] = []
    for batch in _batches(dataset, batch_size):
        logits, withheld = model.batch_logits(batch.to(device), ablations=contributions)
        rows += task_rows(model, batch, logits, withheld, contributions)
    frame = pd.DataFrame(rows)
    if len(frame):
        # the manifest's own columns ride along (sex, site...), and which modalities failed to ingest
        table = dataset.table().drop(columns=["patient_id", "index_time", "split", "modalities"], errors="ignore")
        table = table.drop(columns=[c for c in table.columns if c.startswith("label:")])
        frame = frame.merge(table, left_on="_row", right_on="row", how="left").drop(columns=["row"])
    return frame.drop(columns=["_row"], errors="ignore")
