"""One encoder per modality; each turns a modality's arrays into ``(P, T, d_model)`` tokens with a mask and ages."""

from __future__ import annotations

from meddx.models.encoders.audio import AudioEncoder
from meddx.models.encoders.base import EncoderOutput, ModalityEncoder
from meddx.models.encoders.device_logs import DeviceLogEncoder
from meddx.models.encoders.ehr import EhrEncoder
from meddx.models.encoders.imaging import ImagingEncoder
from meddx.models.encoders.notes import NotesEncoder
from meddx.models.encoders.video import VideoEncoder
from meddx.records import Modality

ENCODERS: dict[Modality, type[ModalityEncoder]] = {
    Modality.IMAGING: ImagingEncoder,
    Modality.EHR: EhrEncoder,
    Modality.NOTES: NotesEncoder,
    Modality.DEVICE_LOGS: DeviceLogEncoder,
    Modality.AUDIO: AudioEncoder,
    Modality.VIDEO: VideoEncoder,
}

__all__ = [
    "ENCODERS",
    "AudioEncoder",
    "DeviceLogEncoder",
    "EhrEncoder",
    "EncoderOutput",
    "ImagingEncoder",
    "ModalityEncoder",
    "NotesEncoder",
    "VideoEncoder",
]
