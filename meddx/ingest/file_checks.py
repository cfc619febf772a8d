"""Checks every reader makes before it opens a path the manifest names.

A manifest cell can name anything the filesystem holds. Readers that ``read()`` a whole
file would hang on a FIFO (``open`` waits for a writer), never finish on ``/dev/zero``
(memory grows until the kernel kills the worker), and call a device "a folder" when they
only test ``is_file()``. :func:`check_source` refuses all of these with an
:class:`~meddx.errors.IngestError` before a byte is read:

* a path that does not exist (or a symbolic link to nothing);
* anything that is not a regular file (or a folder, where the reader takes one): a named
  pipe, a character or block device, a socket;
* a regular file larger than the modality's ``max_file_mb`` (each section of
  :class:`~meddx.config.IngestConfig` has one; docs/ingest.md lists the defaults). The limit is on
  the file's size on disk, read from ``stat`` without opening the file.

Example:
    >>> check_source(Path("sample_data/patients/P0001/note.txt"), "notes", max_file_mb=32).name
    'note.txt'
    >>> check_source(Path("/dev/null"), "notes", max_file_mb=32)
    Traceback (most recent call last):
    meddx.errors.IngestError: ...
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from meddx.errors import IngestError

_MB = 1024 * 1024

_KINDS: tuple[tuple[int, str], ...] = (
    (stat.S_IFIFO, "a named pipe (FIFO)"),
    (stat.S_IFCHR, "a character device"),
    (stat.S_IFBLK, "a block device"),
    (stat.S_IFSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a ``stat`` mode describes, in words.

    Example:
        >>> file_kind(os.stat("/dev/null").st_mode)
        'a character device'
    """
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a folder"
    fmt = stat.S_IFMT(mode)
    return next((name for kind, name in _KINDS if kind == fmt), "not a regular file")


def size_limit_reason(size: int, max_file_mb: float, modality: str) -> str:
    """The message for a file over its modality's size limit.

    Example:
        >>> size_limit_reason(300 * 1024 * 1024, 32, "notes")[:40]
        'is 300.0 MB, over the 32 MB limit for no'
    """
    return (
        f"is {size / _MB:.1f} MB, over the {max_file_mb:g} MB limit for {modality} files; "
        f"if the file is genuine, raise {modality}.max_file_mb in the ingest config"
    )


def check_source(
    path: str | Path,
    modality: str,
    *,
    max_file_mb: float | None,
    folder_ok: bool = False,
    expected: str = "a file",
) -> Path:
    """Refuse a path that is missing, not a regular file (or folder), or too large.

    Args:
        path: the file or folder a manifest cell names.
        modality: the modality reading it (named in errors, and in the config key to raise).
        max_file_mb: the largest regular file accepted, in MiB; None for no limit.
        folder_ok: whether a folder is a valid source for this reader.
        expected: what the reader wants, for messages ("a WAV or FLAC file").

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        IngestError: the path does not exist, is a FIFO, device or socket, is a folder
            where one file is needed, or is over ``max_file_mb``.

    Example:
        >>> try:
        ...     check_source(Path("/dev/zero"), "notes", max_file_mb=32)
        ... except IngestError as exc:
        ...     print(exc.reason)
        is a character device, not a regular file; name a file
    """
    path = Path(path)
    try:
        info = os.stat(path)  # follows symbolic links: what matters is what a read would open
    except FileNotFoundError:
        raise IngestError(path, modality, "no such file or folder; check the path in the manifest") from None
    except OSError as exc:
        raise IngestError(path, modality, f"cannot inspect it: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        if folder_ok:
            return path
        raise IngestError(path, modality, f"is a folder; {modality} needs {expected}")
    if not stat.S_ISREG(info.st_mode):
        raise IngestError(path, modality, f"is {file_kind(info.st_mode)}, not a regular file; name {expected}")
    if max_file_mb is not None and info.st_size > max_file_mb * _MB:
        raise IngestError(path, modality, size_limit_reason(info.st_size, max_file_mb, modality))
    return path


def regular_files(folder: Path) -> list[Path]:
    """The non-hidden regular files directly in ``folder``, by name (FIFOs, devices, sockets left out).

    Example:
        >>> [path.name for path in regular_files(Path("sample_data/patients/P0001"))]
        ['echo.mp4', 'ehr.json', 'lung_sound.wav', 'note.txt']
    """
    found = []
    for entry in os.scandir(folder):
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_file():  # follows links; False for FIFOs, devices and sockets
                found.append(Path(entry.path))
        except OSError:
            continue
    return sorted(found)
