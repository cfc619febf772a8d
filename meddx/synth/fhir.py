"""The synthetic FHIR R4 Bundle: labs and vitals that follow severity, and planted post-index resources."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from meddx.synth.common import FAMILY_NAMES, GIVEN_NAMES, iso, label_from_severity
from meddx.synth.fhir_resources import (
    COMORBIDITIES,
    COND_CATEGORY,
    COND_CLINICAL,
    COND_VERIFY,
    CONTEXT_CONDITIONS,
    COPD_SNOMED,
    LOINC,
    OBS_CATEGORY,
    RXNORM,
    SNOMED,
    birth_date,
    categories,
    coding,
    document,
    quantity,
)

# meta.tag on every FHIR resource planted after the index time (a leakage trap).
POST_INDEX_TAG: dict[str, str] = {
    "system": "urn:meddx:synth",
    "code": "post-index",
    "display": "dated after the index time: must never reach a tensor",
}
DISEASE_SNOMED = ("233604007", "Pneumonia (disorder)")


def write_fhir_bundle(
    path: str | Path,
    *,
    patient_id: str,
    severity: float,
    rng: np.random.Generator,
    index_time: datetime,
    sex: str,
    age: int,
    crp_unit: str = "mg/L",
    temperature_unit: str = "Cel",
    label: int | None = None,
    patient_name: str | None = None,
    context: Mapping[str, bool] | None = None,
    heart_rate_severity: float | None = None,
) -> Path:
    """Write a FHIR R4 ``collection`` Bundle for one patient (valid for fhir.resources R4B).

    Holds a Patient (``id`` = ``patient_id``), an Encounter, LOINC Observations in UCUM
    units (WBC 6690-2, CRP 1988-5, heart rate 8867-4, body temperature 8310-5, SpO2 59408-5
    and a blood-pressure panel 85354-9 with 8480-6/8462-4 components), SNOMED Conditions,
    MedicationRequests and a triage DocumentReference (base64 text/plain), all dated before
    ``index_time``. It also plants three resources dated after ``index_time`` that give the
    label away (a Pneumonia Condition confirmed or refuted, an extreme or normal CRP, a
    discharge-summary DocumentReference), each tagged with :data:`POST_INDEX_TAG`.

    Args:
        path: the ``.json`` file to write.
        patient_id: Patient.id and the subject of every resource.
        severity: the severity this modality sees; raises CRP, WBC, temperature, heart rate.
        rng: the random generator of this bundle.
        index_time: the moment of prediction (aware datetime).
        sex: ``"F"``/``"female"`` or ``"M"``/``"male"``.
        age: age in whole years at ``index_time``.
        crp_unit: ``"mg/L"`` or ``"mg/dL"``.
        temperature_unit: ``"Cel"`` or ``"[degF]"``.
        label: the true label, for the planted post-index resources; from ``severity`` if None.
        patient_name: ``Family^Given``; a fake one when None.
        context: the interacting cohort's context (:mod:`meddx.synth.interactions`): COPD
            is then written when ``context["copd"]`` (not drawn), and heart failure (with
            furosemide) and a beta-blocker (metoprolol) when theirs hold. None: the default.
        heart_rate_severity: drives the heart-rate vital signs instead of ``severity``.

    Example:
        >>> import json, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = write_fhir_bundle(Path(folder, "p.json"), patient_id="P0001", severity=0.3,
        ...         rng=np.random.default_rng(0), index_time=datetime(2024, 3, 5, 14, tzinfo=timezone.utc),
        ...         sex="F", age=64)
        ...     bundle = json.loads(path.read_text())
        >>> bundle["resourceType"], bundle["entry"][0]["resource"]["resourceType"]
        ('Bundle', 'Patient')
    """
    if crp_unit not in ("mg/L", "mg/dL"):
        raise ValueError(f"crp_unit must be 'mg/L' or 'mg/dL', got {crp_unit!r}")
    if temperature_unit not in ("Cel", "[degF]"):
        raise ValueError(f"temperature_unit must be 'Cel' or '[degF]', got {temperature_unit!r}")
    gender = {"f": "female", "female": "female", "m": "male", "male": "male"}.get(sex.lower())
    if gender is None:
        raise ValueError(f"sex must be F/M/female/male, got {sex!r}")
    label = label_from_severity(severity) if label is None else int(label)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    index_time = index_time.astimezone(timezone.utc)
    subject = {"reference": f"Patient/{patient_id}"}
    family, given = (patient_name or f"{rng.choice(FAMILY_NAMES)}^{rng.choice(GIVEN_NAMES)}").split("^")
    resources: list[dict[str, Any]] = []

    def new_id() -> str:
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))

    def before(min_h: float, max_h: float) -> datetime:
        return index_time - timedelta(minutes=int(rng.integers(int(min_h * 60), int(max_h * 60))))

    resources.append(
        {
            "resourceType": "Patient",
            "id": patient_id,
            "identifier": [{"system": "urn:meddx:synth:mrn", "value": f"MRN{int(rng.integers(10**6, 10**7))}"}],
            "name": [{"family": family, "given": [given]}],
            "gender": gender,
            "birthDate": birth_date(index_time, age, rng).isoformat(),
        }
    )
    arrival = before(4, 10)
    resources.append(
        {
            "resourceType": "Encounter",
            "id": new_id(),
            "status": "in-progress",
            "class": coding("http://terminology.hl7.org/CodeSystem/v3-ActCode", "EMER", "emergency"),
            "subject": subject,
            "period": {"start": iso(arrival)},
        }
    )

    def observation(code: str, display: str, when: datetime, category: str, **value: Any) -> dict[str, Any]:
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "id": new_id(),
            "status": "final",
            "category": categories(category, OBS_CATEGORY),
            "code": {"coding": [coding(LOINC, code, display)], "text": display},
            "subject": subject,
            "effectiveDateTime": iso(when),
        }
        if category == "laboratory":
            obs["issued"] = iso(when + timedelta(minutes=40))
        obs.update(value)
        return obs

    # Labs: a few draws over the 3 days before the index time (issued 40 min later, still before it).
    patient_crp = rng.normal(0.0, 0.5)
    for _ in range(int(rng.integers(1, 4))):
        when = before(1, 72)
        wbc = max(1.0, 8.0 + 2.2 * severity + rng.normal(0.0, 1.8))
        resources.append(
            observation(
                "6690-2",
                "Leukocytes [#/volume] in Blood by Automated count",
                when,
                "laboratory",
                valueQuantity=quantity(round(wbc, 1), "10*3/uL"),
            )
        )
        crp_mg_l = math.exp(2.3 + 0.8 * severity + patient_crp + rng.normal(0.0, 0.4))
        crp = crp_mg_l / 10.0 if crp_unit == "mg/dL" else crp_mg_l
        resources.append(
            observation(
                "1988-5",
                "C reactive protein [Mass/volume] in Serum or Plasma",
                when,
                "laboratory",
                valueQuantity=quantity(round(crp, 2), crp_unit),
            )
        )
    # Vital signs since arrival.
    for _ in range(int(rng.integers(2, 5))):
        when = arrival + timedelta(minutes=int(rng.integers(0, int((index_time - arrival).total_seconds() // 60))))
        temp_c = 37.0 + 0.45 * severity + rng.normal(0.0, 0.35)
        temp = temp_c * 9 / 5 + 32 if temperature_unit == "[degF]" else temp_c
        heart_rate = 82 + 7 * (severity if heart_rate_severity is None else heart_rate_severity) + rng.normal(0.0, 8.0)
        spo2 = min(100.0, 96.5 - 1.2 * severity + rng.normal(0.0, 1.2))
        resources.append(
            observation(
                "8310-5",
                "Body temperature",
                when,
                "vital-signs",
                valueQuantity=quantity(round(temp, 1), temperature_unit),
            )
        )
        resources.append(
            observation("8867-4", "Heart rate", when, "vital-signs", valueQuantity=quantity(round(heart_rate), "/min"))
        )
        resources.append(
            observation(
                "59408-5",
                "Oxygen saturation in Arterial blood by Pulse oximetry",
                when,
                "vital-signs",
                valueQuantity=quantity(round(spo2), "%"),
            )
        )
        systolic = 128 + rng.normal(0.0, 14.0)
        diastolic = 0.6 * systolic + rng.normal(0.0, 6.0)
        resources.append(
            observation(
                "85354-9",
                "Blood pressure panel with all children optional",
                when,
                "vital-signs",
                component=[
                    {
                        "code": {"coding": [coding(LOINC, "8480-6", "Systolic blood pressure")]},
                        "valueQuantity": quantity(round(systolic), "mm[Hg]"),
                    },
                    {
                        "code": {"coding": [coding(LOINC, "8462-4", "Diastolic blood pressure")]},
                        "valueQuantity": quantity(round(diastolic), "mm[Hg]"),
                    },
                ],
            )
        )
    # Chronic conditions (independent of severity) and their medications.
    chronic = list(COMORBIDITIES)
    if context is not None:  # after the default ones, so that their draws stay in place
        chronic += [entry for name, entry in CONTEXT_CONDITIONS.items() if context[name]]
    for j, (snomed, display, (rxnorm, drug)) in enumerate(chronic):
        if j < len(COMORBIDITIES):  # drawn; COPD decided by the context when there is one
            drawn = rng.random() < 0.25
            if context is not None and snomed == COPD_SNOMED:
                drawn = bool(context["copd"])
            if not drawn:
                continue
        onset = index_time - timedelta(days=int(rng.integers(200, 4000)))
        resources.append(
            {
                "resourceType": "Condition",
                "id": new_id(),
                "clinicalStatus": {"coding": [{"system": COND_CLINICAL, "code": "active"}]},
                "verificationStatus": {"coding": [{"system": COND_VERIFY, "code": "confirmed"}]},
                "category": categories("problem-list-item", COND_CATEGORY),
                "code": {"coding": [coding(SNOMED, snomed, display)], "text": display},
                "subject": subject,
                "onsetDateTime": iso(onset),
                "recordedDate": iso(onset + timedelta(days=int(rng.integers(0, 30)))),
            }
        )
        resources.append(
            {
                "resourceType": "MedicationRequest",
                "id": new_id(),
                "status": "active",
                "intent": "order",
                "medicationCodeableConcept": {"coding": [coding(RXNORM, rxnorm, drug)], "text": drug},
                "subject": subject,
                "authoredOn": iso(index_time - timedelta(days=int(rng.integers(5, 180)))),
            }
        )
    complaints = ["cough", "fever", "shortness of breath", "fatigue", "chest pain"]
    n_complaints = int(np.clip(round(1.5 + 0.8 * severity + rng.normal(0.0, 0.8)), 0, len(complaints)))
    chosen = [complaints[j] for j in sorted(rng.choice(len(complaints), size=n_complaints, replace=False))]
    triage = (
        f"Triage note. Chief complaint: {', '.join(chosen)}."
        if chosen
        else "Triage note. Chief complaint: follow-up visit, feels well."
    )
    resources.append(document(new_id(), subject, before(0.5, 3.0), "Triage note", triage))

    # Planted after the index time: each one alone would give the label away.
    post = [
        {
            "resourceType": "Condition",
            "id": new_id(),
            "clinicalStatus": {"coding": [{"system": COND_CLINICAL, "code": "active" if label else "inactive"}]},
            "verificationStatus": {"coding": [{"system": COND_VERIFY, "code": "confirmed" if label else "refuted"}]},
            "category": categories("encounter-diagnosis", COND_CATEGORY),
            "code": {"coding": [coding(SNOMED, *DISEASE_SNOMED)], "text": "Pneumonia"},
            "subject": subject,
            "onsetDateTime": iso(index_time + timedelta(hours=int(rng.integers(2, 48)))),
        },
        observation(
            "1988-5",
            "C reactive protein [Mass/volume] in Serum or Plasma",
            index_time + timedelta(hours=int(rng.integers(6, 30))),
            "laboratory",
            valueQuantity=quantity(250.0 if label else 2.0, "mg/L"),
        ),
        document(
            new_id(),
            subject,
            index_time + timedelta(days=int(rng.integers(2, 7))),
            "Discharge summary",
            "Discharge summary. Final diagnosis: community-acquired pneumonia, treated with antibiotics."
            if label
            else "Discharge summary. Pneumonia was ruled out; discharged home.",
        ),
    ]
    for resource in post:
        resource["meta"] = {"tag": [dict(POST_INDEX_TAG)]}
    resources.extend(post)

    bundle = {
        "resourceType": "Bundle",
        "id": new_id(),
        "type": "collection",
        "entry": [
            {"fullUrl": f"https://meddx.example/fhir/{r['resourceType']}/{r['id']}", "resource": r} for r in resources
        ],
    }
    path.write_text(json.dumps(bundle, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
