"""The device-log tensorizer: the grid's length, and fixed ``(max_channels, L)`` arrays for the model.

:class:`DeviceLogTensorizer` fits a channel vocabulary and per-channel normalisation on
training records and gives fixed ``(max_channels, L)`` arrays. The reader
(:mod:`meddx.ingest.device_logs`) puts a file's samples on the grid of :func:`grid_length` steps.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from meddx.config import DeviceLogConfig
from meddx.errors import ConfigError, NotFittedError
from meddx.ingest.base import Tensorizer
from meddx.records import Modality, ModalityRecord
from meddx.specs import ArrayField, ArraySpec

logger = logging.getLogger(__name__)


def grid_length(config: DeviceLogConfig) -> int:
    """Number of grid steps ``L`` over the look-back window.

    Raises:
        ConfigError: the window is not a whole, positive number of steps.

    Example:
        >>> grid_length(DeviceLogConfig(step_minutes=1.0, window_hours=6.0))
        360
    """
    if config.step_minutes <= 0 or config.window_hours <= 0:
        raise ConfigError(
            f"device_logs: step_minutes ({config.step_minutes}) and window_hours ({config.window_hours}) must be > 0"
        )
    steps = config.window_hours * 60.0 / config.step_minutes
    length = round(steps)
    if length < 1 or abs(length - steps) > 1e-6:
        raise ConfigError(
            f"device_logs: window_hours * 60 / step_minutes = {steps:g} is not a whole number of steps; "
            "choose a step that divides the window"
        )
    return length


class DeviceLogTensorizer(Tensorizer):
    """Fixed ``(max_channels, L)`` arrays with a channel vocabulary fitted on training records.

    ``fit`` keeps the channels seen in the most training records (ties: more samples,
    then name), up to ``max_channels``, and each one's mean and standard deviation over
    its observed training samples. ``transform`` puts each vocabulary channel on its row,
    normalised, zero where missing; channels outside the vocabulary are ignored (they are
    logged at DEBUG level, and :meth:`unknown_channels` lists them for a record).

    Example:
        >>> from pathlib import Path
        >>> from meddx.config import IngestConfig
        >>> from meddx.ingest.device_logs import read_device_log
        >>> from meddx.records import parse_time
        >>> record = read_device_log(Path("sample_data/patients/P0002/vitals.csv"),
        ...                          parse_time("2024-11-06T23:20:00Z"), DeviceLogConfig())
        >>> tensorizer = DeviceLogTensorizer(IngestConfig()).fit([record])  # the training rows' records
        >>> tensorizer.transform(record)["values"].shape  # (max_channels, minutes)
        (8, 360)
    """

    modality = Modality.DEVICE_LOGS

    def _shape(self) -> tuple[int, int]:
        return (self.config.device_logs.max_channels, grid_length(self.config.device_logs))

    def spec(self) -> ArraySpec:
        shape = self._shape()
        return {
            "values": ArrayField(shape, "float32", "values"),
            "mask": ArrayField(shape, "bool", "mask", of=("values",)),
        }

    def fit(self, records: Iterable[ModalityRecord]) -> DeviceLogTensorizer:
        n_records: Counter[str] = Counter()
        n_samples: Counter[str] = Counter()
        sums: dict[str, float] = {}
        squares: dict[str, float] = {}
        records = list(records)
        for record in records:
            values, mask = self._checked(record)
            for row, name in enumerate(record.meta["channels"]):
                observed = values[row][mask[row]].astype(np.float64)
                if observed.size == 0:
                    continue
                n_records[name] += 1
                n_samples[name] += observed.size
                sums[name] = sums.get(name, 0.0) + float(observed.sum())
                squares[name] = squares.get(name, 0.0) + float(np.square(observed).sum())
        ranked = sorted(n_records, key=lambda n: (-n_records[n], -n_samples[n], n))
        self.channels_ = ranked[: self.config.device_logs.max_channels]
        self.mean_ = []
        self.std_ = []
        for name in self.channels_:
            mean = sums[name] / n_samples[name]
            var = squares[name] / n_samples[name] - mean * mean
            std = float(np.sqrt(var)) if n_samples[name] > 1 and var > 1e-12 else 1.0
            self.mean_.append(float(mean))
            self.std_.append(std)
        logger.debug("device-log vocabulary fitted on %d records: %s", len(records), self.channels_)
        return self

    def _checked(self, record: ModalityRecord) -> tuple[np.ndarray, np.ndarray]:
        values = np.asarray(record.arrays["values"])
        mask = np.asarray(record.arrays["mask"], dtype=bool)
        length = self._shape()[1]
        channels = record.meta.get("channels", [])
        if values.ndim != 2 or values.shape != mask.shape or values.shape != (len(channels), length):
            raise ValueError(
                f"device_logs record from {record.source} has values {values.shape} and mask {mask.shape} for "
                f"{len(channels)} channels; expected ({len(channels)}, {length}): was it read with another config?"
            )
        return values, mask

    def _check_fitted(self) -> None:
        if not hasattr(self, "channels_"):
            raise NotFittedError(
                "this DeviceLogTensorizer is not fitted; call fit(training_records) or load_state_dict(state) first"
            )

    def unknown_channels(self, record: ModalityRecord) -> list[str]:
        """Channels of ``record`` outside the fitted vocabulary (ignored by :meth:`transform`)."""
        self._check_fitted()
        return [c for c in record.meta.get("channels", []) if c not in self.channels_]

    def transform(self, record: ModalityRecord) -> dict[str, np.ndarray]:
        self._check_fitted()
        values, mask = self._checked(record)
        shape = self._shape()
        out_values = np.zeros(shape, dtype=np.float32)  # (max_channels, L)
        out_mask = np.zeros(shape, dtype=bool)
        position = {name: i for i, name in enumerate(self.channels_)}
        for row, name in enumerate(record.meta["channels"]):
            i = position.get(name)
            if i is None:
                continue
            out_mask[i] = mask[row]
            normalised = (values[row].astype(np.float64) - self.mean_[i]) / self.std_[i]
            out_values[i] = np.where(mask[row], normalised, 0.0).astype(np.float32)
        unknown = self.unknown_channels(record)
        if unknown:
            logger.debug("device log %s: channels outside the vocabulary ignored: %s", record.source, unknown)
        return {"values": out_values, "mask": out_mask}

    def state_dict(self) -> dict[str, Any]:
        if not hasattr(self, "channels_"):
            return {}
        return {
            "channels": list(self.channels_),
            "mean": list(self.mean_),
            "std": list(self.std_),
            "length": self._shape()[1],
        }

    def load_state_dict(self, state: dict[str, Any]) -> DeviceLogTensorizer:
        if not state:
            return self
        channels, mean, std = list(state["channels"]), list(state["mean"]), list(state["std"])
        if not (len(channels) == len(mean) == len(std)) or len(channels) > self.config.device_logs.max_channels:
            raise ConfigError(
                f"device_logs tensorizer state has {len(channels)} channels, {len(mean)} means and {len(std)} stds "
                f"for max_channels={self.config.device_logs.max_channels}; was it saved with another config?"
            )
        if int(state.get("length", self._shape()[1])) != self._shape()[1]:
            raise ConfigError(
                f"device_logs tensorizer state is for a grid of {state['length']} steps, the config gives "
                f"{self._shape()[1]}; load it with the config it was saved with"
            )
        self.channels_ = channels
        self.mean_ = [float(m) for m in mean]
        self.std_ = [float(s) for s in std]
        return self
