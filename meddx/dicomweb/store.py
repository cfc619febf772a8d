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

**Streaming and limits.** The WADO-RS answer is split into instances as its bytes arrive
(:mod:`meddx.dicomweb.multipart`), each written to a file in the series' staging folder: a
series never sits in memory. Instances, series and QIDO-RS answers are held to
``dicomweb.max_instance_mb``, ``max_series_mb`` and ``max_json_mb``, each request to
``deadline_s`` (:mod:`meddx.dicomweb.guard`); a broken or hostile answer is an
:class:`~meddx.errors.IngestError` for that reference, and nothing of it is stored.

**Identity.** Every instance retrieved must carry the StudyInstanceUID and SeriesInstanceUID
asked for, and one PatientID for the whole series; otherwise nothing is stored. When a row
asks for a series (:meth:`SeriesStore.fetch` with ``patient_id``), the stored series'
PatientID must equal the row's ``patient_id`` (unless ``dicomweb.check_patient_id`` is off),
as a folder on disk must not mix patients. The IDs are compared, never logged or shown.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Generator, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import pydicom

from meddx.config import DicomWebConfig
from meddx.dicomweb.client import connect, describe_failure, open_session, server_url
from meddx.dicomweb.ref import DicomWebRef, is_uid, server_id
from meddx.errors import ConfigError, IngestError, short_reason
from meddx.files import folder_mode, write_atomic

if TYPE_CHECKING:
    from dicomweb_client import DICOMwebClient

    from meddx.dicomweb.guard import GuardedSession

logger = logging.getLogger(__name__)

_IMAGING = "imaging"
# Series of these modalities hold no image to read (reports, key objects, presentation states...).
NON_IMAGE_MODALITIES = frozenset(
    {"SR", "KO", "PR", "DOC", "REG", "FID", "RTSTRUCT", "RTPLAN", "RTRECORD", "PLAN", "AU", "ECG", "HD"}
)
# WADO-RS: the instances in the transfer syntax the server holds
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_HEADER_TAGS = ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID"]
_SERIES_FIELDS = ["Modality", "NumberOfSeriesRelatedInstances", "SeriesDate", "SeriesTime"]


@dataclass(frozen=True)
class SeriesEntry:
    """One series of a study, as QIDO-RS describes it."""

    series_uid: str
    modality: str
    n_instances: int


def _tag(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _count(value: Any) -> int:
    """NumberOfSeriesRelatedInstances as sent (a number, or a numeric string); 0 when it is neither."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    text = str(value or "").strip()
    return int(text) if text.isdigit() else 0


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

    The session is made on first use, so a run whose series are all stored makes no request.

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
        self._session: GuardedSession | None = None
        self._client: DICOMwebClient | None = None

    @property
    def session(self) -> GuardedSession:
        """The session meddx's own reads use (limits, deadline, redirects; see :mod:`meddx.dicomweb.guard`)."""
        if self._session is None:
            self._session = open_session(self.config, self.url)
        return self._session

    @property
    def client(self) -> DICOMwebClient:
        """A ``dicomweb-client`` on a guarded session, for STOW-RS (the SRs go back through it)."""
        if self._client is None:
            self._client = connect(self.config, self.url)
        return self._client

    def _fail(self, ref: DicomWebRef | str, exc: BaseException) -> IngestError:
        return IngestError(str(ref), _IMAGING, describe_failure(exc, self.config, self.url))

    # ----------------------------------------------------------------- which series

    def study_series(self, study_uid: str) -> list[SeriesEntry]:
        """The study's series, from ``series.json`` when stored, else by QIDO-RS (then stored).

        Raises:
            IngestError: the server cannot be reached, refused, knows no such study, or sent
                an answer over ``dicomweb.max_json_mb``, too slow or not DICOM JSON.
        """
        import requests

        from meddx.dicomweb.guard import AnswerError, get_json

        listing = self.root / study_uid / "series.json"
        if listing.is_file():
            items = json.loads(listing.read_text())
        else:
            try:
                items = get_json(
                    self.session, f"{self.url}/studies/{study_uid}/series", {"includefield": _SERIES_FIELDS}
                )
            except (requests.RequestException, AnswerError) as exc:
                raise self._fail(f"dicomweb:studies/{study_uid}", exc) from None
            if not items:
                raise IngestError(
                    f"dicomweb:studies/{study_uid}", _IMAGING, "the DICOMweb server has no series in this study"
                )
            write_atomic(listing, json.dumps(items, sort_keys=True))
        entries = []
        for item in items:
            uid = str(_tag(item, "0020000E") or "")
            if is_uid(uid):
                entries.append(SeriesEntry(uid, str(_tag(item, "00080060") or ""), _count(_tag(item, "00201209"))))
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

    def fetch(self, study_uid: str, series_uid: str, patient_id: str | None = None) -> Path:
        """The series' folder, retrieving the series by WADO-RS first unless it is stored.

        Instances are streamed to files as they arrive (a series never sits in memory whole).

        Args:
            study_uid: the StudyInstanceUID.
            series_uid: the SeriesInstanceUID.
            patient_id: the row's patient; when given (and ``dicomweb.check_patient_id`` is on),
                the series' PatientID must be this one.

        Raises:
            IngestError: the server cannot be reached, refused, has no such series, sent
                something that is not DICOM, an answer over a limit or past the deadline,
                instances of another study or series or of several patients; or the series
                belongs to another patient than the row's.
        """
        target = self.folder(study_uid, series_uid)
        if not target.is_dir():
            self._retrieve(study_uid, series_uid, target)
        if patient_id is not None and self.config.check_patient_id:
            self._check_patient(target, DicomWebRef(study_uid, series_uid), patient_id)
        return target

    def _retrieve(self, study_uid: str, series_uid: str, target: Path) -> None:
        """WADO-RS the series into a staging folder, check each instance, then rename it to ``target``."""
        import requests

        from meddx.dicomweb.guard import AnswerError, open_answer

        ref = DicomWebRef(study_uid, series_uid)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{series_uid}.staging-"))
        os.chmod(staging, folder_mode())  # mkdtemp makes it 0700; the series folder is shared like the cache
        try:
            n = 0
            patients: set[str] = set()  # compared, never logged or kept: PatientID identifies a person
            url = f"{self.url}/studies/{study_uid}/series/{series_uid}"
            with (
                open_answer(self.session, url, AS_STORED) as response,
                closing(self._parts(response, staging)) as parts,
            ):
                for n, part in enumerate(parts, 1):
                    header = pydicom.dcmread(part, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
                    _check_instance(header, ref, patients)
                    sop_uid = str(header.get("SOPInstanceUID", ""))
                    name = f"{sop_uid}.dcm" if is_uid(sop_uid) else f"instance-{n:06d}.dcm"
                    os.replace(part.name, staging / name)
            if n == 0:
                raise IngestError(str(ref), _IMAGING, "the DICOMweb server returned no instances for this series")
            try:
                os.rename(staging, target)
            except OSError:  # another worker stored it meanwhile: theirs is complete too
                if not target.is_dir():
                    raise
            logger.debug("dicomweb: stored a series of %d instance(s)", n)
        except (requests.RequestException, AnswerError) as exc:
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

    def _parts(self, response: Any, staging: Path) -> Generator[BinaryIO, None, None]:
        """The answer's instances as files in ``staging`` (``part-<n>.part``), each yielded open once complete.

        The bytes are the parts' content as the server sent them (its Part 10 files), never
        parsed and re-encoded. A single ``application/dicom`` body (not wrapped) is one instance.
        """
        from meddx.dicomweb.guard import AnswerError, read_capped
        from meddx.dicomweb.multipart import boundary_of, write_parts, write_whole

        limits = self.session.limits
        where = limits.where
        body = read_capped(response, limits.series_bytes, "one series", "dicomweb.max_series_mb", where)
        content_type = response.headers.get("Content-Type", "")
        boundary = boundary_of(content_type)
        if boundary is not None:
            yield from write_parts(body, boundary, staging, limits.instance_bytes, where)
        elif content_type.lower().startswith(("application/dicom", "multipart/related")):
            # one part, not wrapped (or multipart without a boundary: some servers send one part so)
            yield from write_whole(body, staging / "part-000001.part", limits.instance_bytes, where)
        else:
            shown = " ".join(content_type.split(";")[0].split())[:60] or "none"
            raise AnswerError(
                f"the DICOMweb server at {where} answered WADO-RS with Content-Type {shown},"
                " not multipart/related DICOM instances"
            )

    def _check_patient(self, folder: Path, ref: DicomWebRef, patient_id: str) -> None:
        """The stored series' PatientID (one for the whole series, checked when stored) must be the row's."""
        first = min(folder.glob("*.dcm"), default=None)
        if first is None:
            return
        header = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["PatientID"])
        if str(header.get("PatientID", "") or "").strip() != patient_id.strip():
            raise IngestError(
                str(ref),
                _IMAGING,
                "the retrieved series belongs to another patient: its PatientID is not the row's patient_id"
                " (neither is shown); check the manifest row's patient_id and reference (set"
                " dicomweb.check_patient_id to false only when patient_id is a pseudonym)",
            )

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
            except ConfigError:
                raise
            except Exception as exc:  # one reference's trouble never stops the run
                return ref, str(IngestError(str(ref), _IMAGING, f"{type(exc).__name__}: {short_reason(exc)}"))
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


def _check_instance(header: pydicom.Dataset, ref: DicomWebRef, patients: set[str]) -> None:
    """A retrieved instance must be of the study and series asked for, and of the series' one patient.

    Raises:
        IngestError: it is not (the UIDs and IDs are not shown).
    """
    for keyword, wanted in (("StudyInstanceUID", ref.study_uid), ("SeriesInstanceUID", ref.series_uid)):
        if str(header.get(keyword, "") or "").strip() != wanted:
            raise IngestError(
                str(ref),
                _IMAGING,
                f"the DICOMweb server sent an instance whose {keyword} is not the one asked for; the series was not"
                " stored (check the PACS: it answered for another study or series)",
            )
    patients.add(str(header.get("PatientID", "") or "").strip())
    if len(patients) > 1:
        raise IngestError(
            str(ref),
            _IMAGING,
            "the retrieved series holds instances of more than one PatientID (another patient's mixed in);"
            " the series was not stored",
        )
