"""Early stopping on a validation score: keeps the best weights and says when to stop.

Example:
    >>> stopper = EarlyStopping(patience=2)
    >>> [stopper.update(epoch, score, None) for epoch, score in enumerate([0.6, 0.7, 0.65, 0.64])]
    [False, False, False, True]
    >>> stopper.summary()["best_epoch"], stopper.summary()["epochs_run"]
    (2, 4)
"""

from __future__ import annotations

import copy
import math
from typing import Any


class EarlyStopping:
    """Keeps the best weights by a validation score (higher is better) and says when to stop.

    Args:
        patience: epochs after the best one before :meth:`update` says stop.
    """

    def __init__(self, patience: int):
        self.patience = patience
        self.best = -math.inf
        self.best_epoch = -1
        self.last_epoch = -1  # the last epoch run (0-based); head mode checks validation every few epochs
        self.best_state: dict | None = None
        self.history: list[float] = []

    def update(self, epoch: int, value: float, module) -> bool:
        """Record an epoch's score (copying ``module``'s weights when best); True when training should stop."""
        self.history.append(value)
        self.last_epoch = epoch
        score = value if math.isfinite(value) else -math.inf
        if score > self.best or self.best_state is None:
            self.best, self.best_epoch = score, epoch
            self.best_state = copy.deepcopy(module.state_dict()) if module is not None else {}
        return epoch - self.best_epoch >= self.patience

    def summary(self) -> dict[str, Any]:
        """The validation history, epochs run, best epoch (1-based) and best score (None if never finite)."""
        return {
            "val_auroc": self.history,
            "epochs_run": self.last_epoch + 1,
            "best_epoch": self.best_epoch + 1,
            "best_val_auroc": self.best if math.isfinite(self.best) else None,
        }
