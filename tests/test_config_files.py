"""Hostile config files (ingest config, backbone config, pipeline) give a clean exit 2 naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from meddx.cli import main
from meddx.config import IngestConfig
from meddx.config_files import MAX_CONFIG_BYTES, MAX_DEPTH, read_config_data
from meddx.errors import ConfigError

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 10)}]\n" for previous, name in zip("abcdef", "bcdefg", strict=True)
)  # 10^7 values once the aliases are expanded
HOSTILE = {
    "nested.yaml": ("[" * 100_000).encode(),
    "nested.json": ("[" * 100_000).encode(),
    "latin1.yaml": "name: caf\xe9\n".encode("latin-1"),
    "laughs.yaml": LAUGHS.encode(),
    "huge.yaml": b"# " + b"x" * MAX_CONFIG_BYTES,
}
SAYS = {
    "nested.yaml": f"nested more than {MAX_DEPTH} levels deep",
    "nested.json": f"nested more than {MAX_DEPTH} levels deep",
    "latin1.yaml": "not UTF-8 text (byte 0xe9 at offset 9)",
    "laughs.yaml": "more than 100000 values",
    "huge.yaml": f"at most {MAX_CONFIG_BYTES} bytes",
}


def _commands(config: Path, tmp_path: Path) -> dict[str, list[str]]:
    missing = str(tmp_path / "no-manifest.csv")  # the config is read before the manifest
    return {
        "ingest": [
            "ingest",
            missing,
            "--config",
            str(config),
            "--cache",
            str(tmp_path / "c"),
            "--out",
            str(tmp_path / "r"),
        ],
        "pretrain": ["pretrain", missing, "--out", str(tmp_path / "b"), "--backbone-config", str(config)],
        "run": ["run", str(config)],
    }


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("command", ["ingest", "pretrain", "run"])
def test_a_hostile_config_file_exits_2_naming_it(tmp_path: Path, name: str, command: str) -> None:
    config = tmp_path / name
    config.write_bytes(HOSTILE[name])
    result = CliRunner().invoke(main, _commands(config, tmp_path)[command])
    assert result.exit_code == 2, (result.output, result.exception)
    assert SAYS[name] in result.output
    assert str(config) in result.output
    assert "Traceback" not in result.output


def test_the_limits_leave_real_configs_alone(tmp_path: Path) -> None:
    """A config nested to the limit reads; one level more is refused; a byte-order mark is fine."""
    at_limit = "a: " + "{b: " * (MAX_DEPTH - 1) + "1" + "}" * (MAX_DEPTH - 1) + "\n"
    path = tmp_path / "deep.yaml"
    path.write_text(at_limit)
    value = read_config_data(path, "test config")
    for _ in range(MAX_DEPTH):  # the top mapping and MAX_DEPTH - 1 inside it
        value = value["a" if "a" in value else "b"]
    assert value == 1
    path.write_text("a: " + "{b: " * MAX_DEPTH + "1" + "}" * MAX_DEPTH + "\n")
    with pytest.raises(ConfigError, match="nested more than"):
        read_config_data(path, "test config")
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"video": {"n_frames": 8}}')
    assert IngestConfig.from_file(bom).video.n_frames == 8
    merged = tmp_path / "merged.yaml"  # anchors and merge keys still work within the bounds
    merged.write_text("base: &base {n_frames: 8}\nvideo: {<<: *base}\n")
    assert read_config_data(merged, "test config")["video"] == {"n_frames": 8}
