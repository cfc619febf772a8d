"""``meddx fhir export``: a FHIR Bulk Data (``$export``) client writing the folder the Bulk reader reads.

Following the Bulk Data Access IG (v2):

1. **Kick-off**: ``GET [base]/$export?_type=..&_since=..`` with ``Accept: application/fhir+json``
   and ``Prefer: respond-async``; the server answers ``202 Accepted`` and a ``Content-Location``
   (the status URL), which must be on the same server.
2. **Status**: the status URL is polled; ``202`` means in progress (``X-Progress`` is shown,
   ``Retry-After`` is honoured, up to ``fhir.max_retry_after_s``; without it the waits grow from
   ``fhir.backoff_s`` to 30 s); ``200`` brings the manifest (``transactionTime``,
   ``requiresAccessToken``, ``output``: one or more NDJSON files per type); an error status ends
   the export with the server's OperationOutcome in the message.
3. **Files**: each output file is downloaded into ``OUT/<Type>.<nnn>.ndjson``, with the
   credentials only when the manifest says ``requiresAccessToken: true`` (files on another
   server are refused), each held to ``fhir.max_export_file_mb``, written to a ``.part`` file
   and renamed when whole. The server's CapabilityStatement goes to
   ``OUT/CapabilityStatement.json`` (the reader takes the FHIR version from it).

**Resumable**: ``OUT/.meddx-export.json`` records the request, the status URL, the manifest
and the files done. Run the same command again after a kill: a kicked-off export is polled, not
started again, and only the files not done are downloaded. Another request (other types or
``--since``) in the same folder is refused.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from meddx.config import FhirServerConfig
from meddx.errors import ConfigError
from meddx.fhirclient.client import FhirClient, FhirRequestError
from meddx.files import write_atomic

logger = logging.getLogger(__name__)

STATE_FILE = ".meddx-export.json"
CAPABILITY_FILE = "CapabilityStatement.json"
DEFAULT_TYPES = (
    "Patient",
    "Observation",
    "Condition",
    "MedicationRequest",
    "MedicationStatement",
    "Procedure",
    "Encounter",
    "DocumentReference",
)
MAX_POLL_WAIT_S = 30.0


@dataclass
class ExportResult:
    """Where the export went and what it holds."""

    out_dir: Path
    files: dict[str, int]  # file name -> bytes
    transaction_time: str | None
    resumed: bool


def _state(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(out: Path, state: dict[str, Any]) -> None:
    write_atomic(out / STATE_FILE, json.dumps(state, indent=2))


def _wait(answer_headers: Mapping[str, str], attempt: int, config: FhirServerConfig) -> float:
    value = str(answer_headers.get("Retry-After", "")).strip()
    if value.isdigit():
        wait = float(value)
        if wait > config.max_retry_after_s:
            raise FhirRequestError(
                f"the Bulk export's status asks to wait {wait:g} s (Retry-After), more than fhir.max_retry_after_s"
                f" ({config.max_retry_after_s:g} s); run the command again later to resume"
            )
        return wait
    return min(MAX_POLL_WAIT_S, max(config.backoff_s, 0.1) * 2 ** min(attempt, 8))


def bulk_export(
    config: FhirServerConfig,
    out: str | Path,
    *,
    since: datetime | None = None,
    types: tuple[str, ...] = DEFAULT_TYPES,
    progress: bool = True,
) -> ExportResult:
    """Run (or resume) a system-level Bulk export into ``out`` (see the module docstring).

    Args:
        config: the ``fhir`` section (server URL, credentials' variables, limits).
        out: the folder to write (created); the Bulk reader reads it as an ``ehr`` folder.
        since: only resources changed after it (``_since``); None: everything.
        types: resource types to export (``_type``).
        progress: show a progress bar.

    Raises:
        FhirAuthError: refused credentials. FhirRequestError: the server refused or failed the export.
        ConfigError: no server configured, or ``out`` holds another export.

    Example:
        >>> bulk_export(FhirServerConfig(url="http://127.0.0.1:8103/fhir/R4"), "runs/export",
        ...             since=datetime(2024, 1, 1, tzinfo=timezone.utc))  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    client = FhirClient(config)
    request = {
        "server": client.where,
        "_type": ",".join(types),
        "_since": since.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if since else None,
    }
    state = _state(out)
    resumed = bool(state)
    if state and state.get("request") != request:
        raise ConfigError(
            f"{out} holds another export ({out / STATE_FILE}: other server, types or --since); choose another --out"
        )
    if not state:
        state = {"request": request, "files": {}}
    if not state.get("status_url") and not state.get("manifest"):
        params = {"_type": request["_type"], **({"_since": request["_since"]} if request["_since"] else {})}
        answer = client.request(
            "GET", "$export", "kick off a Bulk export", params=params, headers={"Prefer": "respond-async"}
        )
        location = answer.headers.get("Content-Location")
        if answer.status != 202 or not location:
            raise FhirRequestError(
                f"the FHIR server at {client.where} answered the Bulk kick-off with HTTP {answer.status}"
                " and no Content-Location; does it support $export?"
            )
        client.check_same_server(location, "the Bulk status URL")
        state["status_url"] = location
        _save(out, state)
    if not state.get("manifest"):
        state["manifest"] = _poll(client, state["status_url"], progress)
        _save(out, state)
    manifest = state["manifest"]
    token = bool(manifest.get("requiresAccessToken"))
    outputs = [o for o in manifest.get("output") or [] if isinstance(o, dict) and isinstance(o.get("url"), str)]
    numbers: dict[str, int] = {}
    names = []
    for item in outputs:
        kind = str(item.get("type") or "Resource")
        if not kind.isalnum():
            raise FhirRequestError(f"the Bulk manifest names a file of type {kind[:40]!r}, not a FHIR resource type")
        names.append(f"{kind}.{numbers.get(kind, 0):03d}.ndjson")
        numbers[kind] = numbers.get(kind, 0) + 1
    limit = FhirClient(config.model_copy(update={"max_response_mb": config.max_export_file_mb}), client.base)
    with tqdm(total=len(outputs), desc="fhir export", unit="file", disable=not progress) as bar:
        for item, name in zip(outputs, names, strict=True):
            if name in state["files"] and (out / name).is_file():
                bar.update(1)
                continue
            state["files"][name] = limit.download(item["url"], out / name, f"download {name}", auth=token)
            _save(out, state)
            bar.update(1)
    if not (out / CAPABILITY_FILE).is_file():
        statement = client.get_json("metadata", "read the CapabilityStatement (metadata)")
        (out / CAPABILITY_FILE).write_text(json.dumps(statement))
    state["complete"] = True
    _save(out, state)
    return ExportResult(out, dict(state["files"]), manifest.get("transactionTime"), resumed)


def _poll(client: FhirClient, status_url: str, progress: bool) -> dict[str, Any]:
    """Poll the status URL until the manifest comes (202: wait, 200: the manifest)."""
    client.check_same_server(status_url, "the Bulk status URL")
    attempt = 0
    while True:
        answer = client.request("GET", status_url, "poll the Bulk export's status")
        if answer.status == 200:
            manifest = answer.json("the Bulk export's manifest", client.where)
            if not isinstance(manifest.get("output"), list):
                raise FhirRequestError(f"the Bulk manifest from {client.where} has no output list")
            return manifest
        if answer.status != 202:
            raise FhirRequestError(f"the Bulk export's status answered HTTP {answer.status}", answer.status)
        attempt += 1
        wait = _wait(answer.headers, attempt, client.config)
        note = str(answer.headers.get("X-Progress", ""))[:80]
        if progress:
            logger.info("Bulk export in progress%s; polling again in %.0f s", f" ({note})" if note else "", wait)
        time.sleep(wait)
