"""One task's prediction for one patient at one index time: what the model produces and every
writer (the predictions table, FHIR RiskAssessments, DICOM SRs) consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

TaskKind = Literal["binary", "multiclass"]


@dataclass(frozen=True)
class TaskPrediction:
    """A diagnosed (``ok``) prediction of one task.

    Attributes:
        patient_id, index_time: the manifest row's identity (``index_time`` as ISO 8601, ``Z`` for UTC).
        task, kind, classes: the task (a binary task's classes are ``("0", "1")``).
        row: the manifest row (1-based; -1 when unknown).
        probabilities: calibrated probability per class (binary: ``(1 - p, p)``).
        raw_probabilities: uncalibrated probability per class, likewise.
        prediction: the predicted class.
        prediction_set: the conformal set's classes, or None when the task has no conformal sets.
        modalities: the modalities the prediction used, in the order of ``meddx.records.MODALITIES``.
        contributions: modality -> the logit change when it is withheld (present modalities only).
        ablations: modality -> calibrated probability per class with it withheld (binary: ``(1 - p, p)``).
        modality_errors: modalities named by the manifest that failed to ingest; None when not known.
        ood_scores: space (a modality, or ``summary``: the heads' input) -> its out-of-distribution
            score over its threshold (above 1: flagged); empty when the model has no OOD scores.
        ood: the fused OOD score over its threshold (above 1: the row looks unlike the training rows),
            or None when the model has no OOD scores.
        abstain: the row was flagged and the run abstains on flagged rows (``status=abstain``; the
            prediction is still written).
        ood_inputs: the acquisition facts of the row beyond the training rows' range
            (``modality.fact``, e.g. ``imaging.slice_spacing_mm``; :mod:`meddx.models.input_ranges`).

    Example:
        >>> p = TaskPrediction("P1", "2024-03-05T14:00:00Z", "disease", "binary", ("0", "1"), 3,
        ...                    (0.2, 0.8), (0.3, 0.7), "1", ("1",), ("imaging", "ehr"))
        >>> p.probability, p.raw_probability, p.is_binary
        (0.8, 0.7, True)
    """

    patient_id: str
    index_time: str
    task: str
    kind: TaskKind
    classes: tuple[str, ...]
    row: int
    probabilities: tuple[float, ...]
    raw_probabilities: tuple[float, ...]
    prediction: str
    prediction_set: tuple[str, ...] | None = None
    modalities: tuple[str, ...] = ()
    contributions: dict[str, float] = field(default_factory=dict)
    ablations: dict[str, tuple[float, ...]] = field(default_factory=dict)
    modality_errors: tuple[str, ...] | None = None
    ood_scores: dict[str, float] = field(default_factory=dict)
    ood: float | None = None
    abstain: bool = False
    ood_inputs: tuple[str, ...] = ()

    @property
    def is_binary(self) -> bool:
        return self.kind == "binary"

    @property
    def flagged(self) -> tuple[str, ...]:
        """The spaces (modalities, ``summary``) whose OOD score is above its threshold."""
        return tuple(s for s, v in self.ood_scores.items() if v > 1)

    @property
    def probability(self) -> float:
        """The calibrated probability of the positive class (binary) or of the predicted class."""
        return self.probabilities[self._index]

    @property
    def raw_probability(self) -> float:
        """The uncalibrated probability, as :attr:`probability`."""
        return self.raw_probabilities[self._index]

    @property
    def _index(self) -> int:
        return 1 if self.is_binary else self.classes.index(self.prediction)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (floats keep every bit through ``json``); :meth:`from_json` reads it back."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskPrediction:
        def tuple_or_none(value: Any) -> tuple | None:
            return None if value is None else tuple(value)

        return cls(
            **{
                **data,
                "classes": tuple(data["classes"]),
                "probabilities": tuple(data["probabilities"]),
                "raw_probabilities": tuple(data["raw_probabilities"]),
                "prediction_set": tuple_or_none(data["prediction_set"]),
                "modalities": tuple(data["modalities"]),
                "ablations": {m: tuple(v) for m, v in data["ablations"].items()},
                "modality_errors": tuple_or_none(data["modality_errors"]),
                "ood_inputs": tuple(data.get("ood_inputs", ())),
            }
        )
