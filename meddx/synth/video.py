"""The synthetic video: a pulsating disc whose pulsation weakens with severity."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def write_pulse_video(
    path: str | Path,
    *,
    severity: float,
    rng: np.random.Generator,
    n_frames: int = 24,
    size: int = 64,
    fps: float = 12.0,
) -> Path:
    """Write a short clip of a pulsating bright disc on a dark background.

    The disc radius oscillates at a heart-rate-like 1-1.7 Hz with a relative amplitude of
    ``0.2 * exp(-0.45 * severity)``: the sicker the patient, the weaker the pulsation.
    ``.mp4`` files use the ``mp4v`` codec, ``.avi`` files ``MJPG`` (both deterministic
    and readable by opencv-python-headless); frames are written as 8-bit BGR.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = write_pulse_video(Path(folder, "echo.mp4"), severity=0.0, rng=np.random.default_rng(0))
        ...     import cv2
        ...     capture = cv2.VideoCapture(str(path))
        ...     frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        ...     capture.release()
        >>> frames > 0
        True
    """
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codecs = {".mp4": "mp4v", ".avi": "MJPG"}
    fourcc = codecs.get(path.suffix.lower())
    if fourcc is None:
        raise ValueError(f"video path must end in .mp4 or .avi, got {path.name!r}")
    r0 = size * rng.uniform(0.17, 0.24)
    amplitude = float(np.clip(0.2 * math.exp(-0.45 * severity) * rng.uniform(0.85, 1.15), 0.01, 0.45))
    freq, phase = rng.uniform(1.0, 1.7), rng.uniform(0.0, 2 * np.pi)
    cy, cx = size / 2 + rng.uniform(-3.0, 3.0, size=2)
    fg, bg = rng.uniform(170.0, 230.0), rng.uniform(15.0, 35.0)
    yy, xx = np.mgrid[0:size, 0:size]
    dist = np.hypot(yy - cy, xx - cx)

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), fps, (size, size), True)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {fourcc} video to {path}")
    try:
        for i in range(n_frames):
            radius = r0 * (1.0 + amplitude * math.sin(2 * np.pi * freq * i / fps + phase))
            edge = np.clip(radius - dist + 0.5, 0.0, 1.0)  # anti-aliased rim
            frame = bg + (fg - bg) * edge + rng.normal(0.0, 3.0, size=(size, size))
            gray = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
            writer.write(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    finally:
        writer.release()
    return path
