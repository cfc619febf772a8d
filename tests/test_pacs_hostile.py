"""A hostile or broken PACS costs its rows, never the run: answers from a local DICOMweb listener.

A small threaded ``http.server`` on 127.0.0.1 plays the PACS. Each study of the manifest gets
one kind of answer: endless multipart bodies, a part claiming 10 GB, an endless QIDO-RS JSON,
a server dripping a byte a second (in the body, and in the headers), a redirect to another
origin, series of another patient or another study; two rows are sound (one from the listener,
after a redirect on its own origin, one from files). ``meddx ingest`` runs once over all of
them in a subprocess whose peak memory is read with ``os.wait4`` by a small launcher process
(see :data:`LAUNCHER` for why not by pytest itself). Every answer the listener sends is bounded
(bytes and seconds), so a client that failed to cut it off would grow past the memory bound or
be cut by the listener, never hang the suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from meddx.config import DicomWebConfig
from meddx.dicomweb.guard import AnswerError
from meddx.dicomweb.multipart import write_parts
from meddx.synth import write_ct_series

pytest.importorskip("dicomweb_client")

REPO = Path(__file__).resolve().parents[1]
ACQUIRED = datetime(2024, 3, 5, 9, 0, tzinfo=timezone.utc)
GIB = 1024**3
MIB = 1024**2
SERVER_MAX_BYTES = 2 * GIB + 64 * MIB  # what one endless answer sends at most: more than the memory bound
SERVER_MAX_S = 90.0  # how long one answer lasts at most
DEADLINE_S = 6.0  # the test config's dicomweb.deadline_s; the drips would last SERVER_MAX_S
USER, PASSWORD = "meddx-test", "hostile-pacs-secret"
BOUNDARY = "meddx-test-boundary"
# Runs the command in its argv[2:] and writes the command's peak RSS in KiB (its own and its waited-for
# children's, as os.wait4 gives it) to the file argv[1]; exits with the command's status. Why a launcher:
# on Linux a child's ru_maxrss starts at the high-water mark of the memory it was started from (exec records
# the old address space's peak, and a vfork/fork child's address space is its parent's). Started straight
# from pytest, the run would be charged with pytest's own peak so far: 2.57 GiB once the rest of the suite
# has run in the same process, for a run that itself peaks near 1 GiB. This launcher's own peak is a few MiB.
LAUNCHER = """
import os, subprocess, sys
process = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(process.pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


@dataclass
class Study:
    """One study on the listener and how it answers."""

    kind: str
    uid: str
    series_uid: str
    files: list[Path] = field(default_factory=list)  # what WADO-RS sends (DICOM Part 10 files)


def _series(folder: Path, patient_id: str, seed: int, n_slices: int = 4, size: int = 24) -> list[Path]:
    return write_ct_series(
        folder,
        severity=0.5,
        rng=np.random.default_rng(seed),
        acquisition_time=ACQUIRED,
        patient_id=patient_id,
        n_slices=n_slices,
        size=size,
    )


def _uids(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def _multipart(files: list[Path]) -> bytes:
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes() + b"\r\n"
        for path in files
    )
    return body + f"--{BOUNDARY}--\r\n".encode()


class Listener(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, studies: dict[str, Study], redirect_to: str | None = None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.studies = studies
        self.redirect_to = redirect_to
        self.requests: list[tuple[str, str | None]] = []  # (path, Authorization header)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    server: Listener

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        self.server.requests.append((path, self.headers.get("Authorization")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["dicom-web", "moved"]:
            parts = ["dicom-web", *parts[2:]]
        if parts == ["dicom-web", "studies"]:  # the preflight
            return self._send(b"[]", "application/dicom+json")
        study = self.server.studies.get(parts[2]) if len(parts) > 2 else None
        if study is None:
            return self._send(b"[]", "application/dicom+json", status=404)
        if len(parts) == 4:
            return self._qido(study)
        return self._wado(study, path)

    def _send(self, body: bytes, content_type: str, status: int = 200, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _endless(self, first: bytes, piece: bytes, pause_s: float = 0.0) -> None:
        """Send ``first`` then ``piece`` again and again, until the client leaves or the bounds are reached."""
        started, sent = time.monotonic(), 0
        try:
            self.wfile.write(first)
            while sent < SERVER_MAX_BYTES and time.monotonic() - started < SERVER_MAX_S:
                self.wfile.write(piece)
                self.wfile.flush()
                sent += len(piece)
                if pause_s:
                    time.sleep(pause_s)
        except OSError:  # the client cut the answer off
            pass
        self.close_connection = True

    def _qido(self, study: Study) -> None:
        item = {
            "0020000D": {"vr": "UI", "Value": [study.uid]},
            "0020000E": {"vr": "UI", "Value": [study.series_uid]},
            "00080060": {"vr": "CS", "Value": ["CT"]},
            "00201209": {"vr": "IS", "Value": [len(study.files) or 1]},
        }
        if study.kind == "endless-json":
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.end_headers()
            return self._endless(b"[", (json.dumps(item) + ",").encode() * 1000)
        self._send(json.dumps([item]).encode(), "application/dicom+json")

    def _wado(self, study: Study, path: str) -> None:
        multipart = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
        kind = study.kind
        if kind == "good" and not path.startswith("/dicom-web/moved/"):  # a redirect on the same origin
            self.send_response(307)
            self.send_header("Location", path.replace("/dicom-web/", "/dicom-web/moved/", 1))
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if kind == "redirect-away" and self.server.redirect_to:
            self.send_response(302)
            self.send_header("Location", self.server.redirect_to + path.removeprefix("/dicom-web"))
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if kind in ("good", "redirect-away", "other-patient", "other-study"):
            return self._send(_multipart(study.files), multipart)
        if kind == "drip-headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom\r\n")
            return self._endless(b"X-Drip: ", b"x", pause_s=1.0)
        self.send_response(200)
        if kind == "single-claims-10gb":
            self.send_header("Content-Type", "application/dicom")
            self.send_header("Content-Length", str(10 * GIB))
        else:
            self.send_header("Content-Type", "application/dicom" if kind == "endless-single" else multipart)
        self.end_headers()
        head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n".encode()
        if kind == "endless-parts":  # valid instances of the series, without end
            one = head + b"\r\n" + study.files[0].read_bytes() + b"\r\n"
            return self._endless(one, one * max(1, MIB // len(one)))
        if kind == "part-claims-10gb":
            return self._endless(head + f"Content-Length: {10 * GIB}\r\n\r\n".encode(), b"\0" * MIB)
        if kind == "drip-body":
            return self._endless(head + b"\r\n", b"\0", pause_s=1.0)
        if kind == "endless-part":
            return self._endless(head + b"\r\n", b"\0" * MIB)
        return self._endless(b"", b"\0" * MIB)  # endless-single and single-claims-10gb


KINDS = [
    "good",
    "endless-parts",
    "endless-part",
    "endless-single",
    "part-claims-10gb",
    "single-claims-10gb",
    "endless-json",
    "drip-body",
    "drip-headers",
    "redirect-away",
    "other-patient",
    "other-study",
]


@dataclass
class Run:
    errors: dict[str, str]  # patient_id -> the error's reason
    paths: dict[str, str]  # patient_id -> errors.csv's path
    ok: list[str]
    maxrss_bytes: int
    store: Path
    studies: dict[str, Study]
    away: Listener
    output: str


def _patient(kind: str) -> str:
    return "H-" + kind


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("hostile")
    studies: dict[str, Study] = {}
    for i, kind in enumerate(KINDS):
        owner = "SOMEONE-ELSE" if kind == "other-patient" else _patient(kind)
        big = kind == "endless-parts"
        files = _series(root / "data" / kind, owner, seed=i, n_slices=2 if big else 4, size=128 if big else 24)
        study_uid, series_uid = _uids(files[0])
        if kind == "other-study":  # the listener answers for this study with instances of another
            study_uid = f"1.2.826.0.1.3680043.10.543.{i}"
        studies[study_uid] = Study(kind, study_uid, series_uid, files)
    disk = _series(root / "data" / "disk", "H-disk", seed=99)

    away = Listener(studies)  # another origin (another port) that would answer with real data
    pacs = Listener(studies, redirect_to=away.url)
    rows = [
        {
            "patient_id": _patient(s.kind),
            "index_time": (ACQUIRED + timedelta(days=1)).isoformat(),
            "imaging": f"dicomweb:studies/{s.uid}",
        }
        for s in studies.values()
    ]
    rows.append({"patient_id": "H-disk", "index_time": rows[0]["index_time"], "imaging": str(disk[0].parent)})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    dicomweb = {
        "url": pacs.url,
        "retries": 1,
        "backoff_s": 0.0,
        "timeout_s": 30.0,  # longer than the drips' pauses: only the deadline cuts them off
        "deadline_s": DEADLINE_S,
        "max_instance_mb": 2,
        "max_series_mb": 8,
        "max_json_mb": 1,
    }
    config = {"imaging": {"spatial_size": [4, 16, 16]}, "dicomweb": dicomweb}
    (root / "ingest.json").write_text(json.dumps(config))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "MEDDX_DICOMWEB_USER": USER,
        "MEDDX_DICOMWEB_PASSWORD": PASSWORD,
    }
    args = [
        sys.executable,
        "-m",
        "meddx.cli",
        "ingest",
        str(root / "manifest.csv"),
        "--cache",
        str(root / "cache"),
        "--config",
        str(root / "ingest.json"),
        "--out",
        str(root / "run"),
        "--workers",
        "0",
        "--quiet",
    ]
    launcher = [sys.executable, "-c", LAUNCHER, str(root / "maxrss.txt")]
    with open(root / "output.txt", "wb") as output:
        # In a session of its own, so that a hung run is stopped whole (launcher, run, and its workers).
        process = subprocess.Popen(
            launcher + args, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        killer = threading.Timer(600, os.killpg, (process.pid, signal.SIGKILL))  # a hung run fails the test
        killer.start()
        try:
            process.wait()
        finally:
            killer.cancel()
    text = (root / "output.txt").read_text()
    assert process.returncode == 0, text
    errors = pd.read_csv(root / "run" / "errors.csv", dtype=str)
    assert len(errors) == len(errors.patient_id.unique())
    yield Run(
        errors=dict(zip(errors.patient_id, errors.error, strict=True)),
        paths=dict(zip(errors.patient_id, errors.path, strict=True)),
        ok=sorted({r["patient_id"] for r in rows} - set(errors.patient_id)),
        maxrss_bytes=int((root / "maxrss.txt").read_text()) * 1024,
        store=root / "cache" / "dicomweb",
        studies=studies,
        away=away,
        output=text,
    )
    pacs.stop()
    away.stop()


def _error(run: Run, kind: str) -> str:
    assert _patient(kind) in run.errors, f"{kind}: no error; {run.output}"
    study = next(s for s in run.studies.values() if s.kind == kind)
    assert run.paths[_patient(kind)].startswith(f"dicomweb:studies/{study.uid}")
    return run.errors[_patient(kind)]


@pytest.mark.slow
def test_the_sound_rows_are_read_and_the_run_stays_small(run: Run) -> None:
    assert run.ok == ["H-disk", "H-good"]
    assert set(run.errors) == {_patient(kind) for kind in KINDS if kind != "good"}
    assert run.maxrss_bytes < 2 * GIB, f"peak memory of the run {run.maxrss_bytes / GIB:.2f} GiB, over 2 GiB"
    # The sound series were stored byte for byte as sent (another patient's too: the row refuses
    # it, not the store); nothing of a refused answer was kept.
    kept = [s for s in run.studies.values() if s.kind in ("good", "other-patient")]
    stored = sorted(run.store.rglob("*.dcm"))
    digest = {hashlib.sha256(p.read_bytes()).hexdigest() for p in stored}
    assert digest == {hashlib.sha256(p.read_bytes()).hexdigest() for s in kept for p in s.files}
    assert {p.parent.name for p in stored} == {s.series_uid for s in kept}
    assert not [p for p in run.store.rglob("*") if ".staging-" in p.name or p.suffix == ".part"]
    assert PASSWORD not in run.output


@pytest.mark.slow
def test_endless_and_oversized_answers_are_cut_off_by_the_limits(run: Run) -> None:
    assert "sent more than 8 MB for one series (dicomweb.max_series_mb); refused" in _error(run, "endless-parts")
    assert "sent more than 2 MB for one instance (dicomweb.max_instance_mb); refused" in _error(run, "endless-part")
    assert "more than 2 MB for one instance (dicomweb.max_instance_mb)" in _error(run, "endless-single")
    assert "announced a part of 10240 MB, more than 2 MB for one instance" in _error(run, "part-claims-10gb")
    assert "announced more than 8 MB for one series" in _error(run, "single-claims-10gb")
    reason = _error(run, "endless-json")
    assert "sent more than 1 MB for a QIDO-RS answer (dicomweb.max_json_mb)" in reason
    assert "MemoryError" not in run.output
    assert "Traceback" not in run.output


@pytest.mark.slow
def test_a_slow_drip_is_cut_off_by_the_deadline(run: Run) -> None:
    for kind in ("drip-body", "drip-headers"):
        assert f"did not finish its answer within {DEADLINE_S:g} s (dicomweb.deadline_s)" in _error(run, kind)


@pytest.mark.slow
def test_a_redirect_to_another_origin_is_not_followed(run: Run) -> None:
    reason = _error(run, "redirect-away")
    assert f"redirected to another origin (http://127.0.0.1:{run.away.server_address[1]}); not followed" in reason
    assert not [path for path, _ in run.away.requests if "/series/" in path]  # nothing was asked of it


@pytest.mark.slow
def test_a_series_of_another_patient_or_study_is_refused(run: Run) -> None:
    assert "belongs to another patient: its PatientID is not the row's patient_id" in _error(run, "other-patient")
    assert "SOMEONE-ELSE" not in run.output
    assert "StudyInstanceUID is not the one asked for" in _error(run, "other-study")


# ------------------------------------------------------------------ in this process, no subprocess


def test_other_origins_are_followed_when_configured_without_the_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meddx.dicomweb.store import SeriesStore

    files = _series(tmp_path / "data", "P1", seed=7)
    study_uid, series_uid = _uids(files[0])
    studies = {study_uid: Study("redirect-away", study_uid, series_uid, files)}
    away = Listener(studies)
    pacs = Listener(studies, redirect_to=away.url)
    monkeypatch.setenv("MEDDX_DICOMWEB_USER", USER)
    monkeypatch.setenv("MEDDX_DICOMWEB_PASSWORD", PASSWORD)
    try:
        config = DicomWebConfig(url=pacs.url, retries=0, follow_other_origins=True)
        folder = SeriesStore(config, tmp_path / "store").fetch(study_uid, series_uid, patient_id="P1")
    finally:
        pacs.stop()
        away.stop()
    assert sorted(p.read_bytes() for p in folder.glob("*.dcm")) == sorted(p.read_bytes() for p in files)
    assert pacs.requests[-1][1] is not None  # the server itself gets the credentials
    assert [auth for path, auth in away.requests] == [None]  # the other origin does not


def _reference_parts(body: bytes, boundary: str) -> list[bytes]:
    """dicomweb-client's own splitting of a multipart body (what the series store wrote before streaming)."""
    import requests
    from dicomweb_client import DICOMwebClient

    response = requests.Response()
    response.headers["content-type"] = f'multipart/related; type="application/dicom"; boundary="{boundary}"'
    response._content = body
    response._content_consumed = True
    client = DICOMwebClient("http://127.0.0.1:1/dicom-web")
    return [bytes(part) for part in client._decode_multipart_message(response, stream=False)]


@pytest.mark.parametrize("chunk", [1, 2, 5, 17, 64, 4096, 1 << 30])
def test_streamed_parts_are_the_bytes_dicomweb_client_gives(chunk: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(chunk)
    contents = [rng.bytes(n) for n in (0, 1, 300, 2000)] + [b"\r\n--not-the-boundary\r\n", b"--" + b"\r\n" * 40]
    headers = ["Content-Type: application/dicom\r\n", "Content-Type: application/dicom\r\nContent-Length: 2000\r\n", ""]
    body = b"".join(
        f"--b0und\r\n{headers[i % 3]}\r\n".encode() + content + b"\r\n" for i, content in enumerate(contents)
    )
    body += b"--b0und--\r\nepilogue, ignored"
    assert _reference_parts(body, "b0und") == contents
    for text in (body, b"a preamble, ignored\r\n" + body):
        pieces = (text[i : i + chunk] for i in range(0, len(text), chunk))
        assert [p.read() for p in write_parts(pieces, b"b0und", tmp_path, 10_000, "test")] == contents


def test_a_multipart_answer_cut_short_is_refused(tmp_path: Path) -> None:
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"x" * 100
    with pytest.raises(AnswerError, match="inside a part"):
        list(write_parts([body], b"b", tmp_path, 10_000, "test"))
    with pytest.raises(AnswerError, match=r"for one instance \(dicomweb.max_instance_mb\); refused"):
        list(write_parts([body + b"\r\n--b--"], b"b", tmp_path, 99, "test"))


def test_the_limits_are_checked_in_the_config() -> None:
    from meddx.config import IngestConfig

    config = IngestConfig(dicomweb=DicomWebConfig(deadline_s=0, max_series_mb=-1, max_json_mb=float("nan")))
    problems = config.problems()
    for name in ("deadline_s", "max_series_mb", "max_json_mb"):
        assert any(p.startswith(f"dicomweb.{name} must be positive") for p in problems), problems
    assert not [p for p in problems if "max_instance_mb" in p]
