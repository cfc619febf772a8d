"""Audio ingestor: real WAVs from scipy's test data, formats, shapes and masks, resampling, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile

from meddx.config import AudioConfig, IngestConfig
from meddx.errors import ConfigError, IngestError
from meddx.ingest.audio import AudioIngestor, AudioTensorizer, n_frames, resampling_ratio
from meddx.ingest.base import IngestRequest
from meddx.ingest.registry import registered_ingestors
from meddx.records import Modality, PatientRecord, parse_time
from meddx.synth import write_lung_sound

INDEX = parse_time("2024-03-05T14:00:00Z")
CONFIG = IngestConfig(audio=AudioConfig(sample_rate=4000, duration_s=2.0, n_mels=16, n_fft=256, hop_length=64))
FRAMES = 1 + 8000 // 64  # 126


def scipy_wavs() -> list[Path]:
    import scipy

    folder = Path(scipy.__file__).parent / "io" / "tests" / "data"
    if not folder.is_dir():
        pytest.skip(f"this scipy wheel ships no test data at {folder}")
    return sorted(folder.glob("*.wav"))


@pytest.fixture(scope="module")
def reader() -> AudioIngestor:
    return AudioIngestor(CONFIG)


def read(reader: AudioIngestor, path: Path):
    return reader.read(IngestRequest("p1", INDEX, {Modality.AUDIO: path}))


def check_shapes(record) -> None:
    assert record.modality is Modality.AUDIO
    assert record.time is None
    assert record.arrays["log_mel"].shape == (16, FRAMES)
    assert record.arrays["log_mel"].dtype == np.float32
    assert record.arrays["frame_mask"].shape == (FRAMES,)
    assert record.arrays["frame_mask"].dtype == bool
    assert np.isfinite(record.arrays["log_mel"]).all()
    mask = record.arrays["frame_mask"]
    n_valid = int(mask.sum())
    assert n_valid >= 1
    assert mask[:n_valid].all()
    assert not mask[n_valid:].any()  # valid frames come first
    assert (record.arrays["log_mel"][:, ~mask] == 0).all()


# ---------------------------------------------------------------- files nobody here wrote


def test_every_scipy_wav_gives_a_spectrogram_or_an_ingest_error(reader: AudioIngestor) -> None:
    wavs = scipy_wavs()
    readable, ours = [], []
    for path in wavs:
        try:
            soundfile.read(path, dtype="float32", always_2d=True)
            readable.append(path.name)
        except soundfile.SoundFileError:
            pass
        try:
            record = read(reader, path)
        except IngestError as exc:
            assert exc.path == str(path)
            assert exc.modality == "audio"
            assert "soundfile" in exc.reason
            continue
        check_shapes(record)
        assert record.meta["orig_sample_rate"] > 0
        assert record.meta["subtype"]
        ours.append(path.name)
    assert len(readable) >= 16, f"soundfile reads only {len(readable)} of scipy's {len(wavs)} WAVs"
    assert set(readable) <= set(ours), f"soundfile reads these but meddx does not: {set(readable) - set(ours)}"
    assert len(ours) >= 16
    assert len(ours) < len(wavs)  # the deliberately broken ones (36-bit, no data chunk...) are refused


# ------------------------------------------------------------------ generated files


def tone(freq: float, rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([wave] * channels, axis=1).astype(np.float32)


@pytest.mark.parametrize(
    ("rate", "seconds", "channels", "subtype", "suffix"),
    [
        (8000, 0.5, 1, "PCM_16", ".wav"),  # short: padded
        (44100, 5.0, 2, "PCM_16", ".wav"),  # long stereo: centre-cropped
        (22050, 2.0, 1, "FLOAT", ".wav"),
        (16000, 1.0, 3, "PCM_U8", ".wav"),  # 8-bit unsigned, three channels
        (48000, 3.0, 2, "PCM_24", ".flac"),
        (4000, 2.0, 1, "PCM_32", ".wav"),  # already at the target rate
    ],
)
def test_shapes_and_masks_match_the_config(
    reader: AudioIngestor, tmp_path: Path, rate: int, seconds: float, channels: int, subtype: str, suffix: str
) -> None:
    path = tmp_path / f"clip{suffix}"
    soundfile.write(path, tone(440, rate, seconds, channels), rate, subtype=subtype)
    record = read(reader, path)
    check_shapes(record)
    real = min(int(round(seconds * 4000)), 8000)
    assert record.meta["n_valid_frames"] == int(record.arrays["frame_mask"].sum()) == 1 + real // 64
    assert record.meta["orig_channels"] == channels
    assert record.meta["orig_sample_rate"] == rate
    assert record.arrays["frame_mask"].all() == (seconds >= 2.0)
    PatientRecord("p1", INDEX).add(record)  # undated: available at the index time


def test_synthetic_lung_sounds_read_in_mono_and_stereo(reader: AudioIngestor, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mono = write_lung_sound(tmp_path / "mono.wav", severity=1.0, rng=rng, sample_rate=8000, seconds=3.0)
    stereo = write_lung_sound(tmp_path / "stereo.wav", severity=1.0, rng=rng, sample_rate=4000, seconds=1.0, channels=2)
    for path, channels, valid in ((mono, 1, FRAMES), (stereo, 2, 1 + 4000 // 64)):
        record = read(reader, path)
        check_shapes(record)
        assert record.meta["orig_channels"] == channels
        assert record.meta["n_valid_frames"] == valid


def test_resampling_keeps_a_tone_at_its_frequency() -> None:
    reader = AudioIngestor(IngestConfig())  # 4000 Hz
    for rate in (22050, 44100, 48000, 8000):
        wave = reader.resample(tone(440, rate, 2.0)[:, 0], rate)
        assert wave.dtype == np.float32
        assert abs(wave.shape[0] - 8000) <= 1
        spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.shape[0])))
        peak = np.fft.rfftfreq(wave.shape[0], 1 / 4000)[spectrum.argmax()]
        assert peak == pytest.approx(440.0, abs=1.0), rate
        assert np.abs(wave[400:-400]).max() == pytest.approx(0.5, abs=0.02)  # amplitude kept
    # a tone above the new Nyquist frequency (2 kHz) is filtered out, not aliased
    high = reader.resample(tone(3000, 22050, 1.0)[:, 0], 22050)
    assert np.abs(high[200:-200]).max() < 0.02
    assert reader.resample(tone(440, 22050, 1.0)[:, 0], 22050) is not None
    assert len(reader._resamplers) == 4  # one kernel per rate pair, reused


def test_the_mel_spectrum_peaks_at_the_band_of_the_tone(tmp_path: Path) -> None:
    import torchaudio

    config = IngestConfig(audio=AudioConfig(sample_rate=4000, duration_s=1.0, n_mels=32, n_fft=256, hop_length=64))
    path = tmp_path / "a440.wav"
    soundfile.write(path, tone(440, 22050, 1.0), 22050, subtype="PCM_16")
    record = AudioIngestor(config).read(IngestRequest("p1", INDEX, {Modality.AUDIO: path}))
    bands = torchaudio.functional.melscale_fbanks(129, 0.0, 2000.0, 32, 4000)  # (freqs, mels)
    bin_440 = round(440 / (4000 / 256))
    assert record.arrays["log_mel"][:, 5:-5].mean(axis=1).argmax() == int(bands[bin_440].argmax())


def test_keep_waveform_adds_the_samples_the_log_mel_was_computed_from(tmp_path: Path) -> None:
    """For an audio encoder that reads samples (docs/encoders.md): the fixed-length, resampled waveform."""
    config = IngestConfig(audio=AudioConfig(sample_rate=4000, duration_s=1.0, n_mels=8, keep_waveform=True))
    path = tmp_path / "short.wav"
    soundfile.write(path, tone(440, 8000, 0.5), 8000, subtype="FLOAT")
    reader = AudioIngestor(config)
    record = reader.read(IngestRequest("p1", INDEX, {Modality.AUDIO: path}))
    wave = record.arrays["waveform"]
    assert wave.shape == (4000,)
    assert wave.dtype == np.float32
    assert np.abs(wave[:1900]).max() > 0.4  # the tone, at 4 kHz
    assert not wave[2000:].any()  # zero past the real half second
    valid = record.arrays["frame_mask"]
    assert np.allclose(record.arrays["log_mel"][:, valid], reader.log_mel(wave)[:, valid])
    spec = AudioTensorizer(config).spec()
    assert spec["waveform"].shape == (4000,)
    assert spec["waveform"].role == "values"
    assert "waveform" not in AudioTensorizer(IngestConfig()).spec()  # off by default


def test_odd_sample_rates_resample_with_a_small_kernel() -> None:
    assert resampling_ratio(44100, 4000) == (441, 40)
    assert resampling_ratio(1234, 4000) == (617, 2000)
    orig, new = resampling_ratio(44101, 4000)
    assert max(orig, new) <= 2000
    assert abs(new / orig - 4000 / 44101) < 1e-6
    wave = AudioIngestor(IngestConfig()).resample(tone(440, 44101, 1.0)[:, 0], 44101)
    assert abs(wave.shape[0] - 4000) <= 1


def test_a_long_recording_is_centre_cropped(reader: AudioIngestor, tmp_path: Path) -> None:
    ramp = (np.arange(10 * 4000) / (10 * 4000)).astype(np.float32)  # 10 s at the target rate
    path = tmp_path / "ramp.wav"
    soundfile.write(path, ramp, 4000, subtype="FLOAT")
    wave, rate, meta, _ = reader.load(path)
    assert rate == 4000
    assert wave.shape == (8000,)
    assert meta["orig_frames"] == 40000
    np.testing.assert_allclose(wave[[0, -1]], ramp[[16000, 23999]])


def test_nan_samples_are_zeroed_and_reported(reader: AudioIngestor, tmp_path: Path) -> None:
    wave = tone(440, 4000, 2.0)
    wave[100:110] = np.nan
    wave[200] = np.inf
    path = tmp_path / "nan.wav"
    soundfile.write(path, wave, 4000, subtype="FLOAT")
    record = read(reader, path)
    check_shapes(record)
    assert record.meta["n_nonfinite"] == 11
    assert "NaN" in record.warnings[0]


# ------------------------------------------------------------------------- bad files


def test_bad_audio_files_raise_ingest_error_naming_the_file(reader: AudioIngestor, tmp_path: Path) -> None:
    good = tmp_path / "good.wav"
    soundfile.write(good, tone(440, 8000, 1.0), 8000, subtype="PCM_16")
    data = good.read_bytes()
    cases = {
        "empty.wav": b"",
        "header_cut.wav": data[:20],
        "text.wav": b"this is not audio at all\n" * 20,
        "noise.wav": bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)),
    }
    zero = tmp_path / "zero.wav"
    soundfile.write(zero, np.zeros((0, 1), dtype=np.float32), 8000, subtype="PCM_16")
    paths = [zero, tmp_path / "missing.wav", tmp_path]
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        paths.append(tmp_path / name)
    for path in paths:
        with pytest.raises(IngestError) as caught:
            read(reader, path)
        assert caught.value.path == str(path)
        assert caught.value.modality == "audio"
    with pytest.raises(IngestError, match="zero length"):
        read(reader, zero)
    with pytest.raises(IngestError, match="Format not recognised"):  # what soundfile said
        read(reader, tmp_path / "text.wav")


def test_a_truncated_wav_reads_what_is_there(reader: AudioIngestor, tmp_path: Path) -> None:
    good = tmp_path / "good.wav"
    soundfile.write(good, tone(440, 4000, 2.0), 4000, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(good.read_bytes()[: 44 + 2 * 4000])  # header + 1 s of the 2 s
    record = read(reader, cut)
    check_shapes(record)
    assert record.meta["n_valid_frames"] == 1 + 4000 // 64


# ---------------------------------------------------------------------- registry, config


def test_registered_reader_and_tensorizer(tmp_path: Path) -> None:
    cls = registered_ingestors()[Modality.AUDIO]
    assert cls is AudioIngestor
    assert cls.tensorizer_class is AudioTensorizer
    path = tmp_path / "a.wav"
    soundfile.write(path, tone(440, 8000, 1.0), 8000, subtype="PCM_16")
    record = cls(CONFIG).read(IngestRequest("p1", INDEX, {Modality.AUDIO: path}))
    tensorizer = AudioTensorizer(CONFIG).fit([record])
    arrays = tensorizer.transform(record)
    assert {k: (v.shape, str(v.dtype)) for k, v in arrays.items()} == {
        k: (shape, dtype) for k, (shape, dtype, *_) in tensorizer.spec().items()
    }
    with pytest.raises(ValueError, match="another config"):
        AudioTensorizer(IngestConfig()).transform(record)


def test_frame_count_formula_and_bad_configs() -> None:
    assert n_frames(AudioConfig()) == 1 + 16000 // 64
    assert n_frames(AudioConfig(sample_rate=8000, duration_s=8.0, hop_length=128)) == 501
    with pytest.raises(ConfigError):
        AudioIngestor(IngestConfig(audio=AudioConfig(n_mels=200, n_fft=256)))
    with pytest.raises(ConfigError):
        AudioIngestor(IngestConfig(audio=AudioConfig(duration_s=0.0)))
