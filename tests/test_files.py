"""Files meddx writes get the mode the user's umask gives, not mkstemp's and safetensors' 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from meddx.cache import TensorStore
from meddx.files import atomic_path, current_umask, save_tensors_atomic, temp_file, write_atomic
from meddx.records import Modality


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
    assert current_umask() == 0o002
    assert current_umask() == 0o002


def test_atomic_writers_follow_the_umask(group_umask, tmp_path: Path) -> None:
    write_atomic(tmp_path / "metrics.json", "{}")
    save_tensors_atomic({"w": torch.zeros(2)}, tmp_path / "best.safetensors")
    write_atomic(tmp_path / "index.json", "{}")
    stored = TensorStore(tmp_path / "aligned").put("k" * 64, {Modality.AUDIO: {"mel": torch.zeros(2)}})
    fd, tmp = temp_file(tmp_path)
    os.close(fd)
    for path in (tmp_path / "metrics.json", tmp_path / "best.safetensors", tmp_path / "index.json", stored, Path(tmp)):
        assert _mode(path) == 0o664, path
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == [Path(tmp).name]  # no leftovers


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    target = write_atomic(tmp_path / "report.json", "old")
    with pytest.raises(RuntimeError, match="cut short"), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("cut short")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    with atomic_path(target, suffix=".partial") as tmp:
        assert tmp.parent == tmp_path
        assert tmp.suffix == ".partial"
        assert tmp.name != target.name
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
