"""Shared fixtures: a real Orthanc PACS with its DICOMweb plugin, on a free loopback port, and
one tiny model fine-tuned on the bundled sample cohort, for every test that needs one.

Debian's ``orthanc`` and ``orthanc-dicomweb`` packages provide the PACS (``.ci/run`` installs
them); where they are absent, the tests that need the server are skipped with that reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meddx.dicomweb.orthanc import OrthancServer, orthanc_available

NO_ORTHANC = (
    "Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb);"
    " the PACS tests need a real server"
)


def _needs_orthanc() -> None:
    if not orthanc_available():
        pytest.skip(NO_ORTHANC)
    pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed (pip install dicomweb-client)")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A running Orthanc shared by a test module; stopped after it."""
    _needs_orthanc()
    server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[[], OrthancServer]]:
    """Start Orthanc servers of a test's own (to stop them in the test); all stopped after it."""
    _needs_orthanc()
    started: list[OrthancServer] = []

    def start() -> OrthancServer:
        server = OrthancServer(tmp_path / f"orthanc{len(started)}").start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# Markers set by the fixtures a test needs (pyproject.toml registers them; `make test-quick` leaves them out).
# tiny_model trains a model (about 30 s on 2 cores); the tests that need it are slow.
MARKER_OF_FIXTURE = {"orthanc": "pacs", "orthanc_factory": "pacs", "local_ray": "ray", "tiny_model": "slow"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that use a real Orthanc ``pacs``, those that start a local Ray ``ray``, and those that
    need the trained ``tiny_model`` ``slow``."""
    for item in items:
        for name in sorted({MARKER_OF_FIXTURE[f] for f in getattr(item, "fixturenames", ()) if f in MARKER_OF_FIXTURE}):
            item.add_marker(name)


REPO = Path(__file__).resolve().parents[1]
SAMPLE_MANIFEST = REPO / "sample_data" / "manifest.csv"


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory) -> Path:
    """An ingest cache shared by the tests that read sample_data (each file is read once)."""
    return tmp_path_factory.mktemp("sample-cache")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, sample_cache: Path) -> Path:
    """A model folder: a new tiny backbone fine-tuned end to end for two epochs on sample_data, calibrated."""
    from meddx.models import BackboneConfig
    from meddx.training import finetune

    out = tmp_path_factory.mktemp("tiny-model")
    finetune(
        SAMPLE_MANIFEST,
        out,
        mode="full",
        epochs=2,
        seed=0,
        cache_dir=sample_cache,
        workers=2,
        progress=False,
        backbone_config=BackboneConfig(d_model=16, n_layers=1, n_heads=2),
    )
    return out


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie has stopped; only its parent has not reaped it yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
