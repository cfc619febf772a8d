"""Site shifts for the synthetic cohort: one modality generated the way another site would."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CtKernel = Literal["standard", "sharp"]
NoteTemplate = Literal["ed", "ward"]


@dataclass(frozen=True)
class Shift:
    """How a cohort differs from the default site (the default ``Shift()`` changes nothing).

    Each field moves one modality only; the hidden severities, labels, splits and every
    other modality's files stay the same as for the same seed without the shift.

    Attributes:
        ct_kernel: ``"sharp"`` reconstructs the CT with a sharp (bone/lung) kernel: the
            in-plane texture is edge-enhanced and the voxel noise about three times as
            strong, and ``ConvolutionKernel`` names it (``"standard"``: the default soft one).
        ct_slice_thickness: slice thickness and spacing in mm (default: 5 or 6 mm per
            series); the lesion keeps its size in mm, so it covers other slices.
        device_interval_s: the monitor's sampling interval in seconds (default 60); the
            same hours before the index time are covered.
        device_offset: a calibration offset added to every monitor value (heart_rate in
            bpm, spo2 in % (still capped at 100), resp_rate per minute).
        note_template: ``"ward"`` writes the notes as a ward-round SOAP note (other
            headings and sentence forms, same findings); ``"ed"`` is the default.
        age_range: ``(youngest, oldest)`` ages in years, both included (default 22-90);
            ages show in the manifest and in the FHIR Patient's birth date.
    """

    ct_kernel: CtKernel = "standard"
    ct_slice_thickness: float | None = None
    device_interval_s: int = 60
    device_offset: float = 0.0
    note_template: NoteTemplate = "ed"
    age_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.ct_kernel not in ("standard", "sharp"):
            raise ValueError(f"Shift.ct_kernel must be 'standard' or 'sharp', got {self.ct_kernel!r}")
        if self.note_template not in ("ed", "ward"):
            raise ValueError(f"Shift.note_template must be 'ed' or 'ward', got {self.note_template!r}")
        if self.ct_slice_thickness is not None and not 0.5 <= self.ct_slice_thickness <= 20:
            raise ValueError(f"Shift.ct_slice_thickness must be 0.5-20 mm, got {self.ct_slice_thickness}")
        if not 1 <= self.device_interval_s <= 600:
            raise ValueError(f"Shift.device_interval_s must be 1-600 seconds, got {self.device_interval_s}")
        if self.age_range is not None:
            low, high = self.age_range
            if not 0 <= low <= high <= 110:
                raise ValueError(f"Shift.age_range must be (youngest, oldest) within 0-110, got {self.age_range}")

    @property
    def modalities(self) -> tuple[str, ...]:
        """The manifest columns whose files this shift changes (``age`` also moves the ehr)."""
        changed = []
        if self.ct_kernel != "standard" or self.ct_slice_thickness is not None:
            changed.append("imaging")
        if self.age_range is not None:
            changed.append("ehr")
        if self.note_template != "ed":
            changed.append("notes")
        if self.device_interval_s != 60 or self.device_offset != 0.0:
            changed.append("device_logs")
        return tuple(changed)


# Strong site shifts, one modality each (used by benchmarks/bench_shift.py).
SITE_SHIFTS: dict[str, Shift] = {
    "ct-sharp-kernel": Shift(ct_kernel="sharp"),
    "ct-thick-slices": Shift(ct_slice_thickness=10.0),
    "monitor-15s-offset": Shift(device_interval_s=15, device_offset=6.0),
    "notes-ward-template": Shift(note_template="ward"),
    "children": Shift(age_range=(2, 15)),
}
