"""Predicting: one ready chunk -> its typed predictions (what both engines run), and a whole cohort
in one call (:func:`predict_cohort`, a DataFrame of the predictions table)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meddx.batch.options import ChunkSettings
from meddx.predictions.types import TaskPrediction

if TYPE_CHECKING:
    import pandas as pd

    from meddx.cohort import Cohort
    from meddx.data import CohortDataset
    from meddx.models.diagnosis import DiagnosisModel
    from meddx.models.input_ranges import InputRanges
    from meddx.streaming import ReadyChunk


@dataclass
class ChunkOutput:
    """What an engine yields for each chunk it finished.

    Attributes:
        ready: the chunk after ingestion (its rows, outcomes and errors).
        predictions: the typed predictions of its diagnosed rows, in manifest order, then task order.
        seconds: ``ingest`` (in the workers) and ``model`` seconds spent on it.
        embeddings: OOD space -> ``(P, D)`` embeddings of its rows that have it (the batch shift
            test's sample; empty when the model has no OOD scores).
    """

    ready: ReadyChunk
    predictions: list[TaskPrediction]
    seconds: dict[str, float] = field(default_factory=dict)
    embeddings: dict[str, Any] = field(default_factory=dict)

    @property
    def number(self) -> int:
        return self.ready.number


def load_model(model_dir: Path, cache_root: Path, device: str) -> DiagnosisModel:
    """The model folder's network in eval mode on ``device`` (note embeddings cached under the cache root)."""
    from meddx.models.diagnosis import DiagnosisModel

    return DiagnosisModel.from_pretrained(model_dir, cache_dir=cache_root / "text-embeddings").eval().to(device)


def predict_chunk(
    model: DiagnosisModel,
    ready: ReadyChunk,
    store: Any,
    settings: ChunkSettings,
    embeddings: dict[str, list] | None = None,
) -> list[TaskPrediction]:
    """The typed predictions of one ready chunk's rows that have inputs (``store``: their tensors).

    Each prediction names the modalities of its row that failed to ingest; rows are in manifest
    order and each row's tasks in the model's order. A row above the model's fused OOD threshold
    is marked ``abstain`` when ``settings.abstain``. ``embeddings``, when given, gets each OOD
    space's embeddings appended (:meth:`~meddx.models.diagnosis.DiagnosisModel.task_predictions`).
    """
    from meddx.records import collate
    from meddx.streaming import store_items

    spec = model.aligner.tensor_spec()
    with_inputs = [r for r in ready.rows if r.key is not None]
    predictions: list[TaskPrediction] = []
    for start in range(0, len(with_inputs), settings.batch_size):
        batch = collate(store_items(store, with_inputs[start : start + settings.batch_size]), spec)
        predictions += model.task_predictions(
            batch.to(settings.device), contributions=settings.contributions, embeddings=embeddings
        )
    errors = {r.row.row: tuple(r.modality_errors) for r in ready.rows}
    order = {t: i for i, t in enumerate(model.tasks)}
    predictions.sort(key=lambda p: (p.row, order[p.task]))
    predictions = [dataclasses.replace(p, modality_errors=errors[p.row]) for p in predictions]
    ranges = model.ood.input_ranges if model.ood is not None else None
    if ranges is not None:
        predictions = check_acquisition(predictions, {r.row.row: r.facts for r in ready.rows}, ranges)
    return mark_abstained(predictions, settings.abstain)


def check_acquisition(
    predictions: list[TaskPrediction], facts: dict[int, dict[str, dict[str, Any]]], ranges: InputRanges
) -> list[TaskPrediction]:
    """Each prediction with its row's acquisition checked against the training rows' ranges.

    A modality's ``ood:<modality>`` becomes the larger of its embedding score and its acquisition
    ratio, the fused ``ood`` the larger of itself and every acquisition ratio (above 1: flagged),
    and ``ood_inputs`` names the facts beyond their range (:mod:`meddx.models.input_ranges`).
    """
    checked = []
    for p in predictions:
        ratios, beyond = ranges.check(facts.get(p.row, {}))
        scores = dict(p.ood_scores)
        for modality, ratio in ratios.items():
            scores[modality] = max(scores.get(modality, 0.0), ratio)
        fused = max([p.ood if p.ood is not None else 0.0, *ratios.values()])
        checked.append(dataclasses.replace(p, ood_scores=scores, ood=fused, ood_inputs=beyond))
    return checked


def mark_abstained(predictions: list[TaskPrediction], abstain: bool) -> list[TaskPrediction]:
    """With ``abstain``, each prediction whose row's fused OOD score is over its threshold marked ``abstain``."""
    return [dataclasses.replace(p, abstain=abstain and p.ood is not None and p.ood > 1) for p in predictions]


def predict_cohort(
    model: DiagnosisModel,
    data: Cohort | str | Path | CohortDataset,
    *,
    split: str | None = None,
    batch_size: int = 64,
    contributions: bool = True,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = False,
    device: str = "cpu",
    abstain: bool = True,
) -> pd.DataFrame:
    """One row per (patient, index time, task), with the columns of the predictions contract.

    Args:
        model: a fine-tuned :class:`~meddx.models.diagnosis.DiagnosisModel`.
        data: a cohort, a manifest path (ingested with the model's tensorizers) or a dataset.
        split: only rows of this split (``test``, ...); None = every row.
        batch_size: patients per forward pass.
        contributions: add ``contribution:<modality>`` and ``ablation:<modality>`` columns
            (one more fusion pass per modality).
        cache_dir, workers, progress: for ingesting a cohort.
        device: where the model runs.
        abstain: mark rows above the model's fused OOD threshold ``status = abstain`` (their
            predictions kept), as ``diagnose`` does; a model without OOD scorers marks none.

    Example:
        >>> frame = predict_cohort(DiagnosisModel.from_pretrained("runs/model"), "cohort.csv")  # doctest: +SKIP
    """
    from torch.utils.data import DataLoader

    from meddx.data import CohortDataset, prepare_cohort
    from meddx.predictions.columns import ROW
    from meddx.predictions.table import prediction_frame

    if isinstance(data, CohortDataset):
        dataset = data
    else:
        prepared = prepare_cohort(data, cache_dir=cache_dir, aligner=model.aligner, workers=workers, progress=progress)
        dataset = prepared.dataset(split=split)
    model.eval().to(device)
    predictions: list[TaskPrediction] = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate):
        predictions += model.task_predictions(batch.to(device), contributions=contributions)
    ranges = model.ood.input_ranges if model.ood is not None else None
    if ranges is not None:
        predictions = check_acquisition(predictions, dataset.acquisition_facts(), ranges)
    frame = prediction_frame(mark_abstained(predictions, abstain))
    if len(frame):
        # the manifest's own columns ride along (sex, site...)
        table = dataset.table().drop(columns=["patient_id", "index_time", "split", "modalities"], errors="ignore")
        table = table.drop(columns=[c for c in table.columns if c.startswith("label:")])
        frame = frame.merge(table, left_on=ROW, right_on="row", how="left").drop(columns=["row"])
    return frame.drop(columns=[ROW], errors="ignore")
