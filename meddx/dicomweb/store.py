"""Series retrieved from a DICOMweb server, kept as DICOM files so that a second run fetches nothing.

Layout under the store's root (by default the ``dicomweb/`` folder of the ingest cache)::

    <server id>/<StudyInstanceUID>/series.json                     the study's series (QIDO-RS answer)
    <server id>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   one file per instance

``<server id>`` is a hash of the server's base URL (:func:`~meddx.dicomweb.ref.server_id`).
A series folder appears only once every instance is written (it is filled under a temporary
name and renamed), so a folder that exists is complete and is read as it is. The files are
the instances as the server stores them (WADO-RS with ``transfer-syntax=*``), read back by
the same series assembly as any folder (:func:`meddx.ingest.dicom_series.load_series`), so
tensors are identical to reading the original files from disk. The bytes are written as
the server sent them, never parsed and re-encoded.

**Which series of a study.** QIDO-RS lists the study's series; series of non-image
modalities (SR, KO, PR...; meddx's own prediction reports among them) are left out, and the
others are ordered by ``ImagingConfig.series_rule`` as for folders: ``most_slices`` (most
instances, ties to the smallest SeriesInstanceUID; a multi-frame instance counts once here)
or ``first_uid``. The reader takes the first of them that was acquired by the index time.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom

from meddx.config import DicomWebConfig
from meddx.dicomweb.client import connect, describe_failure, server_url
from meddx.dicomweb.ref import DicomWebRef, is_uid, server_id
from meddx.errors import ConfigError, IngestError, short_reason
from meddx.files import folder_mode, temp_file

if TYPE_CHECKING:
    from dicomweb_client import DICOMwebClient

logger = logging.getLogger(__name__)

_IMAGING = "imaging"
# Series of these modalities hold no image to read (reports, key objects, presentation states...).
NON_IMAGE_MODALITIES = frozenset(
    {"SR", "KO", "PR", "DOC", "REG", "FID", "RTSTRUCT", "RTPLAN", "RTRECORD", "PLAN", "AU", "ECG", "HD"}
)
AS_STORED = (("application/dicom", "*"),)  # WADO-RS: the instances in the transfer syntax the server holds
_SERIES_FIELDS = ["Modality", "NumberOfSeriesRelatedInstances", "SeriesDate", "SeriesTime"]


@dataclass(frozen=True)
class SeriesEntry:
    """One series of a study, as QIDO-RS describes it."""

    series_uid: str
    modality: str
    n_instances: int


def _tag(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def order_series(entries: Iterable[SeriesEntry], series_rule: str) -> list[SeriesEntry]:
    """Image series in the order the series rule prefers them (non-image modalities left out).

    Example:
        >>> order_series([SeriesEntry("1.2", "CT", 3), SeriesEntry("1.3", "CT", 40), SeriesEntry("1.4", "SR", 99)],
        ...              "most_slices")[0].series_uid
        '1.3'
    """
    images = [e for e in entries if e.modality.upper() not in NON_IMAGE_MODALITIES]
    if series_rule == "first_uid":
        return sorted(images, key=lambda e: e.series_uid)
    return sorted(images, key=lambda e: (-e.n_instances, e.series_uid))


class SeriesStore:
    """Retrieves series from the configured DICOMweb server into a folder of DICOM files, once.

    The client is made on first use, so a run whose series are all stored makes no request.

    Args:
        config: the ``dicomweb`` section of the ingest config.
        root: the store's folder; default ``config.cache_dir``.

    Example:
        >>> config = DicomWebConfig(url="http://127.0.0.1:8042/dicom-web")
        >>> store = SeriesStore(config, "runs/cache/dicomweb")  # doctest: +SKIP
        >>> folder = store.fetch("1.2.3", store.candidates(DicomWebRef("1.2.3"), "most_slices")[0])  # doctest: +SKIP
    """

    def __init__(self, config: DicomWebConfig, root: str | Path | None = None):
        root = root if root is not None else config.cache_dir
        if root is None:
            raise ConfigError("a DICOMweb series store needs a folder: set dicomweb.cache_dir or pass root")
        self.config = config
        self.url = server_url(config)
        self.root = Path(root) / server_id(self.url)
        self._client: DICOMwebClient | None = None

    @property
    def client(self) -> DICOMwebClient:
        if self._client is None:
            self._client = connect(self.config, self.url)
        return self._client

    def _fail(self, ref: DicomWebRef | str, exc: BaseException) -> IngestError:
        return IngestError(str(ref), _IMAGING, describe_failure(exc, self.config, self.url))

    # ----------------------------------------------------------------- which series

    def study_series(self, study_uid: str) -> list[SeriesEntry]:
        """The study's series, from ``series.json`` when stored, else by QIDO-RS (then stored).

        Raises:
            IngestError: the server cannot be reached, refused, or knows no such study.
        """
        import requests

        listing = self.root / study_uid / "series.json"
        if listing.is_file():
            items = json.loads(listing.read_text())
        else:
            try:
                items = self.client.search_for_series(study_uid, fields=_SERIES_FIELDS)
            except requests.RequestException as exc:
                raise self._fail(f"dicomweb:studies/{study_uid}", exc) from None
            if not items:
                raise IngestError(
                    f"dicomweb:studies/{study_uid}", _IMAGING, "the DICOMweb server has no series in this study"
                )
            _write_atomic(listing, json.dumps(items, sort_keys=True))
        entries = []
        for item in items:
            uid = str(_tag(item, "0020000E") or "")
            if is_uid(uid):
                count = _tag(item, "00201209")
                entries.append(SeriesEntry(uid, str(_tag(item, "00080060") or ""), int(count) if count else 0))
        return entries

    def candidates(self, ref: DicomWebRef, series_rule: str) -> list[str]:
        """SeriesInstanceUIDs to try for a reference, best first (see the module docstring).

        Raises:
            IngestError: no image series in the study, or the server failed.
        """
        if ref.series_uid is not None:
            return [ref.series_uid]
        ordered = order_series(self.study_series(ref.study_uid), series_rule)
        if not ordered:
            raise IngestError(str(ref), _IMAGING, "the study holds no image series (only reports or other objects)")
        return [entry.series_uid for entry in ordered]

    # ----------------------------------------------------------------- retrieval

    def folder(self, study_uid: str, series_uid: str) -> Path:
        """Where a series' files are (or will be) stored."""
        return self.root / study_uid / series_uid

    def is_stored(self, study_uid: str, series_uid: str) -> bool:
        return self.folder(study_uid, series_uid).is_dir()

    def fetch(self, study_uid: str, series_uid: str) -> Path:
        """The series' folder, retrieving the series by WADO-RS first unless it is stored.

        Instances are streamed to files one by one (a series never sits in memory whole).

        Raises:
            IngestError: the server cannot be reached, refused, has no such series, or sent
                something that is not DICOM.
        """
        import requests

        target = self.folder(study_uid, series_uid)
        if target.is_dir():
            return target
        ref = DicomWebRef(study_uid, series_uid)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{series_uid}.staging-"))
        os.chmod(staging, folder_mode())  # mkdtemp makes it 0700; the series folder is shared like the cache
        try:
            n = 0
            for n, (sop_uid, write) in enumerate(self._instances(study_uid, series_uid), 1):
                write(staging / (f"{sop_uid}.dcm" if is_uid(sop_uid) else f"instance-{n:06d}.dcm"))
            if n == 0:
                raise IngestError(str(ref), _IMAGING, "the DICOMweb server returned no instances for this series")
            try:
                os.rename(staging, target)
            except OSError:  # another worker stored it meanwhile: theirs is complete too
                if not target.is_dir():
                    raise
            logger.debug("dicomweb: stored a series of %d instance(s)", n)
        except requests.RequestException as exc:
            raise self._fail(ref, exc) from None
        except IngestError:
            raise
        except Exception as exc:  # a part that is not DICOM, a full disk: say which, not the bytes
            raise IngestError(
                str(ref), _IMAGING, f"could not store the retrieved series ({type(exc).__name__}: {short_reason(exc)})"
            ) from None
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return target

    def _instances(self, study_uid: str, series_uid: str) -> Iterator[tuple[str, Callable[[Path], Any]]]:
        """(SOPInstanceUID, a function writing the instance to a path) for each instance, streamed by WADO-RS.

        The parts of the multipart answer are written as the server sent them (its Part 10
        bytes), which is several times faster than parsing and re-encoding each dataset; the
        multipart splitting is ``dicomweb-client``'s. Should a future client lack that helper,
        the public ``iter_series`` is used instead.
        """
        client = self.client
        split = getattr(client, "_decode_multipart_message", None)
        if split is None:
            for dataset in client.iter_series(study_uid, series_uid, media_types=AS_STORED):
                yield str(dataset.get("SOPInstanceUID", "")), partial(_save_dataset, dataset)
            return
        response = client._session.get(
            f"{self.url}/studies/{study_uid}/series/{series_uid}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
            stream=True,
            timeout=self.config.timeout_s,
        )
        response.raise_for_status()
        if response.headers.get("Content-Type", "").startswith("application/dicom"):  # one part, not wrapped
            parts: Iterable[bytes] = [response.content]
        else:
            parts = split(response, stream=True)
        for part in parts:
            header = pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            yield str(header.get("SOPInstanceUID", "")), partial(_write_bytes, bytes(part))

    def prefetch(self, refs: Iterable[DicomWebRef], series_rule: str, progress: bool = False) -> dict[DicomWebRef, str]:
        """Retrieve the preferred series of every reference, ``max_concurrency`` at a time.

        Returns:
            The references that failed, with the reason (the :class:`IngestError` text).
        """
        from tqdm.auto import tqdm

        def one(ref: DicomWebRef) -> tuple[DicomWebRef, str | None]:
            try:
                first = self.candidates(ref, series_rule)[0]
                self.fetch(ref.study_uid, first)
            except IngestError as exc:
                return ref, str(exc)
            return ref, None

        unique = list(dict.fromkeys(refs))
        failed: dict[DicomWebRef, str] = {}
        with (
            ThreadPoolExecutor(self.config.max_concurrency) as pool,
            tqdm(total=len(unique), desc="dicomweb", unit="series", disable=not progress) as bar,
        ):
            for ref, error in pool.map(one, unique):
                if error is not None:
                    failed[ref] = error
                bar.update(1)
        return failed


def _save_dataset(dataset: Any, path: Path) -> None:
    dataset.save_as(path, enforce_file_format=True)


def _write_bytes(data: bytes, path: Path) -> None:
    path.write_bytes(data)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)
