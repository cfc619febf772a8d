"""The ``meddx pacs`` and ``meddx fhir`` commands: manifests and exports from a PACS and the EHR's FHIR server.

They are registered on the ``meddx`` group by :mod:`meddx.cli`. Heavy libraries are imported
inside the commands so that ``meddx --help`` starts fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from meddx.arguments import IngestArgs
from meddx.cli_errors import handle_errors
from meddx.cli_options import option
from meddx.errors import ConfigError

quiet_option = option(IngestArgs, "progress")  # --quiet: progress=False


@click.group("pacs")
def pacs() -> None:
    """Work with a PACS over DICOMweb (server and credentials from --config and the environment)."""


@pacs.command("manifest")
@click.option("--modality", required=True, help="DICOM Modality the studies must hold (CT, MR, CR...).")
@click.option("--since", required=True, type=click.DateTime(["%Y-%m-%d"]), help="First StudyDate, YYYY-MM-DD.")
@click.option("--until", default=None, type=click.DateTime(["%Y-%m-%d"]), help="Last StudyDate (inclusive).")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The manifest CSV to write (patient_id, index_time, imaging).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Ingest config (YAML/JSON): its dicomweb section names the server, site_timezone the zone.",
)
@click.option(
    "--index-offset",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Minutes after the study's date and time that make each row's index time.",
)
@handle_errors
def pacs_manifest(modality: str, since, until, out: Path, config_file: Path | None, index_offset: float) -> None:
    """Query the PACS (QIDO-RS) and write one manifest row per study found, ready for ingest and diagnosis."""
    from datetime import timedelta

    from meddx.config import IngestConfig
    from meddx.dicomweb.query import pacs_manifest as query

    config = IngestConfig.from_file(config_file) if config_file is not None else IngestConfig()
    if until is not None and until < since:
        raise ConfigError(f"--until {until:%Y-%m-%d} is before --since {since:%Y-%m-%d}")
    found = query(
        config.dicomweb,
        modality,
        since.date(),
        until.date() if until is not None else None,
        site_zone=config.site_zone(),
        index_offset=timedelta(minutes=index_offset),
    )
    found.write(out)
    left_out = "".join(f"; {n} left out ({why})" for why, n in found.skipped.items())
    click.echo(f"{found.n_studies} {modality.upper()} stud{'y' if found.n_studies == 1 else 'ies'} found{left_out}")
    click.echo(f"wrote {len(found.rows)} row{'s' if len(found.rows) != 1 else ''} to {out}")


@click.group("fhir")
def fhir() -> None:
    """Work with the EHR's FHIR server (server from --config or MEDDX_FHIR_URL, credentials from the environment)."""


fhir_config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Ingest config (YAML/JSON): its fhir section names the server, site_timezone the zone.",
)


@fhir.command("manifest")
@click.option("--encounter-class", required=True, help="Encounter class code (IMP inpatient, EMER, AMB...).")
@click.option("--since", required=True, type=click.DateTime(["%Y-%m-%d"]), help="First start date, YYYY-MM-DD.")
@click.option("--until", default=None, type=click.DateTime(["%Y-%m-%d"]), help="Last start date (inclusive).")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The manifest CSV to write (patient_id, index_time, ehr, encounter).",
)
@fhir_config_option
@click.option(
    "--index-offset",
    default=24.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Hours after the encounter's start that make each row's index time.",
)
@handle_errors
def fhir_manifest_command(
    encounter_class: str, since, until, out: Path, config_file: Path | None, index_offset: float
) -> None:
    """Search the FHIR server for Encounters and write one manifest row per encounter (ehr = fhir:Patient/<id>)."""
    from datetime import timedelta

    from meddx.config import IngestConfig
    from meddx.fhirclient.query import fhir_manifest

    config = IngestConfig.from_file(config_file) if config_file is not None else IngestConfig()
    if until is not None and until < since:
        raise ConfigError(f"--until {until:%Y-%m-%d} is before --since {since:%Y-%m-%d}")
    found = fhir_manifest(
        config.fhir,
        encounter_class,
        since.date(),
        until.date() if until is not None else None,
        site_zone=config.site_zone(),
        index_offset=timedelta(hours=index_offset),
    )
    found.write(out)
    left_out = "".join(f"; {n} left out ({why})" for why, n in found.skipped.items())
    click.echo(
        f"{found.n_encounters} {encounter_class} encounter{'s' if found.n_encounters != 1 else ''} found{left_out}"
    )
    click.echo(f"wrote {len(found.rows)} row{'s' if len(found.rows) != 1 else ''} to {out}")


@fhir.command("export")
@click.option("--since", default=None, type=click.DateTime(["%Y-%m-%d"]), help="Only resources changed after it.")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The folder to write (a Bulk export folder, readable as an ehr column); run again to resume.",
)
@click.option(
    "--type",
    "types",
    multiple=True,
    help="A resource type to export (repeat; default: the types the EHR reader uses).",
)
@fhir_config_option
@quiet_option
@handle_errors
def fhir_export_command(since, out: Path, types: tuple[str, ...], config_file: Path | None, progress: bool) -> None:
    """Bulk-export the FHIR server's resources ($export) into NDJSON files the EHR reader reads."""
    from datetime import timezone

    from meddx.config import IngestConfig
    from meddx.fhirclient.bulk import DEFAULT_TYPES, bulk_export

    config = IngestConfig.from_file(config_file) if config_file is not None else IngestConfig()
    result = bulk_export(
        config.fhir,
        out,
        since=since.replace(tzinfo=timezone.utc) if since is not None else None,
        types=tuple(types) or DEFAULT_TYPES,
        progress=progress,
    )
    size = sum(result.files.values())
    click.echo(
        f"{'resumed: ' if result.resumed else ''}{len(result.files)} NDJSON file(s), {size / 2**20:.1f} MiB,"
        f" in {result.out_dir} (transaction time {result.transaction_time})"
    )
