"""Audio (auscultation, cough, voice): a fixed-duration log-mel spectrogram with a frame mask.

Any file soundfile (libsndfile) reads is accepted: WAV (8/16/24/32-bit integer, float,
u-law/A-law, RF64, WAVEX), FLAC, OGG..., at a sample rate from 500 Hz to 1 MHz and with
1 to 64 channels; a header outside those bounds is corrupt or forged and refused
(:func:`check_header`), as are files over ``AudioConfig.max_file_mb`` and paths that are
not regular files. The steps:

1. read with soundfile as float32, only the centred ``duration_s`` of a longer recording;
2. mix to mono (mean over channels, block by block); NaN/inf samples (float files) are set to 0, counted
   in ``meta["n_nonfinite"]`` and reported in ``record.warnings``;
3. resample to ``AudioConfig.sample_rate`` with torchaudio's windowed-sinc resampler (see
   :meth:`AudioIngestor.resample`);
4. centre-crop or zero-pad (at the end) to ``n_samples = round(duration_s * sample_rate)``;
5. ``MelSpectrogram(n_fft, hop_length, n_mels, center=True)`` power spectrogram, then
   ``AmplitudeToDB`` (10 log10, floor -100 dB, no per-file ``top_db`` clipping, so levels
   compare across files).

Shapes (:func:`n_frames`): ``log_mel`` float32 ``(n_mels, n_frames)`` and ``frame_mask`` bool
``(n_frames,)`` with ``n_frames = 1 + n_samples // hop_length`` (torch's centred STFT).
Frame ``i`` is centred on sample ``i * hop_length``; it is valid when that centre lies in
the real audio or on its end (``i * hop_length <= n_real``), so ``1 + n_real // hop_length``
frames are valid and a full-length clip has every frame valid. Invalid frames hold 0 in
``log_mel``.

With ``AudioConfig.keep_waveform`` the record also holds ``waveform`` float32 ``(n_samples,)``
(role ``values``, one axis): the resampled, fixed-length samples of step 4, zero past the real audio.

Recordings are undated: ``record.time`` is None (available at the index time).
"""

from __future__ import annotations

import logging
import math
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meddx.config import AudioConfig, IngestConfig
from meddx.errors import ConfigError, IngestError
from meddx.ingest.base import ArrayTensorizer, Ingestor, IngestRequest, register_ingestor
from meddx.ingest.file_checks import check_source
from meddx.records import Modality, ModalityRecord
from meddx.specs import ArrayField, ArraySpec

if TYPE_CHECKING:  # torch/torchaudio are imported lazily: they cost seconds at CLI start
    import torch

logger = logging.getLogger(__name__)

_MODALITY = Modality.AUDIO.value
# Both terms of the resampling ratio are kept at or below this. Every standard rate pair
# (8, 11.025, 16, 22.05, 44.1, 48, 96 kHz...) is exact; an odd rate such as 44101 Hz is
# approximated to < 1e-6 relative, which keeps torchaudio's kernel (ratio terms squared) small.
_MAX_RATIO_TERM = 2000
MIN_SAMPLE_RATE = 500  # Hz; the bounds of a plausible header (see check_header)
MAX_SAMPLE_RATE = 1_000_000
MAX_CHANNELS = 64
_BLOCK_FRAMES = 1 << 16


def check_header(path: Path, sample_rate: int, channels: int) -> None:
    """Refuse a header no real recording has (a corrupt or forged file).

    Sample rates from :data:`MIN_SAMPLE_RATE` (500 Hz) to :data:`MAX_SAMPLE_RATE` (1 MHz)
    and 1 to :data:`MAX_CHANNELS` (64) channels are accepted: that covers phonocardiograms
    and telephony at the low end, ultrasonic and high-resolution recorders at the top, and
    microphone arrays.

    Raises:
        IngestError: the rate or channel count is outside those bounds.

    Example:
        >>> check_header(Path("lung.wav"), 4000, 1)
    """
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise IngestError(
            path,
            _MODALITY,
            f"the header claims a sample rate of {sample_rate} Hz, outside the "
            f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz of real recordings: a corrupt or forged header; "
            "re-export the file",
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise IngestError(
            path,
            _MODALITY,
            f"the header claims {channels} channels, outside 1-{MAX_CHANNELS}: a corrupt or forged "
            "header; re-export the file",
        )


def _read_mono(sound: Any, frames: int) -> np.ndarray:
    """Up to ``frames`` frames from the current position, mixed to mono block by block.

    Reading all channels at once would hold ``frames x channels`` floats; blocks keep the
    memory to the mono result.
    """
    out = np.empty(frames, dtype=np.float32)
    done = 0
    while done < frames:
        block = sound.read(min(_BLOCK_FRAMES, frames - done), dtype="float32", always_2d=True)  # (t, channels)
        if block.shape[0] == 0:
            break
        mono = block[:, 0].copy()  # summing columns is ~30x faster than mean(axis=1)
        for channel in range(1, block.shape[1]):
            mono += block[:, channel]
        if block.shape[1] > 1:
            mono /= block.shape[1]
        out[done : done + mono.shape[0]] = mono
        done += mono.shape[0]
    return out[:done]


def n_samples(config: AudioConfig) -> int:
    """Samples of the fixed-duration waveform: ``round(duration_s * sample_rate)``."""
    return int(round(config.duration_s * config.sample_rate))


def n_frames(config: AudioConfig) -> int:
    """Spectrogram frames: ``1 + n_samples // hop_length`` (centred STFT).

    Example:
        >>> n_frames(AudioConfig(sample_rate=4000, duration_s=4.0, hop_length=64))
        251
    """
    return 1 + n_samples(config) // config.hop_length


def resampling_ratio(orig_rate: int, new_rate: int) -> tuple[int, int]:
    """``(orig, new)`` in lowest terms, both at most 2000 (approximated beyond that).

    Example:
        >>> resampling_ratio(44100, 4000), resampling_ratio(8000, 4000)
        ((441, 40), (2, 1))
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    if new_rate >= orig_rate:  # upsampling: bound the larger term, new
        frac = Fraction(orig_rate, new_rate).limit_denominator(_MAX_RATIO_TERM)
        return max(frac.numerator, 1), frac.denominator
    frac = Fraction(new_rate, orig_rate).limit_denominator(_MAX_RATIO_TERM)
    return frac.denominator, max(frac.numerator, 1)


class AudioTensorizer(ArrayTensorizer):
    """The spectrogram and frame mask the ingestor wrote, checked against the config."""

    modality = Modality.AUDIO

    def spec(self) -> ArraySpec:
        frames = n_frames(self.config.audio)
        spec = {
            "log_mel": ArrayField((self.config.audio.n_mels, frames), "float32", "values"),
            "frame_mask": ArrayField((frames,), "bool", "mask", of=("log_mel",), axis=1),
        }
        if self.config.audio.keep_waveform:
            spec["waveform"] = ArrayField((n_samples(self.config.audio),), "float32", "values")
        return spec


@register_ingestor
class AudioIngestor(Ingestor):
    """Reads an audio file into a fixed-duration log-mel spectrogram.

    The resampling kernels (one per rate pair) and the mel transform are built on first
    use and kept on the instance, which is reused for many files.

    Example:
        >>> from meddx.records import parse_time
        >>> reader = AudioIngestor()
        >>> record = reader.read(IngestRequest("P0001", parse_time("2024-12-03T08:27:00Z"),
        ...                                    {Modality.AUDIO: Path("sample_data/patients/P0001/lung_sound.wav")}))
        >>> record.arrays["log_mel"].shape, record.arrays["frame_mask"].shape
        ((32, 251), (251,))
    """

    modality = Modality.AUDIO
    tensorizer_class = AudioTensorizer

    def __init__(self, config: IngestConfig | None = None):
        super().__init__(config)
        self._resamplers: dict[tuple[int, int], torch.nn.Module] = {}
        self._mel: torch.nn.Module | None = None
        audio = self.config.audio
        if audio.sample_rate <= 0 or audio.duration_s <= 0 or audio.hop_length <= 0 or audio.n_fft <= 1:
            raise ConfigError(f"audio: sample_rate, duration_s, hop_length and n_fft must be positive, got {audio}")
        if n_samples(audio) <= audio.n_fft // 2:
            raise ConfigError(
                f"audio: duration_s={audio.duration_s} is shorter than half an FFT window (n_fft={audio.n_fft})"
            )
        if audio.n_mels > audio.n_fft // 2 + 1:
            raise ConfigError(
                f"audio: n_mels={audio.n_mels} exceeds the n_fft // 2 + 1 = {audio.n_fft // 2 + 1} FFT bins"
            )

    # ----------------------------------------------------------------- building blocks

    def load(self, path: Path) -> tuple[np.ndarray, int, dict[str, Any], list[str]]:
        """Read a file as a mono float32 waveform at its own rate.

        Only the centred ``duration_s`` (at the file's rate) of a longer file is read.

        Returns:
            ``(waveform (T,), sample_rate, meta, warnings)``.

        Raises:
            IngestError: soundfile cannot read the file, or it holds no samples.

        Example:
            >>> wave, rate, meta, warnings = AudioIngestor().load(Path("sample_data/patients/P0001/lung_sound.wav"))
            >>> wave.shape, rate, warnings
            ((20000,), 8000, [])
        """
        import soundfile

        check_source(path, _MODALITY, max_file_mb=self.config.audio.max_file_mb, expected="one file (WAV, FLAC...)")
        try:
            with soundfile.SoundFile(path) as sound:
                rate, channels, frames = sound.samplerate, sound.channels, sound.frames
                check_header(path, rate, channels)
                meta: dict[str, Any] = {
                    "orig_sample_rate": int(rate),
                    "orig_channels": int(channels),
                    "orig_frames": int(frames),
                    "format": sound.format,
                    "subtype": sound.subtype,
                }
                wanted = math.ceil(self.config.audio.duration_s * rate)
                if frames > wanted and sound.seekable():
                    sound.seek((frames - wanted) // 2)
                wave = _read_mono(sound, wanted)  # (T,)
        except (soundfile.SoundFileError, RuntimeError, ValueError, TypeError, OSError) as exc:
            raise IngestError(path, _MODALITY, f"soundfile cannot read it ({exc}); convert it to WAV or FLAC") from None
        if wave.shape[0] == 0:
            raise IngestError(path, _MODALITY, "the file holds no audio samples (zero length)")
        warnings: list[str] = []
        bad = ~np.isfinite(wave)
        meta["n_nonfinite"] = int(bad.sum())
        if meta["n_nonfinite"]:
            wave[bad] = 0.0
            warnings.append(f"{meta['n_nonfinite']} NaN/inf samples set to 0")
            logger.warning("audio %s: %d NaN/inf samples set to 0", path, meta["n_nonfinite"])
        return wave, int(rate), meta, warnings

    def resample(self, wave: np.ndarray, orig_rate: int) -> np.ndarray:
        """Resample a mono waveform to ``config.audio.sample_rate`` (torchaudio, windowed sinc).

        Example:
            >>> tone = np.sin(2 * np.pi * 440 * np.arange(22050) / 22050).astype(np.float32)
            >>> AudioIngestor().resample(tone, 22050).shape
            (4000,)
        """
        import torch

        new_rate = self.config.audio.sample_rate
        if orig_rate == new_rate:
            return np.asarray(wave, dtype=np.float32)
        resampler = self._resamplers.get((orig_rate, new_rate))
        if resampler is None:
            from torchaudio.transforms import Resample

            orig, new = resampling_ratio(orig_rate, new_rate)
            resampler = Resample(orig_freq=orig, new_freq=new)
            self._resamplers[(orig_rate, new_rate)] = resampler
        with torch.inference_mode():
            out = resampler(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)))
        return out.numpy()

    def fix_length(self, wave: np.ndarray) -> tuple[np.ndarray, int]:
        """Centre-crop or zero-pad to :func:`n_samples`; returns ``(wave, n_real_samples)``."""
        target = n_samples(self.config.audio)
        if wave.shape[0] >= target:
            start = (wave.shape[0] - target) // 2
            return wave[start : start + target], target
        out = np.zeros(target, dtype=np.float32)
        out[: wave.shape[0]] = wave
        return out, int(wave.shape[0])

    def log_mel(self, wave: np.ndarray) -> np.ndarray:
        """Log-mel spectrogram ``(n_mels, n_frames)`` in dB of a fixed-length waveform."""
        import torch

        if self._mel is None:
            from torchaudio.transforms import AmplitudeToDB, MelSpectrogram

            audio = self.config.audio
            self._mel = torch.nn.Sequential(
                MelSpectrogram(
                    sample_rate=audio.sample_rate,
                    n_fft=audio.n_fft,
                    hop_length=audio.hop_length,
                    n_mels=audio.n_mels,
                    center=True,
                    power=2.0,
                ),
                AmplitudeToDB(stype="power", top_db=None),
            )
        with torch.inference_mode():
            return self._mel(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))).numpy()

    # ---------------------------------------------------------------------------- read

    def read(self, request: IngestRequest) -> ModalityRecord:
        path = Path(request.paths[self.modality])
        wave, rate, meta, warnings = self.load(path)
        wave, n_real = self.fix_length(self.resample(wave, rate))
        spectrogram = self.log_mel(wave)  # (n_mels, n_frames)
        frames = n_frames(self.config.audio)
        frame_mask = np.arange(frames) * self.config.audio.hop_length <= n_real  # (n_frames,)
        spectrogram[:, ~frame_mask] = 0.0
        meta.update(
            sample_rate=self.config.audio.sample_rate,
            duration_s=self.config.audio.duration_s,
            n_valid_frames=int(frame_mask.sum()),
        )
        arrays = {"log_mel": spectrogram.astype(np.float32, copy=False), "frame_mask": frame_mask}
        if self.config.audio.keep_waveform:
            arrays["waveform"] = np.asarray(wave, dtype=np.float32)
        return ModalityRecord(
            modality=Modality.AUDIO,
            source=str(path),
            arrays=arrays,
            time=None,
            meta=meta,
            warnings=warnings,
        )
