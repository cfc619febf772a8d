"""The committed sample cohort is what `make sample-data` regenerates.

Every file is compared by its bytes except the videos: an encoder's output bytes change with the
OpenCV/FFmpeg build (its version string, muxer defaults) while the pictures stay the same, so the
videos are compared by their decoded frames, within ``VIDEO_TOLERANCE`` grey levels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from meddx.synth import generate_cohort

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
VIDEO_SUFFIXES = {".mp4", ".avi"}
# Mean absolute difference (of 255 grey levels) allowed in each decoded frame. An encoder of another
# build that quantizes a little differently stays far below it; a disc one pixel wider (~3.5), other
# noise (~3.4) or another clip do not.
VIDEO_TOLERANCE = 2.0


def files(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file()]


def decoded_frames(path: Path) -> np.ndarray:
    """Every frame of a video, as decoded by OpenCV (frames, height, width, 3), int16."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    frames = []
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(frame)
    finally:
        capture.release()
    assert frames, f"OpenCV decodes no frame of {path}"
    return np.stack(frames).astype(np.int16)


def video_differences(regenerated: Path, committed: Path) -> list[float]:
    """The mean absolute difference of each pair of decoded frames (same count and size asserted)."""
    new, old = decoded_frames(regenerated), decoded_frames(committed)
    assert new.shape == old.shape, f"{committed.name}: {new.shape} frames decoded, committed {old.shape}"
    return np.abs(new - old).mean(axis=(1, 2, 3)).tolist()


def test_sample_data_regenerates(tmp_path: Path) -> None:
    out = tmp_path / "sample_data"
    generate_cohort(out, n_patients=60, seed=7)  # as in `make sample-data`
    assert files(out) == files(SAMPLE)
    videos = 0
    for name in files(SAMPLE):
        new, old = out / name, SAMPLE / name
        if new.suffix in VIDEO_SUFFIXES:
            videos += 1
            worst = max(video_differences(new, old))
            assert worst <= VIDEO_TOLERANCE, f"{name}: a decoded frame differs by {worst:.2f} grey levels on average"
        else:
            assert hashlib.sha256(new.read_bytes()).digest() == hashlib.sha256(old.read_bytes()).digest(), name
    assert videos >= 10  # the cohort has its videos, so the frame comparison ran


def test_the_video_comparison_sees_a_changed_clip(tmp_path: Path) -> None:
    """The tolerance is tight enough to catch another clip of the same kind (another seed's)."""
    from meddx.synth import write_pulse_video

    committed = next(p for p in sorted(SAMPLE.rglob("echo.mp4")))
    other = write_pulse_video(tmp_path / "echo.mp4", severity=1.0, rng=np.random.default_rng(123))
    assert max(video_differences(other, committed)) > VIDEO_TOLERANCE
