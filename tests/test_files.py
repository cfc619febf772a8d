"""Files meddx writes get the mode the user's umask gives, not mkstemp's and safetensors' 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from meddx.data.index import write_atomic
from meddx.data.store import TensorStore
from meddx.files import current_umask, temp_file
from meddx.records import Modality
from meddx.training.checkpoints import atomic_save_tensors, atomic_write_text


@pytest.fixture()
def group_umask():
    before = os.umask(0o002)  # a team's shared folders
    try:
        yield
    finally:
        os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_umask_is_read_without_changing_it(group_umask) -> None:
    assert current_umask() == 0o002 and current_umask() == 0o002


def test_atomic_writers_follow_the_umask(group_umask, tmp_path: Path) -> None:
    atomic_write_text("{}", tmp_path / "metrics.json")
    atomic_save_tensors({"w": torch.zeros(2)}, tmp_path / "best.safetensors")
    write_atomic(tmp_path / "index.json", "{}")
    stored = TensorStore(tmp_path / "aligned").put("k" * 64, {Modality.AUDIO: {"mel": torch.zeros(2)}})
    fd, tmp = temp_file(tmp_path)
    os.close(fd)
    for path in (tmp_path / "metrics.json", tmp_path / "best.safetensors", tmp_path / "index.json", stored, Path(tmp)):
        assert _mode(path) == 0o664, path
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == [Path(tmp).name]  # no leftovers
