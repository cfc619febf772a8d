"""Splitting a WADO-RS ``multipart/related`` answer into files as its bytes arrive.

:func:`write_parts` reads the body chunk by chunk and writes each part's content to a file of
its own, so a series never sits in memory: at most one chunk and a delimiter's length are held.
Each part is held to ``max_instance_mb`` as its bytes arrive (a part whose ``Content-Length``
claims more is refused before a byte of it is written); the whole body is held to
``max_series_mb`` by the caller (:func:`meddx.dicomweb.guard.read_capped`).

A part's content is what follows the blank line ending its headers, up to the next delimiter
(``CRLF--boundary``, RFC 2046), byte for byte: the same bytes ``dicomweb-client``'s own
splitting gives. An answer that ends inside a part (no closing delimiter) is refused rather
than stored cut short.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from meddx.dicomweb.guard import AnswerError, megabytes

MAX_HEADER_BYTES = 64 * 1024  # a part's header section; DICOM parts carry a few short headers

_PREAMBLE, _DELIMITED, _BODY = "preamble", "delimited", "body"


def boundary_of(content_type: str) -> bytes | None:
    """The ``boundary`` parameter of a ``multipart/related`` Content-Type; None when it is not multipart or has none.

    Example:
        >>> boundary_of('multipart/related; type="application/dicom"; boundary="b-42"')
        b'b-42'
        >>> boundary_of("application/dicom") is None
        True
    """
    media_type, *params = [p.strip() for p in content_type.split(";")]
    if media_type.lower() != "multipart/related":
        return None
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("latin-1")
    return None


def part_headers(raw: bytes) -> dict[str, str]:
    """A part's header section as a dict of lower-case names (the boundary line's padding skipped).

    Example:
        >>> part_headers(b"\\r\\nContent-Type: application/dicom\\r\\nContent-Length: 12")
        {'content-type': 'application/dicom', 'content-length': '12'}
    """
    headers = {}
    for line in raw.decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if colon and name.strip():
            headers[name.strip().lower()] = value.strip()
    return headers


class _Part:
    """One part's file while its content arrives, held to the per-instance limit."""

    def __init__(self, path: Path, cap: int, where: str):
        self.path = path
        self.cap = cap
        self.where = where
        self.size = 0
        self.handle: BinaryIO = open(path, "w+b")  # noqa: SIM115 (closed by close())

    def write(self, data: bytes | bytearray, n: int) -> None:
        if self.size + n > self.cap:
            raise AnswerError(
                f"the DICOMweb server at {self.where} sent more than {megabytes(self.cap)} for one instance"
                " (dicomweb.max_instance_mb); refused"
            )
        with memoryview(data) as view:
            self.handle.write(view[:n])
        self.size += n

    def complete(self) -> BinaryIO:
        """The file, written and open for reading from its start."""
        self.handle.flush()
        self.handle.seek(0)
        return self.handle

    def close(self) -> None:
        self.handle.close()


def write_parts(
    chunks: Iterable[bytes], boundary: bytes, folder: Path, instance_cap: int, where: str
) -> Iterator[BinaryIO]:
    """Write each part of a multipart body to ``folder/part-<n>.part``; yield each file once its part is complete.

    The file is yielded open, at its start (its ``name`` is its path), so that it can be read
    without opening it again; it is closed when the next part is asked for. It may be renamed.

    Args:
        chunks: the body, in pieces of any size (``response.iter_content``).
        boundary: the Content-Type's boundary (:func:`boundary_of`).
        folder: where the part files go (the series' staging folder).
        instance_cap: the most bytes one part may hold (``dicomweb.max_instance_mb``).
        where: the server, for messages.

    Raises:
        AnswerError: a part over the limit (or claiming more in its ``Content-Length``), part
            headers over 64 KiB, or a body that ends inside a part.
    """
    delimiter = b"\r\n--" + boundary
    keep = len(delimiter) - 1  # a delimiter may straddle two chunks
    buffer = bytearray(b"\r\n")  # the first delimiter may open the body without its CRLF
    state = _PREAMBLE
    part: _Part | None = None
    n = 0
    try:
        for chunk in chunks:
            buffer += chunk
            while True:
                if state == _PREAMBLE:
                    found = buffer.find(delimiter)
                    if found < 0:
                        del buffer[: max(0, len(buffer) - keep)]
                        break
                    del buffer[: found + len(delimiter)]
                    state = _DELIMITED
                if state == _DELIMITED:
                    if len(buffer) < 2:
                        break
                    if buffer.startswith(b"--"):  # the close delimiter: the epilogue is not read
                        return
                    end = buffer.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES + 4)
                    if end < 0:
                        if len(buffer) > MAX_HEADER_BYTES:
                            raise AnswerError(
                                f"the DICOMweb server at {where} sent a part whose headers exceed 64 KiB; refused"
                            )
                        break
                    claimed = part_headers(bytes(buffer[:end])).get("content-length", "")
                    if claimed.isdigit() and int(claimed) > instance_cap:
                        raise AnswerError(
                            f"the DICOMweb server at {where} announced a part of {megabytes(int(claimed))}, more than"
                            f" {megabytes(instance_cap)} for one instance (dicomweb.max_instance_mb); refused"
                        )
                    del buffer[: end + 4]
                    n += 1
                    part = _Part(folder / f"part-{n:06d}.part", instance_cap, where)
                    state = _BODY
                if state == _BODY:
                    assert part is not None
                    found = buffer.find(delimiter)
                    upto = found if found >= 0 else max(0, len(buffer) - keep)
                    part.write(buffer, upto)
                    del buffer[:upto]
                    if found < 0:
                        break
                    del buffer[: len(delimiter)]
                    state = _DELIMITED
                    yield part.complete()
                    part.close()
                    part = None
        if state == _BODY or (state == _DELIMITED and buffer.strip()):
            raise AnswerError(
                f"the DICOMweb server at {where} ended its multipart answer inside a part (no closing boundary);"
                " the series was not stored"
            )
    finally:
        if part is not None:
            part.close()


def write_whole(chunks: Iterable[bytes], path: Path, instance_cap: int, where: str) -> Iterator[BinaryIO]:
    """Write a single-part answer (``application/dicom``, not wrapped in multipart) to ``path``; yield it as
    :func:`write_parts` yields a part.

    Raises:
        AnswerError: more than ``instance_cap`` bytes.
    """
    part = _Part(path, instance_cap, where)
    try:
        for chunk in chunks:
            part.write(chunk, len(chunk))
        yield part.complete()
    finally:
        part.close()
