"""A real FHIR server for the tests: Medplum's FHIR engine (tests/fhir_server/server.mjs) on a loopback port.

The server is Node code installed by ``npm ci --prefix tests/fhir_server`` (``.ci/run`` does it).
Without Node 20+ or without that install, :func:`skip_reason` says why and the tests skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SERVER_DIR = Path(__file__).resolve().parent / "fhir_server"
STARTUP_SECONDS = 180  # a ceiling on the engine's start (it loads the FHIR definitions), not a measurement


def skip_reason() -> str | None:
    """Why the FHIR server cannot run here, or None when it can."""
    node = shutil.which("node")
    if node is None:
        return "Node.js is not installed (the test FHIR server is Medplum's engine on Node 20+)"
    if not (SERVER_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir():
        return "the test FHIR server is not installed; run: npm ci --prefix tests/fhir_server"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    try:
        major = int(version.lstrip("v").split(".")[0])
    except ValueError:
        return f"cannot tell the Node.js version ({version!r})"
    if major < 20:
        return f"Node.js {version} is too old for Medplum's engine (needs 20+)"
    return None


class FhirTestServer:
    """A started server: ``base`` is its FHIR base URL; ``stop()`` ends it.

    Args:
        bearer: a token every request must carry (``Authorization: Bearer``); None: no authentication.
        pending_polls: how often a Bulk export's status URL answers 202 before the manifest.
    """

    def __init__(self, bearer: str | None = None, pending_polls: int = 1):
        env = {**os.environ, "EXPORT_PENDING_POLLS": str(pending_polls)}
        env.pop("FHIR_TEST_BASIC", None)
        env.pop("FHIR_TEST_BEARER", None)
        if bearer:
            env["FHIR_TEST_BEARER"] = bearer
        self.bearer = bearer
        self.process = subprocess.Popen(
            [shutil.which("node") or "node", "--experimental-websocket", str(SERVER_DIR / "server.mjs")],
            cwd=SERVER_DIR,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        port: list[int] = []
        ready = threading.Event()
        log: list[str] = []

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                log.append(line)
                if line.startswith("LISTENING ") and not port:
                    port.append(int(line.split()[1]))
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(STARTUP_SECONDS)
        if not port:
            self.stop()
            raise RuntimeError(f"the test FHIR server did not start: {''.join(log)[-2000:]}")
        self.port = port[0]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.base = f"{self.origin}/fhir/R4"

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One request straight to the server (test set-up and checks), with the token if any."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(path if "://" in path else f"{self.base}/{path}", data=data, method=method)
        req.add_header("Content-Type", "application/fhir+json")
        if self.bearer:
            req.add_header("Authorization", f"Bearer {self.bearer}")
        try:
            with urllib.request.urlopen(req, timeout=120) as answer:
                text = answer.read()
                return answer.status, json.loads(text) if text else None
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def load(self, resources: Iterable[dict[str, Any]], chunk: int = 200) -> int:
        """Create resources (their ids kept) with batch Bundles; returns how many were created."""
        items = list(resources)
        for start in range(0, len(items), chunk):
            entries = [
                {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                for r in items[start : start + chunk]
            ]
            status, answer = self.request("POST", "", {"resourceType": "Bundle", "type": "batch", "entry": entries})
            assert status == 200, answer
            for entry in answer["entry"]:
                assert entry["response"]["status"].startswith("20"), entry
        return len(items)

    def search_all(self, query: str) -> list[dict[str, Any]]:
        """Every resource a search finds (pages followed)."""
        found: list[dict[str, Any]] = []
        url: str | None = query
        while url:
            status, page = self.request("GET", url)
            assert status == 200, page
            found += [e["resource"] for e in page.get("entry", [])]
            url = next((lk["url"] for lk in page.get("link", []) if lk["relation"] == "next"), None)
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
