"""Checks made once before an ingest run reads any file, and the folders a run writes to.

:func:`check_run` makes sure the run can work: the config's values
(:meth:`~meddx.config.IngestConfig.check`), each used reader's own check (the notes
tokenizer loads offline), the cache and run folders can be written, and, when rows name
``dicomweb:`` sources, that the DICOMweb server takes the credentials.
"""

from __future__ import annotations

import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from meddx.config import IngestConfig
from meddx.dicomweb.ref import DicomWebRef
from meddx.errors import ConfigError
from meddx.fhirclient.ref import FhirRef
from meddx.ingest.base import Ingestor
from meddx.records import MODALITIES, Modality


def ensure_writable_folder(folder: str | Path, what: str) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it.

    Args:
        folder: the folder.
        what: how the user named it, for the message (``"--cache"``, ``"--out"``).

    Raises:
        ConfigError: the folder cannot be created or written; the message names it.

    Example:
        >>> ensure_writable_folder("runs/cache", "--cache")  # doctest: +SKIP
        PosixPath('runs/cache')
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"meddx")
    except OSError as exc:
        raise ConfigError(
            f"{what} {folder}: cannot write there ({exc.strerror or exc}); choose a folder you can write"
        ) from None
    return folder


def new_run_folder(root: str | Path = "runs", prefix: str = "ingest") -> Path:
    """A fresh folder name under ``root`` for one run's reports (not created here).

    Example:
        >>> new_run_folder().name  # doctest: +SKIP
        'ingest-20240305T140000Z'
    """
    root = Path(root)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    candidate = root / f"{prefix}-{stamp}"
    n = 1
    while candidate.exists():
        n += 1
        candidate = root / f"{prefix}-{stamp}-{n}"
    return candidate


def check_run(
    config: IngestConfig,
    ingestors: dict[Modality, Ingestor],
    tasks: list[Any],  # meddx.ingest.runner.IngestTask
    cache_dir: str | Path,
    out_dir: str | Path | None = None,
) -> None:
    """Everything that would fail every file, checked once before any file is read.

    Raises:
        ConfigError: an unusable config value, a reader that cannot work with the config
            (a text model that does not load offline), or a folder that cannot be written.
    """
    config.check()
    for modality in sorted({task.modality for task in tasks}, key=MODALITIES.index):
        ingestors[modality].check()
    ensure_writable_folder(cache_dir, "--cache")
    if out_dir is not None:
        ensure_writable_folder(out_dir, "--out")
    refs = {type(ref) for task in tasks for ref in task.request.remote.values()}
    if DicomWebRef in refs:
        from meddx.dicomweb.client import check_server

        check_server(config.dicomweb)  # refused credentials stop the run here, reported once
    if FhirRef in refs:
        from meddx.fhirclient.client import check_server as check_fhir_server

        check_fhir_server(config.fhir)  # the same for the FHIR server


def with_dicomweb_store(config: IngestConfig, cache_dir: str | Path) -> IngestConfig:
    """The config with ``dicomweb.cache_dir`` set to ``<cache_dir>/dicomweb`` and ``fhir.cache_dir`` to
    ``<cache_dir>/fhir`` (the FHIR server's answers), each when it is not set."""
    if config.fhir.cache_dir is None:
        answers = str(Path(cache_dir).resolve() / "fhir")
        config = config.model_copy(update={"fhir": config.fhir.model_copy(update={"cache_dir": answers})})
    if config.dicomweb.cache_dir is not None:
        return config
    store = str(Path(cache_dir).resolve() / "dicomweb")
    return config.model_copy(update={"dicomweb": config.dicomweb.model_copy(update={"cache_dir": store})})
