"""The synthetic CT series: axial DICOM Part 10 files with a lesion sized by severity."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

from meddx.synth.common import FAMILY_NAMES, GIVEN_NAMES, iso

_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root; entropy makes each UID deterministic
_IMPLEMENTATION_UID = UID(_UID_ROOT + "8842.1")


def _sharpen(hu: np.ndarray, noise: np.ndarray, body: np.ndarray) -> np.ndarray:
    """A sharp kernel's look: in-plane unsharp masking plus twice the voxel noise again in the body."""
    from scipy.ndimage import gaussian_filter

    smooth = gaussian_filter(hu, sigma=(0.0, 1.0, 1.0))
    return hu + 1.5 * (hu - smooth) + np.where(body, 2.0 * noise, 0.0)


def write_ct_series(
    folder: str | Path,
    *,
    severity: float,
    rng: np.random.Generator,
    acquisition_time: datetime,
    patient_id: str,
    n_slices: int = 12,
    size: int = 48,
    rle: bool = False,
    drop_slice: int | None = None,
    shuffle: bool = True,
    patient_name: str | None = None,
    kernel: str = "standard",
    slice_thickness: float | None = None,
) -> list[Path]:
    """Write a CT-like axial DICOM series (Part 10 files) with a severity-sized lesion.

    The volume is a soft-tissue body ellipse (~40 HU) in air (~-1000 HU) with a vertebra
    (~400-700 HU) and a spherical hyperdense lesion (+60..+150 HU) whose radius grows with
    ``severity`` (none below about -1.4). Stored values are int16 with RescaleSlope 1 and
    RescaleIntercept -1024 or 0. Geometry tags are complete; z runs up or down the table
    with InstanceNumber depending on the patient. The random draws do not depend on ``rle``,
    ``drop_slice`` or ``shuffle``, so two calls with equally seeded generators write twin
    series differing only in those options.

    Args:
        folder: the series folder (created; files already there are left alone).
        severity: the severity this modality sees (about N(0, 1)).
        rng: the random generator of this series.
        acquisition_time: when the series was acquired (aware datetime).
        patient_id: written to PatientID.
        n_slices: slices in the full series.
        size: rows and columns of every slice.
        rle: RLE Lossless transfer syntax instead of explicit VR little endian.
        drop_slice: index (in InstanceNumber order) of a slice to leave out, making a gap.
        shuffle: random hex file names (order not revealed); otherwise ``slice_000.dcm``...
        patient_name: DICOM PN ``Family^Given``; a fake one when None.
        kernel: ``"sharp"``: a sharp reconstruction kernel (edge-enhanced texture, about three
            times the noise, ``ConvolutionKernel`` written); ``"standard"``: the soft default.
        slice_thickness: slice thickness and spacing in mm instead of the drawn 5 or 6 mm.

    Returns:
        The written files in InstanceNumber order (whatever their names).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     files = write_ct_series(Path(folder, "ct"), severity=1.5, rng=np.random.default_rng(0),
        ...         acquisition_time=datetime(2024, 3, 5, 9, tzinfo=timezone.utc), patient_id="P0001")
        >>> len(files), files[0].suffix
        (12, '.dcm')
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    acquisition_time = acquisition_time.astimezone(timezone.utc)

    spacing = round(float(rng.uniform(6.5, 7.5)), 3)  # mm per pixel (a coarse, tiny CT)
    thickness = float(rng.choice([5.0, 6.0]))
    if slice_thickness is not None:  # drawn first all the same, so later draws do not move
        thickness = float(slice_thickness)
    descending = bool(rng.random() < 0.5)  # head-first series often run down the table
    intercept = float(rng.choice([-1024.0, 0.0]))
    z0 = round(float(rng.uniform(-200.0, -100.0)), 2)

    # Anatomy in voxel units (z, y, x).
    cy, cx = size / 2 + rng.uniform(-1.5, 1.5, size=2)
    ay, ax = size * rng.uniform(0.28, 0.34), size * rng.uniform(0.38, 0.45)
    bone_r = size * rng.uniform(0.05, 0.08)
    bone_hu = rng.uniform(400.0, 700.0)
    lesion_r_mm = max(0.0, 13.0 + 9.5 * severity) * rng.uniform(0.85, 1.15)
    lesion_hu = rng.uniform(60.0, 150.0)
    lesion_c = (
        rng.uniform(0.35, 0.65) * (n_slices - 1),
        cy - ay * rng.uniform(0.1, 0.45),
        cx + ax * rng.uniform(-0.45, 0.45),
    )
    tissue_noise = rng.normal(0.0, 12.0, size=(n_slices, size, size))
    air_noise = rng.normal(0.0, 8.0, size=(n_slices, size, size))

    zz, yy, xx = np.mgrid[0:n_slices, 0:size, 0:size].astype(np.float64)
    body = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1.0
    bone = (yy - (cy + 0.65 * ay)) ** 2 + (xx - cx) ** 2 <= bone_r**2
    lesion_d2 = (
        ((zz - lesion_c[0]) * thickness) ** 2
        + ((yy - lesion_c[1]) * spacing) ** 2
        + ((xx - lesion_c[2]) * spacing) ** 2
    )
    lesion = body & ~bone & (lesion_d2 <= lesion_r_mm**2)

    hu = np.where(body, 40.0 + tissue_noise, -1000.0 + air_noise)
    hu[bone & body] = bone_hu + tissue_noise[bone & body]
    hu[lesion] += lesion_hu
    if kernel == "sharp":
        hu = _sharpen(hu, tissue_noise, body)
    elif kernel != "standard":
        raise ValueError(f"kernel must be 'standard' or 'sharp', got {kernel!r}")
    stored = np.clip(np.rint(hu - intercept), -32768, 32767).astype(np.int16)

    study_uid = generate_uid(_UID_ROOT, [patient_id, iso(acquisition_time), "study", str(rng.integers(2**62))])
    series_uid = generate_uid(_UID_ROOT, [study_uid, "series"])
    frame_uid = generate_uid(_UID_ROOT, [study_uid, "frame"])
    names = [rng.bytes(8).hex() for _ in range(n_slices)]
    name = patient_name or f"{rng.choice(FAMILY_NAMES)}^{rng.choice(GIVEN_NAMES)}"
    study_time = acquisition_time - timedelta(minutes=int(rng.integers(3, 15)))
    accession = f"A{int(rng.integers(10**6, 10**7))}"

    written: list[Path] = []
    for i in range(n_slices):
        if drop_slice is not None and i == drop_slice:
            continue
        z = z0 + (n_slices - 1 - i if descending else i) * thickness
        k = n_slices - 1 - i if descending else i  # volume index of this slice
        t_slice = acquisition_time + timedelta(milliseconds=500 * i)
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid(_UID_ROOT, [series_uid, str(i)])
        ds.StudyDate, ds.StudyTime = study_time.strftime("%Y%m%d"), study_time.strftime("%H%M%S")
        ds.SeriesDate, ds.SeriesTime = acquisition_time.strftime("%Y%m%d"), acquisition_time.strftime("%H%M%S")
        ds.AcquisitionDate, ds.AcquisitionTime = t_slice.strftime("%Y%m%d"), t_slice.strftime("%H%M%S.%f")
        ds.ContentDate, ds.ContentTime = ds.AcquisitionDate, ds.AcquisitionTime
        ds.TimezoneOffsetFromUTC = "+0000"
        ds.AccessionNumber = accession
        ds.Modality = "CT"
        ds.Manufacturer = "meddx-synth"
        ds.StudyDescription = "CT CHEST"
        ds.SeriesDescription = f"Axial {thickness:g}mm soft tissue"
        ds.PatientName = name
        ds.PatientID = patient_id
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = thickness
        ds.SpacingBetweenSlices = thickness
        ds.KVP = 120
        if kernel == "sharp":
            ds.ConvolutionKernel = "SHARP"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [round(-size / 2 * spacing, 3), round(-size / 2 * spacing, 3), round(z, 3)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = round(z, 3)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.PixelSpacing = [spacing, spacing]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()

        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        # Fixed, so the bytes do not change with the installed pydicom version.
        ds.file_meta.ImplementationClassUID = _IMPLEMENTATION_UID
        ds.file_meta.ImplementationVersionName = "MEDDX_SYNTH_1"
        if rle:
            # Keep our deterministic SOPInstanceUID (compress() would otherwise mint one).
            ds.compress(RLELossless, stored[k], generate_instance_uid=False)
        path = folder / (f"{names[i]}.dcm" if shuffle else f"slice_{i:03d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written
