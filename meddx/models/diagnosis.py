"""``DiagnosisModel``: the backbone, one head per task, and each task's calibrators, as one folder.

It lives apart from :mod:`meddx.models.heads` because it also owns persistence and
prediction tables; the heads stay a page long.

The model folder (Hugging Face style): ``config.json`` (the backbone's config, the fitted
tensorizers, the tasks, the adapter if any), ``model.safetensors`` (backbone and heads
weights; with LoRA, the untouched base weights), ``adapter.safetensors`` (LoRA weights, only in
``lora`` mode), ``calibration.json`` (per task: temperature or isotonic map and conformal
thresholds, with the rows they were fitted on) and ``metrics.json`` (validation figures).

**What drove each result.** ``contribution:<modality>`` is the task's logit minus its logit
with that modality withheld (binary: the positive class's logit; multiclass: the predicted
class's). It says how much that input moved *this* prediction given the others; it is not a
causal effect, does not add up to the logit, and two modalities that say the same thing can
each look unimportant because the other stands in for it.

Example:
    >>> model = DiagnosisModel.from_pretrained("runs/model")  # doctest: +SKIP
    >>> predictions = model.predict("cohort/manifest.csv")  # a pandas DataFrame  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
from torch import nn

from meddx import __version__
from meddx.cohort import Cohort, TaskSpec
from meddx.errors import ConfigError, ModelError
from meddx.models.heads import DiagnosisHeads
from meddx.records import MODALITIES, Modality, PatientBatch

if TYPE_CHECKING:
    import pandas as pd

    from meddx.calibration import ConformalClassifier, IsotonicCalibrator, TemperatureScaler
    from meddx.data import CohortDataset
    from meddx.models.backbone import FoundationBackbone

logger = logging.getLogger(__name__)

FORMAT = "meddx.diagnosis-model/1"
CALIBRATION_FILE = "calibration.json"
METRICS_FILE = "metrics.json"
ADAPTER_FILE = "adapter.safetensors"


def probabilities_from_logits(logits: np.ndarray, kind: str) -> np.ndarray:
    """Uncalibrated probabilities: sigmoid (binary, ``(N,)``) or softmax (multiclass, ``(N, C)``)."""
    if kind == "binary":
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class DiagnosisModel(nn.Module):
    """Backbone + heads + calibrators. Build it with :func:`meddx.finetune` or load a saved one.

    Args:
        backbone: the :class:`~meddx.models.backbone.FoundationBackbone`.
        tasks: task name -> :class:`~meddx.cohort.TaskSpec`.
        head_dropout: dropout inside each head.

    Attributes:
        calibrators: task -> fitted temperature scaler or isotonic calibrator (empty until calibrated).
        conformal: task -> fitted :class:`~meddx.calibration.ConformalClassifier`.
        metrics: validation figures written to ``metrics.json``.
        training_info: how it was fine-tuned (mode, epochs, rows), kept in ``config.json``.
    """

    def __init__(self, backbone: "FoundationBackbone", tasks: Mapping[str, TaskSpec], head_dropout: float = 0.1):
        super().__init__()
        if not tasks:
            raise ConfigError("a DiagnosisModel needs at least one task (a label:<task> column in the manifest)")
        self.backbone = backbone
        self.tasks = dict(tasks)
        self.head_dropout = head_dropout
        self.heads = DiagnosisHeads(backbone.config.d_model, self.tasks, head_dropout)
        self.calibrators: dict[str, TemperatureScaler | IsotonicCalibrator] = {}
        self.conformal: dict[str, ConformalClassifier] = {}
        self.metrics: dict[str, Any] = {}
        self.training_info: dict[str, Any] = {}
        self.adapter: dict[str, Any] | None = None  # the LoRA config when adapters were added

    # ------------------------------------------------------------------ forward

    def forward(self, batch: PatientBatch, withhold: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Logits per task; ``withhold`` (bool ``(B, M)``) hides modalities from the backbone."""
        return self.heads(self.backbone(batch, withhold=withhold).pooled)

    @torch.no_grad()
    def batch_logits(self, batch: PatientBatch, ablations: bool = True) -> tuple[dict, dict]:
        """Logits of a batch, and per modality the logits with that modality withheld.

        Returns:
            ``(logits, withheld)``: task -> ``(B,)``/``(B, C)`` arrays, and modality -> task -> the
            same with that modality withheld (rows that lacked it are unchanged).
        """
        logits = {t: v.float().cpu().numpy() for t, v in self(batch).items()}
        withheld: dict[Modality, dict[str, np.ndarray]] = {}
        if ablations:
            for j, modality in enumerate(MODALITIES):
                if not batch.present[:, j].any():
                    continue
                hide = torch.zeros_like(batch.present)
                hide[:, j] = batch.present[:, j]
                withheld[modality] = {t: v.float().cpu().numpy() for t, v in self(batch, withhold=hide).items()}
        return logits, withheld

    # ------------------------------------------------------------- calibration

    def calibrated(self, task: str, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of a task from its logits (uncalibrated when not fitted)."""
        calibrator = self.calibrators.get(task)
        if calibrator is None:
            return probabilities_from_logits(logits, self.tasks[task].kind)
        return calibrator.transform(logits)

    # --------------------------------------------------------------- predicting

    def predict(
        self,
        data: "Cohort | str | Path | CohortDataset",
        *,
        split: str | None = None,
        batch_size: int = 64,
        contributions: bool = True,
        cache_dir: str | Path | None = None,
        workers: int | None = None,
        progress: bool = False,
        device: str = "cpu",
    ) -> "pd.DataFrame":
        """One row per (patient, index time, task), with the columns of the predictions contract.

        Args:
            data: a cohort, a manifest path (ingested with this model's tensorizers) or a dataset.
            split: only rows of this split (``test``, ...); None = every row.
            batch_size: patients per forward pass.
            contributions: add ``contribution:<modality>`` and ``ablation:<modality>`` columns
                (one more forward pass per modality).
            cache_dir, workers, progress: for ingesting a cohort.
            device: where the model runs.
        """
        from meddx.prediction_table import prediction_frame

        dataset = self._dataset(data, split, cache_dir, workers, progress)
        return prediction_frame(self, dataset, batch_size=batch_size, contributions=contributions, device=device)

    def _dataset(self, data, split, cache_dir, workers, progress) -> "CohortDataset":
        from meddx.data import CohortDataset, prepare_cohort

        if isinstance(data, CohortDataset):
            return data
        prepared = prepare_cohort(
            data, cache_dir=cache_dir, aligner=self.backbone.aligner, workers=workers, progress=progress
        )
        return prepared.dataset(split=split)

    # -------------------------------------------------------------- persistence

    def config_dict(self) -> dict[str, Any]:
        """What ``config.json`` holds: the backbone's config plus the diagnosis part."""
        config = self.backbone.config_dict()
        config["diagnosis"] = {
            "format": FORMAT,
            "meddx": __version__,
            "tasks": {name: {"kind": t.kind, "classes": list(t.classes)} for name, t in self.tasks.items()},
            "head_dropout": self.head_dropout,
            "adapter": self.adapter,
            "training": self.training_info,
        }
        return config

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the model folder (see the module docstring); returns it."""
        from meddx.checkpoint import atomic_save_tensors, atomic_write_text
        from meddx.models.adapters import split_adapter_weights

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        base, adapter = split_adapter_weights(self)
        atomic_save_tensors(base, folder / "model.safetensors", metadata={"format": "pt"})
        if adapter:
            atomic_save_tensors(adapter, folder / ADAPTER_FILE, metadata={"format": "pt"})
        elif (folder / ADAPTER_FILE).exists():
            (folder / ADAPTER_FILE).unlink()
        atomic_write_text(json.dumps(self.config_dict(), indent=2, sort_keys=True), folder / "config.json")
        calibration = {
            task: {
                "calibrator": self.calibrators[task].to_dict() if task in self.calibrators else None,
                "conformal": self.conformal[task].to_dict() if task in self.conformal else None,
            }
            for task in self.tasks
        }
        atomic_write_text(json.dumps(calibration, indent=2, sort_keys=True), folder / CALIBRATION_FILE)
        atomic_write_text(json.dumps(self.metrics, indent=2, sort_keys=True), folder / METRICS_FILE)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "DiagnosisModel":
        """Load a folder written by :meth:`save_pretrained`.

        Raises:
            ModelError: a missing or foreign file, a pickle checkpoint, an unknown format.
        """
        from meddx.calibration import ConformalClassifier, calibrator_from_dict
        from meddx.models.adapters import add_lora, to_model_keys
        from meddx.models.backbone import FoundationBackbone

        folder = Path(folder)
        config = FoundationBackbone.read_config(folder)
        diagnosis = config.get("diagnosis")
        if not isinstance(diagnosis, dict):
            raise ModelError(
                f"{folder} holds a backbone without diagnostic heads; fine-tune it first "
                "(meddx finetune MANIFEST --backbone FOLDER) or load it with FoundationBackbone.from_pretrained"
            )
        if diagnosis.get("format") != FORMAT:
            raise ModelError(
                f"{folder}/config.json is a diagnosis model of format {diagnosis.get('format')!r}; this meddx "
                f"({__version__}) reads {FORMAT!r}: upgrade meddx or re-train the model"
            )
        tasks = {
            name: TaskSpec(name, spec["kind"], tuple(spec["classes"])) for name, spec in diagnosis["tasks"].items()
        }
        backbone = FoundationBackbone.from_config_dict(config)
        model = cls(backbone, tasks, head_dropout=diagnosis.get("head_dropout", 0.1))
        if diagnosis.get("adapter"):
            add_lora(model, diagnosis["adapter"])
        weights = FoundationBackbone.read_weights(folder / "model.safetensors")
        if diagnosis.get("adapter"):
            weights.update(FoundationBackbone.read_weights(folder / ADAPTER_FILE))
        missing, unexpected = model.load_state_dict(to_model_keys(weights, model), strict=False)
        missing = [k for k in missing if not backbone.is_external_weight(k.removeprefix("backbone."))]
        if missing or unexpected:
            raise ModelError(
                f"{folder}/model.safetensors does not match its config.json (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); the folder was changed by hand or written by another model"
            )
        model.training_info = diagnosis.get("training", {})
        calibration_path = folder / CALIBRATION_FILE
        if calibration_path.is_file():
            calibration = json.loads(calibration_path.read_text())
            for task, parts in calibration.items():
                if parts.get("calibrator"):
                    model.calibrators[task] = calibrator_from_dict(parts["calibrator"])
                if parts.get("conformal"):
                    model.conformal[task] = ConformalClassifier.from_dict(parts["conformal"])
        metrics_path = folder / METRICS_FILE
        if metrics_path.is_file():
            model.metrics = json.loads(metrics_path.read_text())
        model.eval()
        return model
