"""The synthetic lung sound: a WAV of breath-like noise with crackles whose rate grows with severity."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def write_lung_sound(
    path: str | Path,
    *,
    severity: float,
    rng: np.random.Generator,
    sample_rate: int = 4000,
    seconds: float = 3.0,
    channels: int = 1,
) -> Path:
    """Write a lung-sound WAV (PCM 16): breath-like band-passed noise plus crackles.

    Crackles are short damped oscillations, several times louder than the breath sound,
    arriving as a Poisson process whose rate (per second) is ``2 * exp(0.7 * severity)``.
    With two channels the second one hears the crackles fainter, with its own noise.

    Example:
        >>> import tempfile
        >>> import soundfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = write_lung_sound(Path(folder, "lung.wav"), severity=1.0, rng=np.random.default_rng(0),
        ...         sample_rate=8000)
        ...     info = soundfile.info(path)
        >>> info.samplerate, info.channels
        (8000, 1)
    """
    import soundfile
    from scipy.signal import butter, sosfilt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2, got {channels}")
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    sos = butter(4, [100.0, min(800.0, 0.45 * sample_rate)], btype="bandpass", fs=sample_rate, output="sos")
    breath_hz = rng.uniform(0.25, 0.45)
    envelope = 0.7 + 0.3 * np.sin(2 * np.pi * breath_hz * t + rng.uniform(0, 2 * np.pi))

    def breath() -> np.ndarray:
        x = sosfilt(sos, rng.normal(0.0, 1.0, size=n))
        return x / x.std() * envelope

    rate = 2.0 * math.exp(0.7 * severity)
    crackles = np.zeros(n)
    for _ in range(int(rng.poisson(rate * seconds))):
        start = int(rng.integers(0, n))
        freq = rng.uniform(250.0, min(1200.0, 0.4 * sample_rate))
        tau = rng.uniform(0.0015, 0.004)
        length = min(n - start, int(6 * tau * sample_rate) + 1)
        tt = np.arange(length) / sample_rate
        amplitude = rng.uniform(8.0, 14.0) * rng.choice([-1.0, 1.0])  # in units of the breath sound's std
        crackles[start : start + length] += amplitude * np.exp(-tt / tau) * np.cos(2 * np.pi * freq * tt)
    mix = [breath() + crackles]
    if channels == 2:
        mix.append(breath() + 0.6 * crackles)
    audio = np.stack(mix, axis=1)
    audio *= rng.uniform(0.5, 0.9) / max(1e-9, float(np.abs(audio).max()))
    soundfile.write(str(path), audio if channels == 2 else audio[:, 0], sample_rate, subtype="PCM_16", format="WAV")
    return path
