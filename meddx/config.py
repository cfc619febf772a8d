"""Ingestion and tensor-shape configuration, one section per modality.

These are pydantic models so that a typo in a pipeline file or ``config.json`` fails
loudly (``extra="forbid"``) and so that JSON Schemas can be exported from them. The
defaults fit a 2-core CPU; larger shapes suit a GPU (see :meth:`IngestConfig.gpu`).
The config travels with a model (``config.json``) so inference reads files exactly as
training did. A config file (YAML or JSON, ``meddx ingest --config FILE``) is read with
:meth:`IngestConfig.from_file`; :meth:`IngestConfig.check` finds the values no reader can
use (a window whose lower bound exceeds its upper one, a non-positive duration or size)
before any file is read.
"""

from __future__ import annotations

import math
from datetime import tzinfo
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from meddx.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImagingConfig(_Section):
    """How DICOM series / NIfTI volumes become fixed-shape volumes."""

    spatial_size: tuple[int, int, int] = (32, 64, 64)  # (D, H, W) after resampling
    spacing_mm: tuple[float, float, float] | None = None  # (z, y, x); None keeps native spacing
    # Intensity window (lower, upper) per DICOM Modality, mapped to [0, 1].
    windows: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {"CT": (-1000.0, 1000.0), "default": (0.0, 0.0)}
    )
    # A window with equal bounds (like "default") means a robust window: these percentiles
    # of the image's own values. A lower bound above the upper one is refused.
    percentiles: tuple[float, float] = (0.5, 99.5)
    # Which `windows` entry NIfTI files use (they carry no DICOM Modality); None = "default".
    nifti_modality: str | None = None
    series_rule: Literal["most_slices", "first_uid"] = "most_slices"
    # Largest DICOM or NIfTI file read, in MiB (checked on disk before reading; each file of a folder).
    max_file_mb: float = Field(default=2048.0, gt=0)


class EhrConfig(_Section):
    """How FHIR resources become coded tokens and binned numeric features."""

    lookback_days: float = 365.0
    n_bins: int = 8  # time bins over the look-back window
    n_lab_features: int = 16  # the most frequent LOINC codes in the training rows
    max_codes: int = 64  # code tokens kept per patient (most recent first)
    code_vocab_size: int = 512  # codes kept in the fitted vocabulary (+ padding and OOV)
    # Largest FHIR Bundle JSON file read, in MiB (a Bundle is parsed whole). Bulk NDJSON files
    # are read line by line, never whole, and have no size limit.
    max_file_mb: float = Field(default=1024.0, gt=0)


class NotesConfig(_Section):
    """How clinician notes are tokenised and chunked."""

    text_model: str | None = None  # a Hugging Face model folder; None = bundled all-MiniLM-L6-v2
    max_length: int = 128  # tokens per chunk
    max_chunks: int = 4
    # What an undated file in a notes *folder* does (no date in its name, no "Date:" first line):
    # "drop" (default: a folder may collect notes written after the index time), "keep" (taken as
    # available at the index time), or "error". A file named directly in the manifest is always
    # taken as available at the index time, as the manifest contract says.
    undated: Literal["keep", "drop", "error"] = "drop"
    max_file_mb: float = Field(default=32.0, gt=0)  # largest note file read, in MiB (each file of a folder)


class DeviceLogConfig(_Section):
    """How monitor logs are resampled onto a fixed grid before the index time."""

    step_minutes: float = 1.0
    window_hours: float = 6.0
    max_channels: int = 8  # channels kept in the fitted vocabulary
    # Zone-less ISO 8601 timestamps are refused unless this says to read them as UTC, or
    # IngestConfig.site_timezone names the zone to read them in (assume_utc wins over it).
    assume_utc: bool = False
    max_file_mb: float = Field(default=1024.0, gt=0)  # largest log read, in MiB (parsed whole; .gz: decompressed)


class AudioConfig(_Section):
    """How audio becomes a fixed-duration log-mel spectrogram."""

    sample_rate: int = 4000
    duration_s: float = 4.0
    n_mels: int = 32
    n_fft: int = 256
    hop_length: int = 64
    # Also keep the fixed-duration waveform (array ``waveform``: 1-D, role ``values``), for an audio encoder
    # that reads samples (a Hugging Face audio model: docs/encoders.md). Off by default: it is larger.
    keep_waveform: bool = False
    max_file_mb: float = Field(default=1024.0, gt=0)  # largest audio file read, in MiB


class VideoConfig(_Section):
    """How video clips become a fixed number of frames."""

    n_frames: int = 16
    size: tuple[int, int] = (64, 64)  # (H, W)
    color: Literal["gray", "rgb"] = "gray"
    # Robust window for DICOM cine frames of more than 8 bits (8-bit frames are divided by 255).
    percentiles: tuple[float, float] = (0.5, 99.5)
    max_file_mb: float = Field(default=4096.0, gt=0)  # largest video or DICOM cine file read, in MiB


def _server_url(value: str | None, section: str, example: str, variables: str) -> str | None:
    """``value`` if it is an http(s) URL without credentials (they belong in the environment)."""
    if value is not None:
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{section}.url must be an http(s) URL like {example}")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                f"{section}.url must not carry credentials; put them in the environment variables named by {variables}"
            )
    return value


class DicomWebConfig(_Section):
    """Where ``dicomweb:`` manifest cells are fetched from (a PACS speaking DICOMweb).

    Credentials are never written here nor in the manifest: they are read from the
    environment variables this section names, and never reach a log, an error, a report
    or a cache key. A URL carrying ``user:password@`` is refused for that reason.
    """

    # Base URL of the DICOMweb service (e.g. "https://pacs.example.org/dicom-web");
    # None: read from the environment variable named by url_env.
    url: str | None = None
    url_env: str = "MEDDX_DICOMWEB_URL"
    username_env: str = "MEDDX_DICOMWEB_USER"  # unset: no authentication
    password_env: str = "MEDDX_DICOMWEB_PASSWORD"
    timeout_s: float = 30.0  # connect and read timeout of one request
    retries: int = 3  # extra tries on connection errors and HTTP 408/429/500/502/503/504
    backoff_s: float = 0.5  # waits grow as backoff_s * 2**(try - 1) between tries
    max_concurrency: int = 4  # series retrieved at once before the readers run
    # What one answer may hold or take (larger, slower: that row's error; the run goes on).
    deadline_s: float = 900.0  # longest one request may take, its whole answer included
    max_instance_mb: float = 2048.0  # largest instance retrieved (one WADO-RS part), in MiB
    max_series_mb: float = 16384.0  # largest series retrieved (one WADO-RS answer), in MiB
    max_json_mb: float = 16.0  # largest QIDO-RS answer read, in MiB (parsed whole: several times that in memory)
    follow_other_origins: bool = False  # follow redirects to another scheme/host/port (sent no credentials)
    # A retrieved series' PatientID must equal the row's patient_id; false only when the
    # manifest's patient_id is a pseudonym, not the PACS's PatientID.
    check_patient_id: bool = True
    # Where retrieved instances are kept (DICOM files under <server>/<study>/<series>/);
    # None: the "dicomweb" folder of the ingest cache.
    cache_dir: str | None = None

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, value: str | None) -> str | None:
        return _server_url(
            value, "dicomweb", "https://pacs.example.org/dicom-web", "dicomweb.username_env and dicomweb.password_env"
        )


class FhirServerConfig(_Section):
    """Where ``fhir:Patient/<id>`` manifest cells are read from (an EHR's FHIR REST API).

    Credentials are never written here nor in the manifest: HTTP basic auth from the variables
    ``username_env`` / ``password_env``, or a bearer token from ``token_env`` (it wins when set).
    They never reach a log, an error, a report or a cache key; a URL carrying ``user:password@``
    is refused for that reason.
    """

    # Base URL of the FHIR service (e.g. "https://ehr.example.org/fhir/R4"); None: from url_env.
    url: str | None = None
    url_env: str = "MEDDX_FHIR_URL"
    username_env: str = "MEDDX_FHIR_USER"  # unset: no basic auth
    password_env: str = "MEDDX_FHIR_PASSWORD"
    token_env: str = "MEDDX_FHIR_TOKEN"  # unset: no bearer token
    timeout_s: float = 30.0  # connect and read timeout of one request
    retries: int = 3  # extra tries on connection errors and HTTP 408/429/500/502/503/504
    backoff_s: float = 0.5  # waits grow as backoff_s * 2**(try - 1) between tries
    max_retry_after_s: float = 120.0  # a longer Retry-After is an error, not a wait
    max_concurrency: int = 4  # searches (and patients) in flight at once
    page_size: int = 200  # _count of each search page
    max_response_mb: float = Field(default=256.0, gt=0)  # largest answer read (one page, one NDJSON file)
    max_pages: int = 1000  # pages followed per search before giving up (a server that never stops)
    max_export_file_mb: float = Field(default=102400.0, gt=0)  # largest Bulk export file downloaded
    # Where answers are kept (JSON under <server>/); None: the "fhir" folder of the ingest cache.
    cache_dir: str | None = None

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, value: str | None) -> str | None:
        variables = "fhir.username_env and fhir.password_env, or fhir.token_env"
        return _server_url(value, "fhir", "https://ehr.example.org/fhir/R4", variables)


class IngestConfig(_Section):
    """Everything that decides the shape and meaning of the tensors."""

    imaging: ImagingConfig = Field(default_factory=ImagingConfig)
    ehr: EhrConfig = Field(default_factory=EhrConfig)
    notes: NotesConfig = Field(default_factory=NotesConfig)
    device_logs: DeviceLogConfig = Field(default_factory=DeviceLogConfig)
    audio: AudioConfig = Field(default_factory=AudioConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    dicomweb: DicomWebConfig = Field(default_factory=DicomWebConfig)
    fhir: FhirServerConfig = Field(default_factory=FhirServerConfig)
    # The IANA zone (e.g. "Europe/Berlin") of the site's clocks, for times written without a
    # zone: DICOM times without TimezoneOffsetFromUTC, zone-less device-log timestamps, dates
    # in note file names and headers, FHIR dates without a time. None: DICOM, notes and FHIR
    # dates read them as UTC; device logs refuse them (unless device_logs.assume_utc).
    site_timezone: str | None = None

    @field_validator("site_timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            _zone(value)
        return value

    def site_zone(self) -> tzinfo | None:
        """The :class:`zoneinfo.ZoneInfo` of ``site_timezone``, or None when it is not set.

        Example:
            >>> IngestConfig(site_timezone="Europe/Berlin").site_zone()
            zoneinfo.ZoneInfo(key='Europe/Berlin')
        """
        return _zone(self.site_timezone) if self.site_timezone is not None else None

    @classmethod
    def from_dict(cls, data: dict) -> IngestConfig:
        """Build a config from plain data, raising :class:`ConfigError` on any problem.

        Both the structure (unknown keys, wrong types) and the values (:meth:`check`) are
        validated.

        Example:
            >>> IngestConfig.from_dict({"video": {"n_frames": 8}}).video.n_frames
            8
        """
        if not isinstance(data, dict):
            raise ConfigError(f"an ingest config is a mapping of sections, got {type(data).__name__}")
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            lines = "\n".join(
                f"  - {'.'.join(str(part) for part in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigError(f"invalid ingest config; fix these and run again:\n{lines}") from None
        return config.check()

    @classmethod
    def from_file(cls, path: str | Path) -> IngestConfig:
        """Read a YAML (``.yaml``/``.yml``) or JSON (``.json``) ingest config file.

        Raises:
            ConfigError: the file is missing, unreadable, not YAML/JSON, or not a valid config;
                the message names the file.

        Example:
            >>> import tempfile
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     path = Path(folder, "ingest.yaml")
            ...     _ = path.write_text("imaging: {spatial_size: [64, 128, 128]}\\nsite_timezone: Europe/Berlin\\n")
            ...     config = IngestConfig.from_file(path)
            >>> config.imaging.spatial_size, config.site_timezone
            ((64, 128, 128), 'Europe/Berlin')
        """
        from meddx.config_files import read_config_data

        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".yaml", ".yml", ".json"):
            raise ConfigError(f"ingest config {path}: name a .yaml, .yml or .json file")
        data: Any = read_config_data(path, "ingest config")  # bounded: size, UTF-8, depth
        try:
            return cls.from_dict({} if data is None else data)
        except ConfigError as exc:
            raise ConfigError(f"ingest config {path}: {exc}") from None

    def problems(self) -> list[str]:
        """Values no reader can use, one sentence each (empty when the config is usable)."""
        found: list[str] = []

        def positive(name: str, *values: float) -> None:
            if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values):
                shown = values[0] if len(values) == 1 else values
                found.append(f"{name} must be positive, got {shown}")

        def percentiles(name: str, bounds: tuple[float, float]) -> None:
            if not 0 <= bounds[0] < bounds[1] <= 100:
                found.append(f"{name} must be (lower, upper) with 0 <= lower < upper <= 100, got {bounds}")

        imaging = self.imaging
        positive("imaging.spatial_size", *imaging.spatial_size)
        if imaging.spacing_mm is not None:
            positive("imaging.spacing_mm", *imaging.spacing_mm)
        for key, (lower, upper) in imaging.windows.items():
            if not (math.isfinite(lower) and math.isfinite(upper)) or lower > upper:
                found.append(
                    f"imaging.windows[{key!r}] is ({lower:g}, {upper:g}): write (lower, upper) with lower <= upper"
                    " (equal bounds ask for a percentile window)"
                )
        percentiles("imaging.percentiles", imaging.percentiles)
        positive("ehr.lookback_days", self.ehr.lookback_days)
        positive("ehr.n_bins", self.ehr.n_bins)
        positive("ehr.max_codes", self.ehr.max_codes)
        positive("ehr.code_vocab_size", self.ehr.code_vocab_size)
        if self.ehr.n_lab_features < 0:
            found.append(f"ehr.n_lab_features must be 0 or more, got {self.ehr.n_lab_features}")
        positive("notes.max_length", self.notes.max_length)
        positive("notes.max_chunks", self.notes.max_chunks)
        positive("device_logs.step_minutes", self.device_logs.step_minutes)
        positive("device_logs.window_hours", self.device_logs.window_hours)
        positive("device_logs.max_channels", self.device_logs.max_channels)
        audio = self.audio
        for name in ("sample_rate", "duration_s", "n_mels", "n_fft", "hop_length"):
            positive(f"audio.{name}", getattr(audio, name))
        positive("video.n_frames", self.video.n_frames)
        positive("video.size", *self.video.size)
        percentiles("video.percentiles", self.video.percentiles)
        positive("dicomweb.timeout_s", self.dicomweb.timeout_s)
        positive("dicomweb.max_concurrency", self.dicomweb.max_concurrency)
        for name in ("deadline_s", "max_instance_mb", "max_series_mb", "max_json_mb"):
            positive(f"dicomweb.{name}", getattr(self.dicomweb, name))
        if self.dicomweb.retries < 0 or self.dicomweb.backoff_s < 0:
            found.append("dicomweb.retries and dicomweb.backoff_s must be 0 or more")
        positive("fhir.timeout_s", self.fhir.timeout_s)
        positive("fhir.max_concurrency", self.fhir.max_concurrency)
        positive("fhir.page_size", self.fhir.page_size)
        positive("fhir.max_pages", self.fhir.max_pages)
        if self.fhir.retries < 0 or self.fhir.backoff_s < 0 or self.fhir.max_retry_after_s < 0:
            found.append("fhir.retries, fhir.backoff_s and fhir.max_retry_after_s must be 0 or more")
        return found

    def check(self) -> IngestConfig:
        """Raise :class:`ConfigError` listing every unusable value; return ``self`` when there is none.

        Example:
            >>> IngestConfig(audio=AudioConfig(duration_s=0.0)).check()
            Traceback (most recent call last):
            ...
            meddx.errors.ConfigError: the ingest config has 1 unusable value; fix it and run again:
              - audio.duration_s must be positive, got 0.0
        """
        found = self.problems()
        if found:
            n = len(found)
            lines = "\n".join(f"  - {p}" for p in found)
            noun = "value; fix it" if n == 1 else "values; fix them"
            raise ConfigError(f"the ingest config has {n} unusable {noun} and run again:\n{lines}")
        return self

    @classmethod
    def gpu(cls) -> IngestConfig:
        """Larger shapes for a GPU machine."""
        return cls(
            imaging=ImagingConfig(spatial_size=(64, 128, 128)),
            notes=NotesConfig(max_length=256, max_chunks=8),
            audio=AudioConfig(sample_rate=8000, duration_s=8.0, n_mels=64, n_fft=512, hop_length=128),
            video=VideoConfig(n_frames=32, size=(112, 112)),
        )


def _zone(name: str) -> tzinfo:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"site_timezone {name!r} is not an IANA time zone name; write it like 'Europe/Berlin' or 'UTC'"
        ) from None
