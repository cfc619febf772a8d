"""Files meddx writes get the permissions the user's umask gives, like any file they make.

``tempfile.mkstemp`` creates its file 0600 (owner only), and ``safetensors`` writes its
files that way too; a file written through either and then renamed into place would keep
0600, so a model folder or ``metrics.json`` shared with a team (umask 002 or 022) could not
be read by the others. :func:`temp_file` and :func:`apply_umask` give such files the mode
``open()`` would have given them (``0666 & ~umask``); :func:`folder_mode` does the same
for a folder made by ``tempfile.mkdtemp`` (0700).

Every file meddx replaces is written atomically, in one way: :func:`atomic_path` hands out a
temporary file beside the target and renames it onto the target only when the writing
finished (a reader sees the old file or the whole new one, never half of one; a failed write
leaves no temporary file behind); :func:`write_atomic` does that for text or bytes.

Example:
    >>> with atomic_path(Path("runs/model/best.safetensors")) as tmp:  # doctest: +SKIP
    ...     save_file(tensors, tmp)
    >>> write_atomic(Path("runs/ingest-1/report.json"), "{}")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the OS tells it (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new regular file gets from ``open()``: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode a new folder gets from ``mkdir``: ``0o777`` less the umask (``mkdtemp`` gives 0700)."""
    return 0o777 & ~current_umask()


def apply_umask(path: str | Path) -> None:
    """Give a file meddx wrote (through a 0600 temporary file) the mode the user's umask gives."""
    os.chmod(path, file_mode())


def temp_file(directory: str | Path, suffix: str = ".tmp") -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``directory``, with the umask's mode rather than 0600 (for atomic writes)."""
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=suffix)
    try:
        os.chmod(tmp, file_mode())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file beside ``path`` to write; renamed onto ``path`` when the block ends without error.

    The temporary file is made in ``path``'s folder (so the rename stays on one file system) with
    the name ``tmp*<suffix>``; choose a suffix that readers of the folder skip. After the block it
    gets the umask's mode (a writer such as ``safetensors`` may have made it 0600) and replaces
    ``path``; when the block raises, it is removed and ``path`` is left as it was. The folder must exist.
    """
    path = Path(path)
    fd, name = temp_file(path.parent, suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def save_tensors_atomic(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write torch ``tensors`` as a safetensors file at ``path`` atomically (see :func:`atomic_path`)."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return path


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to ``path`` atomically (see :func:`atomic_path`); makes the folder; returns ``path``.

    Example:
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     written = write_atomic(Path(folder) / "a.json", "{}")
        ...     print(written.read_text(), sorted(p.name for p in Path(folder).iterdir()))
        {} ['a.json']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return path
