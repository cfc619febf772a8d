"""``DiagnosisModel``: the backbone, one head per task, and each task's calibrators, as one folder.

It lives apart from :mod:`meddx.models.heads` because it also owns persistence and turns
logits into typed predictions (:class:`~meddx.predictions.types.TaskPrediction`); the heads
stay a page long. Predicting a whole cohort is :func:`meddx.batch.predict_cohort`.

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
    >>> predictions = model.task_predictions(batch)  # one TaskPrediction per (row, task)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from meddx._version import __version__
from meddx.cohort import TaskSpec
from meddx.errors import ConfigError, ModelError
from meddx.models.folder import ADAPTER_FILE, METRICS_FILE, check_model_folder
from meddx.models.folder import DIAGNOSIS_FORMAT as FORMAT
from meddx.models.heads import DiagnosisHeads
from meddx.predictions.types import TaskPrediction
from meddx.records import MODALITIES, Modality, PatientBatch

if TYPE_CHECKING:
    from meddx.calibration import TaskCalibration
    from meddx.models.backbone import BackboneOutput, EncodedBatch, FoundationBackbone
    from meddx.models.ood import OodModel

logger = logging.getLogger(__name__)

HEAD_INPUTS: tuple[str, ...] = ("summary", "summary+modalities")


def probabilities_from_logits(logits: np.ndarray, kind: str) -> np.ndarray:
    """Uncalibrated probabilities: sigmoid (binary, ``(N,)``) or softmax (multiclass, ``(N, C)``)."""
    if kind == "binary":
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _per_class(probabilities: np.ndarray, kind: str) -> np.ndarray:
    """``(N, C)`` probabilities: a binary task's ``(N,)`` positive-class ones as ``(1 - p, p)``."""
    return np.stack([1 - probabilities, probabilities], axis=1) if kind == "binary" else probabilities


def _chosen(logits: np.ndarray, kind: str, predicted: np.ndarray) -> np.ndarray:
    """The logit a contribution is measured on: positive class (binary) or the predicted class."""
    return logits if kind == "binary" else logits[np.arange(len(logits)), predicted]


def head_features(out: BackboneOutput, head_input: str = "summary") -> torch.Tensor:
    """The heads' input from a backbone output: the summary token, or it and the mean modality embedding.

    Example:
        >>> head_features(backbone(batch), "summary+modalities").shape  # doctest: +SKIP
        torch.Size([8, 128])
    """
    if head_input == "summary":
        return out.pooled  # (B, D)
    used = out.modality_mask.unsqueeze(-1).to(out.modality_embeddings.dtype)  # (B, M, 1)
    mean = (out.modality_embeddings * used).sum(dim=1) / used.sum(dim=1).clamp_min(1.0)  # (B, D)
    return torch.cat([out.pooled, mean], dim=-1)  # (B, 2D)


class DiagnosisModel(nn.Module):
    """Backbone + heads + calibrators. Build it with :func:`meddx.finetune` or load a saved one.

    Args:
        backbone: the :class:`~meddx.models.backbone.FoundationBackbone`.
        tasks: task name -> :class:`~meddx.cohort.TaskSpec`.
        head_dropout: dropout inside each head.
        head_input: what the heads read: ``summary`` (the fused summary token, ``(B, D)``) or
            ``summary+modalities`` (it and the mean of the used modalities' fused embeddings,
            ``(B, 2D)``: every encoder then also gets a direct gradient from the heads).

    Attributes:
        calibration: task -> :class:`~meddx.calibration.TaskCalibration` (calibrator and conformal
            sets, fitted on validation rows); empty until calibrated.
        metrics: validation figures written to ``metrics.json``.
        training_info: how it was fine-tuned (mode, epochs, rows), kept in ``config.json``.
        adapter: the LoRA settings when adapters were added (``lora`` mode), else None.
    """

    def __init__(
        self,
        backbone: FoundationBackbone,
        tasks: Mapping[str, TaskSpec],
        head_dropout: float = 0.1,
        head_input: str = "summary",
    ):
        super().__init__()
        if not tasks:
            raise ConfigError("a DiagnosisModel needs at least one task (a label:<task> column in the manifest)")
        if head_input not in HEAD_INPUTS:
            raise ConfigError(f"head_input must be one of {', '.join(HEAD_INPUTS)}; got {head_input!r}")
        self.backbone = backbone
        self.tasks = dict(tasks)
        self.head_dropout = head_dropout
        self.head_input = head_input
        width = backbone.config.d_model * (1 if head_input == "summary" else 2)
        self.heads = DiagnosisHeads(width, self.tasks, head_dropout)
        self.calibration: dict[str, TaskCalibration] = {}
        self.metrics: dict[str, Any] = {}
        self.training_info: dict[str, Any] = {}
        self.adapter: dict[str, Any] | None = None
        self.ood: OodModel | None = None

    @property
    def aligner(self):
        """The fitted aligner the model's tensors are made with (from the backbone)."""
        return self.backbone.aligner()

    # ------------------------------------------------------------------ forward

    def head_features(self, out: BackboneOutput) -> torch.Tensor:
        """What the heads read from a backbone output (``head_input``): ``(B, D)`` or ``(B, 2D)``."""
        return head_features(out, self.head_input)

    def forward(self, batch: PatientBatch, drop: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Logits per task; ``drop`` (bool ``(B, M)``) hides modalities from the fusion."""
        return self.heads(self.head_features(self.backbone(batch, drop=drop)))

    @torch.no_grad()
    def ood_embeddings(self, batch: PatientBatch) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The embeddings the OOD scores read (:mod:`meddx.models.ood`): space -> ``(B, D)``, and
        space -> bool ``(B,)`` rows that have it. Spaces: each modality's encoder embedding, and
        ``summary`` (what the heads read)."""
        encoded = self.backbone.encode(batch)
        return _ood_spaces(encoded, self.head_features(self.backbone.fuse(encoded)))

    @torch.no_grad()
    def batch_logits(self, batch: PatientBatch, ablations: bool = True) -> tuple[dict, dict]:
        """Logits of a batch, and per present modality the logits with that modality withheld.

        The encoders run once, and the fusion once over every variant together (each patient as
        is, and each patient without each of its present modalities: see
        :meth:`~meddx.models.backbone.FoundationBackbone.pooled_variants`).

        Returns:
            ``(logits, withheld)``: task -> ``(B,)``/``(B, C)`` arrays, and modality -> task -> the
            same with that modality withheld (rows that lacked it are unchanged).
        """
        logits, withheld, _ = self._batch_outputs(batch, ablations)
        return logits, withheld

    def _batch_outputs(self, batch: PatientBatch, ablations: bool) -> tuple[dict, dict, tuple[dict, dict]]:
        """:meth:`batch_logits` and :meth:`ood_embeddings` from one encoder pass."""
        encoded = self.backbone.encode(batch)
        if self.head_input != "summary":  # the heads read per-modality embeddings too: a fusion per variant
            return self._batch_logits_per_variant(encoded, ablations)
        present = encoded.present  # (B, M)
        B = present.shape[0]
        rows, keep = [torch.arange(B, device=present.device)], [present]
        without: list[tuple[Modality, torch.Tensor]] = []
        if ablations:
            for j, modality in enumerate(MODALITIES):
                have = present[:, j].nonzero().flatten()  # (P_j,) rows that can lose modality j
                if len(have) == 0:
                    continue
                hide = present[have].clone()
                hide[:, j] = False
                rows.append(have)
                keep.append(hide)
                without.append((modality, have))
        pooled = self.backbone.pooled_variants(encoded, torch.cat(rows), torch.cat(keep))  # (B + sum P_j, D)
        every = {t: v.float().cpu().numpy() for t, v in self.heads(pooled).items()}
        spaces = _ood_spaces(encoded, pooled[:B])
        logits = {t: v[:B] for t, v in every.items()}
        withheld: dict[Modality, dict[str, np.ndarray]] = {}
        offset = B
        for modality, have in without:
            index = have.cpu().numpy()
            withheld[modality] = {}
            for task, values in every.items():
                full = logits[task].copy()  # rows without the modality: nothing withheld, unchanged
                full[index] = values[offset : offset + len(index)]
                withheld[modality][task] = full
            offset += len(index)
        return logits, withheld, spaces

    def _batch_logits_per_variant(self, encoded, ablations: bool) -> tuple[dict, dict, tuple[dict, dict]]:
        """:meth:`batch_logits` with one fusion per withheld modality (heads reading ``summary+modalities``)."""
        none = torch.zeros_like(encoded.present)
        base = self.head_features(self.backbone.fuse(encoded, drop=none))
        logits = {t: v.float().cpu().numpy() for t, v in self.heads(base).items()}
        withheld: dict[Modality, dict[str, np.ndarray]] = {}
        if ablations:
            for j, modality in enumerate(MODALITIES):
                if not encoded.present[:, j].any():
                    continue
                hide = none.clone()
                hide[:, j] = True
                features = self.head_features(self.backbone.fuse(encoded, drop=hide))
                withheld[modality] = {t: v.float().cpu().numpy() for t, v in self.heads(features).items()}
        return logits, withheld, _ood_spaces(encoded, base)

    # ------------------------------------------------------------- calibration

    def calibrated(self, task: str, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of a task from its logits (uncalibrated when not fitted)."""
        entry = self.calibration.get(task)
        if entry is None:
            return probabilities_from_logits(logits, self.tasks[task].kind)
        return entry.calibrator.transform(logits)

    # --------------------------------------------------------------- predicting

    @torch.no_grad()
    def task_predictions(
        self, batch: PatientBatch, contributions: bool = True, embeddings: dict[str, list] | None = None
    ) -> list[TaskPrediction]:
        """The typed predictions of one batch: every task, each task's rows in batch order.

        With ``contributions``, each present modality's contribution (the logit change when it is
        withheld; binary: the positive class's logit, multiclass: the predicted class's) and its
        ablation probabilities (calibrated, with it withheld) ride along. ``embeddings``, when
        given, gets each OOD space's ``(P, D)`` embeddings of the rows that have it appended
        (what the batch shift test of ``diagnose`` reads).
        """
        logits, withheld, (spaces, have) = self._batch_outputs(batch, ablations=contributions)
        present = batch.present.cpu().numpy()  # (B, M)
        ood_ratios, ood_fused = self.ood.score(spaces, have) if self.ood is not None else ({}, None)
        if embeddings is not None:
            for space, values in spaces.items():
                embeddings.setdefault(space, []).append(values[have[space]])
        index_times = [t.isoformat().replace("+00:00", "Z") for t in batch.index_times]
        used = [tuple(m.value for j, m in enumerate(MODALITIES) if present[i, j]) for i in range(len(batch))]
        predictions: list[TaskPrediction] = []
        for task, spec in self.tasks.items():
            raw = logits[task]
            calibrated = _per_class(self.calibrated(task, raw), spec.kind)
            uncalibrated = _per_class(probabilities_from_logits(raw, spec.kind), spec.kind)
            predicted = calibrated.argmax(axis=1) if spec.kind != "binary" else (calibrated[:, 1] >= 0.5).astype(int)
            sets = None
            entry = self.calibration.get(task)
            if entry is not None and entry.conformal is not None:
                sets = entry.conformal.predict_set(calibrated if spec.kind != "binary" else calibrated[:, 1], present)
            changes: dict[Modality, tuple[np.ndarray, np.ndarray]] = {}
            if contributions:
                base = _chosen(raw, spec.kind, predicted)
                for modality, outputs in withheld.items():
                    without = outputs[task]
                    ablated = _per_class(self.calibrated(task, without), spec.kind)
                    changes[modality] = (base - _chosen(without, spec.kind, predicted), ablated)
            for i in range(len(batch)):
                here = [
                    (m, change, ablated) for m, (change, ablated) in changes.items() if present[i, MODALITIES.index(m)]
                ]
                predictions.append(
                    TaskPrediction(
                        patient_id=batch.patient_ids[i],
                        index_time=index_times[i],
                        task=task,
                        kind=spec.kind,
                        classes=tuple(spec.classes),
                        row=int(batch.rows[i]) if batch.rows is not None else -1,
                        probabilities=tuple(float(v) for v in calibrated[i]),
                        raw_probabilities=tuple(float(v) for v in uncalibrated[i]),
                        prediction=spec.classes[predicted[i]],
                        prediction_set=None
                        if sets is None
                        else tuple(c for k, c in enumerate(spec.classes) if sets[i, k]),
                        modalities=used[i],
                        contributions={m.value: float(change[i]) for m, change, _ in here},
                        ablations={m.value: tuple(float(v) for v in ablated[i]) for m, _, ablated in here},
                        ood_scores={s: float(v[i]) for s, v in ood_ratios.items() if np.isfinite(v[i])},
                        ood=None if ood_fused is None else float(ood_fused[i]),
                    )
                )
        return predictions

    # -------------------------------------------------------------- persistence

    def diagnosis_config(self) -> dict[str, Any]:
        """The diagnosis part of ``config.json``: tasks, heads, adapter, how it was trained."""
        return {
            "format": FORMAT,
            "meddx": __version__,
            "tasks": {name: {"kind": t.kind, "classes": list(t.classes)} for name, t in self.tasks.items()},
            "head_dropout": self.head_dropout,
            "head_input": self.head_input,
            "adapter": self.adapter,
            "training": self.training_info,
        }

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the model folder (see the module docstring); returns it.

        ``model.safetensors`` is a backbone checkpoint plus ``heads.*``, so
        ``FoundationBackbone.from_pretrained`` also reads a fine-tuned model's backbone.
        """
        from meddx.calibration import save_calibration
        from meddx.files import save_tensors_atomic, write_atomic
        from meddx.models.adapters import split_adapter_weights
        from meddx.models.checkpoint import save_backbone

        folder = Path(folder)
        base, adapter = split_adapter_weights(self)
        backbone_state = {k.removeprefix("backbone."): v for k, v in base.items() if k.startswith("backbone.")}
        heads = {k: v for k, v in base.items() if k.startswith("heads.")}
        save_backbone(
            self.backbone, folder, state=backbone_state, extra_tensors=heads, diagnosis=self.diagnosis_config()
        )
        if adapter:
            save_tensors_atomic(adapter, folder / ADAPTER_FILE, metadata={"format": "pt"})
        elif (folder / ADAPTER_FILE).exists():
            (folder / ADAPTER_FILE).unlink()
        save_calibration(folder, self.calibration)
        if self.ood is not None:
            self.ood.save(folder)
        else:  # a folder written again without OOD scores must not keep stale ones
            from meddx.models.ood import OOD_JSON, OOD_TENSORS

            for name in (OOD_JSON, OOD_TENSORS):
                (folder / name).unlink(missing_ok=True)
        write_atomic(folder / METRICS_FILE, json.dumps(self.metrics, indent=2, sort_keys=True, default=float))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, cache_dir: str | Path | None = None) -> DiagnosisModel:
        """Load a folder written by :meth:`save_pretrained`.

        Raises:
            ModelError: a missing or foreign file, a pickle checkpoint, an unknown format, a
                backbone folder without heads, or any field of any file out of its bounds (every
                file is checked first: :func:`meddx.models.folder.check_model_folder`).
        """
        from safetensors.torch import load_file

        from meddx.models.adapters import add_lora
        from meddx.models.backbone import FoundationBackbone
        from meddx.models.checkpoint import HEADS_PREFIX, WEIGHTS_FILE

        folder = Path(folder)
        checked = check_model_folder(folder)
        diagnosis = checked.checkpoint.diagnosis or {}
        tasks = {name: TaskSpec(name, kind, classes) for name, (kind, classes) in checked.tasks.items()}  # type: ignore[arg-type]
        model = cls(
            FoundationBackbone.from_pretrained(folder, cache_dir),
            tasks,
            diagnosis.get("head_dropout", 0.1),
            diagnosis.get("head_input", "summary"),  # folders written before head_input existed
        )
        heads = {
            k.removeprefix(HEADS_PREFIX): v
            for k, v in load_file(str(folder / WEIGHTS_FILE)).items()
            if k.startswith(HEADS_PREFIX)
        }
        if not {"input_mean", "input_scale"} & heads.keys():  # written before the heads standardised: identity
            heads.update({k: v for k, v in model.heads.state_dict().items() if k in ("input_mean", "input_scale")})
        try:
            model.heads.load_state_dict(heads)
        except RuntimeError as exc:
            raise ModelError(f"{folder / WEIGHTS_FILE}: the head weights do not fit config.json ({exc})") from None
        mean, scale = model.heads.input_mean, model.heads.input_scale
        if not (mean.isfinite().all() and scale.isfinite().all() and (scale > 0).all()):
            raise ModelError(
                f"{folder / WEIGHTS_FILE}: heads.input_mean must be finite and heads.input_scale finite and "
                "positive; the file is damaged: fine-tune again or restore the folder"
            )
        if diagnosis.get("adapter"):
            add_lora(model, diagnosis["adapter"])
            if not (folder / ADAPTER_FILE).is_file():
                raise ModelError(f"{folder} was fine-tuned with LoRA but has no {ADAPTER_FILE}; copy the whole folder")
            adapter = load_file(str(folder / ADAPTER_FILE))
            _, unexpected = model.load_state_dict(adapter, strict=False)
            lora_keys = {k for k in model.state_dict() if "lora_" in k}
            if unexpected or set(adapter) != lora_keys:
                raise ModelError(f"{folder / ADAPTER_FILE} does not fit the adapter described in config.json")
        model.adapter = diagnosis.get("adapter")
        model.training_info = diagnosis.get("training", {})
        model.calibration = checked.calibration
        model.ood = checked.ood
        metrics = folder / METRICS_FILE
        model.metrics = json.loads(metrics.read_text()) if metrics.is_file() else {}
        model.eval()
        return model


def _ood_spaces(encoded: EncodedBatch, features: torch.Tensor) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Space -> ``(B, D)`` embeddings and space -> bool ``(B,)`` presence: each modality's encoder
    embedding (rows that have it) and ``summary`` (the heads' input, every row)."""
    from meddx.models.ood import SUMMARY

    own = encoded.encoder_embeddings.float().cpu().numpy()  # (B, M, D)
    present = encoded.present.cpu().numpy()  # (B, M)
    embeddings = {m.value: own[:, j] for j, m in enumerate(MODALITIES) if present[:, j].any()}
    have = {m.value: present[:, j] for j, m in enumerate(MODALITIES) if present[:, j].any()}
    embeddings[SUMMARY] = features.float().cpu().numpy()
    have[SUMMARY] = np.ones(len(present), dtype=bool)
    return embeddings, have
