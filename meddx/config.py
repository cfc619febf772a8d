"""Ingestion and tensor-shape configuration, one section per modality.

These are pydantic models so that a typo in a pipeline file or ``config.json`` fails
loudly (``extra="forbid"``) and so that JSON Schemas can be exported from them. The
defaults fit a 2-core CPU; larger shapes suit a GPU (see :meth:`IngestConfig.gpu`).
The config travels with a model (``config.json``) so inference reads files exactly as
training did.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    # A window whose upper bound is not above its lower bound (like "default") means a robust
    # window: these percentiles of the image's own values.
    percentiles: tuple[float, float] = (0.5, 99.5)
    # Which `windows` entry NIfTI files use (they carry no DICOM Modality); None = "default".
    nifti_modality: str | None = None
    series_rule: Literal["most_slices", "first_uid"] = "most_slices"
    # Largest DICOM or NIfTI file read, in MiB (checked on disk before reading; each file of a folder).
    max_file_mb: float = Field(2048.0, gt=0)


class EhrConfig(_Section):
    """How FHIR resources become coded tokens and binned numeric features."""

    lookback_days: float = 365.0
    n_bins: int = 8  # time bins over the look-back window
    n_lab_features: int = 16  # the most frequent LOINC codes in the training rows
    max_codes: int = 64  # code tokens kept per patient (most recent first)
    code_vocab_size: int = 512  # codes kept in the fitted vocabulary (+ padding and OOV)
    # Largest FHIR Bundle JSON file read, in MiB (a Bundle is parsed whole). Bulk NDJSON files
    # are read line by line, never whole, and have no size limit.
    max_file_mb: float = Field(1024.0, gt=0)


class NotesConfig(_Section):
    """How clinician notes are tokenised and chunked."""

    text_model: str | None = None  # a Hugging Face model folder; None = bundled all-MiniLM-L6-v2
    max_length: int = 128  # tokens per chunk
    max_chunks: int = 4
    max_file_mb: float = Field(32.0, gt=0)  # largest note file read, in MiB (each file of a folder)


class DeviceLogConfig(_Section):
    """How monitor logs are resampled onto a fixed grid before the index time."""

    step_minutes: float = 1.0
    window_hours: float = 6.0
    max_channels: int = 8  # channels kept in the fitted vocabulary
    # Zone-less ISO 8601 timestamps are refused unless this says to read them as UTC.
    assume_utc: bool = False
    max_file_mb: float = Field(1024.0, gt=0)  # largest log file read, in MiB (the file is parsed whole)


class AudioConfig(_Section):
    """How audio becomes a fixed-duration log-mel spectrogram."""

    sample_rate: int = 4000
    duration_s: float = 4.0
    n_mels: int = 32
    n_fft: int = 256
    hop_length: int = 64
    max_file_mb: float = Field(1024.0, gt=0)  # largest audio file read, in MiB


class VideoConfig(_Section):
    """How video clips become a fixed number of frames."""

    n_frames: int = 16
    size: tuple[int, int] = (64, 64)  # (H, W)
    color: Literal["gray", "rgb"] = "gray"
    # Robust window for DICOM cine frames of more than 8 bits (8-bit frames are divided by 255).
    percentiles: tuple[float, float] = (0.5, 99.5)
    max_file_mb: float = Field(4096.0, gt=0)  # largest video or DICOM cine file read, in MiB


class IngestConfig(_Section):
    """Everything that decides the shape and meaning of the tensors."""

    imaging: ImagingConfig = Field(default_factory=ImagingConfig)
    ehr: EhrConfig = Field(default_factory=EhrConfig)
    notes: NotesConfig = Field(default_factory=NotesConfig)
    device_logs: DeviceLogConfig = Field(default_factory=DeviceLogConfig)
    audio: AudioConfig = Field(default_factory=AudioConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)

    @classmethod
    def from_dict(cls, data: dict) -> "IngestConfig":
        """Build a config from plain data, raising :class:`ConfigError` on any problem.

        Example:
            >>> IngestConfig.from_dict({"video": {"n_frames": 8}}).video.n_frames
            8
        """
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"invalid ingest config: {exc}") from None

    @classmethod
    def gpu(cls) -> "IngestConfig":
        """Larger shapes for a GPU machine."""
        return cls(
            imaging=ImagingConfig(spatial_size=(64, 128, 128)),
            notes=NotesConfig(max_length=256, max_chunks=8),
            audio=AudioConfig(sample_rate=8000, duration_s=8.0, n_mels=64, n_fft=512, hop_length=128),
            video=VideoConfig(n_frames=32, size=(112, 112)),
        )
