"""Training: the fine-tuning and pretraining entries around one loop.

* :func:`finetune` (:mod:`meddx.training.finetune`): heads (and optionally the backbone) on
  labelled rows, then calibration; :func:`pretrain` (:mod:`meddx.training.pretrain`): the
  self-supervised backbone.
* :mod:`meddx.training.trainer`: the loop (:class:`Trainer`, :class:`LoopConfig`);
  :mod:`meddx.training.fits`: what ``finetune`` feeds it (the whole model, or heads on embeddings).
* :mod:`meddx.training.early_stopping`, :mod:`meddx.training.checkpoints` (safetensors + JSON,
  for ``--resume``), :mod:`meddx.training.distributed` (``torchrun``),
  :mod:`meddx.training.calibration_fit` (calibrators and conformal sets after training),
  :mod:`meddx.training.batch_norm`, :mod:`meddx.training.validation`.

Nothing here imports torch until it trains.

Example:
    >>> from meddx.training import finetune, pretrain
    >>> if __name__ == "__main__":  # ingestion spawns worker processes  # doctest: +SKIP
    ...     model = finetune("sample_data/manifest.csv", "runs/model", tasks=["disease"])
"""

from meddx.training.finetune import DEFAULT_BATCH_SIZE, MODES, SCHEDULES, Mode, finetune
from meddx.training.pretrain import PretrainResult, pretrain
from meddx.training.trainer import LoopConfig, Trainer

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "MODES",
    "SCHEDULES",
    "LoopConfig",
    "Mode",
    "PretrainResult",
    "Trainer",
    "finetune",
    "pretrain",
]
