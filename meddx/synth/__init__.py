"""Synthetic multimodal cohort in the real file formats (used for ``sample_data`` and tests).

Every patient has a hidden *severity* ``s ~ N(0, 1)``. The binary label ``label:disease``
(a pneumonia-like illness, prevalence about 40 %) is ``1`` when ``s`` plus a little noise
crosses a threshold. Each modality then sees its own *view* of the severity,
``s + VIEW_NOISE[modality] * e`` with independent ``e ~ N(0, 1)``, and every writer adds
nuisance of its own (anatomy, units, sample rates, artefacts). So each modality alone is a
weak predictor of the label (cross-validated AUROC about 0.7-0.83 for one simple feature
and a logistic regression), while combining the six noisy views averages their noise away
(AUROC about 0.88-0.92; see ``tests/test_synth.py``). The evidence per modality:

- **imaging**: a CT-like DICOM series (int16 stored values, rescale to Hounsfield units,
  shuffled random file names, one series in three RLE-compressed) with a hyperdense lesion
  (+60..+150 HU in ~40 HU soft tissue) whose radius grows with severity;
- **ehr**: a FHIR R4 Bundle (``collection``) whose CRP, WBC, temperature, heart rate and
  SpO2 rise or fall with severity, in mixed units (CRP in mg/L or mg/dL, temperature in Cel
  or [degF]); resources dated *after* the index time that give the label away are planted
  on purpose and tagged ``meta.tag = urn:meddx:synth|post-index`` (:data:`POST_INDEX_TAG`),
  so tests can check that ingestors drop them;
- **notes**: a clinician note whose symptom phrases are present more often with severity,
  and negated ("denies cough", "no fever") when absent;
- **device_logs**: a long CSV ``timestamp,channel,value`` (heart_rate, spo2, resp_rate each
  minute over the hours before the index time) with gaps, impossible values, unsorted rows
  and rows after the index time (which leak the label); severity lowers spo2 and raises
  the respiratory rate a little;
- **audio**: a lung-sound WAV (PCM 16, 4-22 kHz, some stereo) of breath-like filtered noise
  with crackles whose rate grows with severity;
- **video**: a pulsating bright disc (MP4 ``mp4v`` or AVI ``MJPG``) whose pulsation weakens
  with severity.

About 10 % of patients miss each modality (independently). Output is byte-for-byte
deterministic for a seed: every random draw comes from a generator derived from
``(seed, patient, stream)``, dates are fixed, UIDs are hashed from seeded entropy, and
JSON keys are sorted. Changing one writer does not shift the others' draws.

``generate_cohort(..., shift=Shift(...))`` writes the same patients as another site would
(a sharp CT kernel or other slice thickness, a monitor sampling at another rate with a
calibration offset, notes from a ward-round template, another age range; see
:class:`Shift` and :data:`SITE_SHIFTS`), for testing out-of-distribution detection.

``generate_cohort(..., interactions=True)`` writes the same patients with clinical context
(heart failure, COPD, a beta-blocker, old age) that changes what the CT, the monitor, the
lung sound and the note mean (:mod:`meddx.synth.interactions`, each interaction with its
equation); :func:`bayes_ceiling` is the AUROC of the exact posterior of either cohort.

Example:
    >>> import tempfile
    >>> from meddx.cohort import load_cohort
    >>> from meddx.synth import generate_cohort
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     cohort = load_cohort(generate_cohort(folder, n_patients=3, seed=7))
    >>> len(cohort), cohort.tasks["disease"].classes
    (3, ('0', '1'))
"""

from meddx.synth.audio import write_lung_sound
from meddx.synth.cohort import LABEL_COLUMN, MANIFEST_COLUMNS, cohort_truth, generate_cohort
from meddx.synth.common import LABEL_NOISE, LABEL_THRESHOLD, MISSING_RATE, MODALITY_COLUMNS, VIEW_NOISE
from meddx.synth.ct import write_ct_series
from meddx.synth.device_logs import write_device_log
from meddx.synth.fhir import DISEASE_SNOMED, POST_INDEX_TAG, write_fhir_bundle
from meddx.synth.interactions import CONTEXT_PREVALENCE, INTERACTIONS, OLD_AGE, Interaction, bayes_ceiling
from meddx.synth.notes import write_note
from meddx.synth.shift import SITE_SHIFTS, Shift
from meddx.synth.video import write_pulse_video

__all__ = [
    "CONTEXT_PREVALENCE",
    "DISEASE_SNOMED",
    "INTERACTIONS",
    "Interaction",
    "LABEL_COLUMN",
    "LABEL_NOISE",
    "LABEL_THRESHOLD",
    "MANIFEST_COLUMNS",
    "MISSING_RATE",
    "MODALITY_COLUMNS",
    "OLD_AGE",
    "POST_INDEX_TAG",
    "SITE_SHIFTS",
    "Shift",
    "VIEW_NOISE",
    "bayes_ceiling",
    "cohort_truth",
    "generate_cohort",
    "write_ct_series",
    "write_device_log",
    "write_fhir_bundle",
    "write_lung_sound",
    "write_note",
    "write_pulse_video",
]
