"""``meddx diagnose --store-fhir``: each RiskAssessment written to the FHIR server, once.

For each diagnosed chunk, :class:`FhirWriter` sends the chunk's RiskAssessments (the ones in
``risk_assessments.ndjson``) as one **transaction** Bundle. Every entry is a **conditional
create** on the RiskAssessment's identifier (``If-None-Exist: identifier=urn:meddx:prediction|<hash>``;
the hash is of patient, index time, task and model), so a run killed between writing a chunk
and marking it done writes the same resources again on ``--resume`` and the server keeps
one of each: the second time it answers ``200`` (exists) instead of ``201`` (created).

A row whose EHR came from the server (``fhir:Patient/<id>``) gets ``subject.reference =
Patient/<id>``, so the assessment hangs off the patient the EHR was read from; other rows keep
the logical reference by the manifest's patient_id.

What happened to each is a row of ``fhir_writes.csv`` (patient, index time, task, status
``created``, ``exists`` or ``error``, the server's id, the identifier, the reason of a failure).
A transaction is all or nothing: a refused one costs that chunk's writes, never the predictions
or the run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from meddx.errors import MeddxError, short_reason
from meddx.export.fhir import PREDICTION_ID_SYSTEM
from meddx.fhirclient.ref import FhirRef
from meddx.records import Modality

if TYPE_CHECKING:
    import pandas as pd

    from meddx.config import FhirServerConfig
    from meddx.predictions.types import TaskPrediction
    from meddx.streaming import ReadyChunk

logger = logging.getLogger(__name__)

WRITE_COLUMNS = ["patient_id", "index_time", "task", "status", "resource_id", "identifier", "error"]


def identifier_of(resource: dict[str, Any]) -> str:
    """The RiskAssessment's meddx identifier value (a hash; no patient data)."""
    return next(i["value"] for i in resource.get("identifier", []) if i.get("system") == PREDICTION_ID_SYSTEM)


def transaction(resources: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A transaction Bundle creating each resource unless one with its identifier exists.

    Example:
        >>> bundle = transaction([{"resourceType": "RiskAssessment", "id": "x",
        ...                        "identifier": [{"system": "urn:meddx:prediction", "value": "ab"}]}])
        >>> bundle["entry"][0]["request"]
        {'method': 'POST', 'url': 'RiskAssessment', 'ifNoneExist': 'identifier=urn:meddx:prediction|ab'}
    """
    entries = []
    for resource in resources:
        body = {k: v for k, v in resource.items() if k != "id"}  # the server names what it creates
        entries.append(
            {
                "resource": body,
                "request": {
                    "method": "POST",
                    "url": "RiskAssessment",
                    "ifNoneExist": f"identifier={PREDICTION_ID_SYSTEM}|{identifier_of(resource)}",
                },
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


class FhirWriter:
    """Writes the RiskAssessments of each diagnosed chunk (see the module docstring).

    Args:
        config: the ``fhir`` section (server URL from it or ``MEDDX_FHIR_URL``, credentials' variables).

    Raises:
        ConfigError: no FHIR server is configured. FhirAuthError: it refuses the credentials.

    Example:
        >>> writer = FhirWriter(config.fhir)  # doctest: +SKIP
        >>> writer.write(ready_chunk, task_predictions, resources)  # doctest: +SKIP
    """

    def __init__(self, config: FhirServerConfig):
        from meddx.fhirclient.client import FhirAuthError, FhirClient, FhirRequestError

        self.client = FhirClient(config)
        try:  # refused credentials stop the run before any work, like the ingest preflight
            self.client.get_json("RiskAssessment", "a test search (RiskAssessment?_count=1)", {"_count": 1})
        except FhirAuthError as exc:
            raise FhirAuthError(f"--store-fhir: {exc}; nothing was diagnosed") from None
        except FhirRequestError as exc:
            logger.warning("--store-fhir preflight: %s; the chunks' writes may fail (see fhir_writes.csv)", exc)

    def write(
        self, ready: ReadyChunk, predictions: Sequence[TaskPrediction], resources: Sequence[dict[str, Any]]
    ) -> pd.DataFrame:
        """Write one chunk's RiskAssessments (one per prediction, in order); one ``WRITE_COLUMNS`` row each."""
        import pandas as pd

        if len(predictions) != len(resources):
            raise MeddxError(
                f"chunk {ready.number}: {len(predictions)} predictions but {len(resources)} RiskAssessments"
            )
        refs = {
            r.row.row: r.row.remote[Modality.EHR]
            for r in ready.rows
            if isinstance(r.row.remote.get(Modality.EHR), FhirRef)
        }
        sent = []
        outcomes = []
        for prediction, resource in zip(predictions, resources, strict=True):
            ref = refs.get(prediction.row)
            if isinstance(ref, FhirRef):
                resource = {**resource, "subject": {**resource["subject"], "reference": f"Patient/{ref.patient_id}"}}
            sent.append(resource)
            outcomes.append(
                {
                    "patient_id": prediction.patient_id,
                    "index_time": prediction.index_time,
                    "task": prediction.task,
                    "identifier": identifier_of(resource),
                }
            )
        return pd.DataFrame(self._send(sent, outcomes), columns=WRITE_COLUMNS)

    def _send(self, sent: list[dict[str, Any]], outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not sent:
            return []
        try:
            answer = self.client.request(
                "POST", "", f"write {len(sent)} RiskAssessment(s) (a transaction)", body=transaction(sent)
            ).json("write RiskAssessments", self.client.where)
            entries = answer.get("entry")
            if answer.get("resourceType") != "Bundle" or not isinstance(entries, list) or len(entries) != len(sent):
                raise MeddxError(
                    f"the FHIR server at {self.client.where} answered the transaction without one entry per resource"
                )
        except MeddxError as exc:
            logger.warning("writing %d RiskAssessment(s) failed: %s", len(sent), short_reason(exc))
            return [{**o, "status": "error", "error": short_reason(exc)} for o in outcomes]
        done = []
        for outcome, entry in zip(outcomes, entries, strict=True):
            response = entry.get("response") if isinstance(entry, dict) else None
            status = str((response or {}).get("status", "")).split(" ")[0]
            location = str((response or {}).get("location", ""))
            parts = location.split("/")
            rid = parts[parts.index("RiskAssessment") + 1] if "RiskAssessment" in parts[:-1] else ""
            if status == "201":
                done.append({**outcome, "status": "created", "resource_id": rid})
            elif status == "200":
                done.append({**outcome, "status": "exists", "resource_id": rid})
            else:
                done.append({**outcome, "status": "error", "error": f"the server answered {status or 'nothing'}"})
        return done
