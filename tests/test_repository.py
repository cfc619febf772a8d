"""The repository stands on its own: no tracked file reads or links a path outside it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Spelled so that this file does not match its own patterns.
OUTSIDE = [
    (re.compile(r"\.\.[/\\]shared\b"), "a sibling 'shared' folder"),
    (re.compile(r"(?<![\w.])/wor[k]/"), "an absolute /work path"),
    (re.compile(r"(?<![\w.])/(?:hom[e]|User[s])/[A-Za-z_]"), "an absolute home folder"),
    (re.compile(r"(?<![\w.])/roo[t]/"), "root's home folder"),
    (re.compile(r"[A-Za-z]:\\\\?User[s]\\"), "a Windows home folder"),
]
# Path(__file__).resolve().parents[N] and Path(__file__).parent.parent...: checked against the file's depth.
PARENTS_INDEX = re.compile(r"__file__\)(?:\.resolve\(\)|\.absolute\(\))?\.parents\[(\d+)\]")
PARENT_CHAIN = re.compile(r"__file__\)(?:\.resolve\(\)|\.absolute\(\))?((?:\.parent)+)\b")


def tracked_files() -> list[Path]:
    """Files git tracks; without git (an unpacked archive), every file but caches."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, text=True
        ).stdout.split("\0")
        return [Path(name) for name in listed if name]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "runs", ".pytest_cache", "__pycache__", ".mypy_cache", ".ruff_cache"}
        found = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
            found += [Path(folder, f).relative_to(ROOT) for f in files]
        return found


def outside_references(relative: Path, text: str) -> list[str]:
    """Where ``text`` (the content of ``relative``) names a path outside the repository."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for pattern, what in OUTSIDE:
            if pattern.search(line):
                found.append(f"{relative}:{number}: {what}: {line.strip()[:120]}")
        ups = [int(n) + 1 for n in PARENTS_INDEX.findall(line)]
        ups += [chain.count(".parent") for chain in PARENT_CHAIN.findall(line)]
        if any(up > len(relative.parts) for up in ups):  # climbs above the repository root
            found.append(f"{relative}:{number}: climbs out of the repository: {line.strip()[:120]}")
    return found


def test_no_tracked_file_refers_to_a_path_outside_the_repository() -> None:
    problems = []
    files = tracked_files()
    assert Path("README.md") in files
    assert Path("meddx/__init__.py") in files
    for relative in files:
        path = ROOT / relative
        if path.is_symlink():
            target = (path.parent / os.readlink(path)).resolve()
            if not target.is_relative_to(ROOT):
                problems.append(f"{relative}: a link to {target}, outside the repository")
            continue
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary (DICOM, audio, video)
            continue
        problems += outside_references(relative, data.decode("utf-8", errors="replace"))
    assert not problems, "files that refer to paths outside the repository:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("relative", "line", "bad"),
    [
        ("README.md", "see ../" + "shared/DESIGN.md", True),
        ("tests/test_x.py", "DATA = Path(__file__).resolve()" + '.parents[2] / "sha' + 'red" / "data"', True),
        ("tests/test_x.py", 'DATA = Path(__file__).resolve().parents[1] / "tests" / "data"', False),
        ("bench.py", "ROOT = Path(__file__).parent.parent", True),
        ("a/b/c.py", "ROOT = Path(__file__).parent.parent", False),
        ("docs/x.md", "cd /" + "work/main && make", True),
        ("docs/x.md", "cache under /" + "home/alice/.cache", True),
        ("docs/x.md", "look in sample_data/patients/P0001", False),
    ],
)
def test_the_check_catches_what_it_should(relative: str, line: str, bad: bool) -> None:
    assert bool(outside_references(Path(relative), line)) is bad
