# `make demo` and `make test` each work on a fresh machine: they create .venv and install first, at the
# versions in constraints.txt (the set the suite passes with; pyproject.toml keeps the package's ranges).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINT_STAMP := $(VENV)/.lint-installed
CONSTRAINTS := constraints.txt
PIP := $(PY) -m pip install --quiet -c $(CONSTRAINTS)
# `make test-latest`: the newest versions pip resolves within pyproject.toml's ranges, in a venv of their own,
# on the tests that depend most on the libraries' versions (file formats and codecs, checkpoints, schemas,
# calibration, the sample cohort); .ci/run runs it after `make test`.
LATEST_VENV := .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python
LATEST_TESTS := tests/test_sample_data.py tests/test_ingest_video.py tests/test_ingest_dicom.py \
	tests/test_ingest_fhir.py tests/test_ingest_audio.py tests/test_ingest_notes.py tests/test_ingest_device_logs.py \
	tests/test_models_checkpoint.py tests/test_schemas.py tests/test_calibration.py tests/test_metrics.py

# `make test-quick`: the suite without the tests marked slow (a minute or more: training, end-to-end runs), pacs
# (a real Orthanc), ray (a local Ray) or notebooks (executes notebooks/); markers in pyproject.toml.
QUICK_MARKERS := not slow and not pacs and not ray and not notebooks
# `make doctest`: the docstring examples of the modules whose examples run offline in seconds (from the
# repository root: they read sample_data/ and tests/data/). A module whose examples all run belongs here.
DOCTEST_MODULES := meddx/__init__.py meddx/align.py meddx/arguments.py meddx/batch/engines/local.py \
	meddx/batch/options.py meddx/cache.py meddx/calibration/__init__.py meddx/calibration/conformal.py meddx/calibration/files.py \
	meddx/calibration/isotonic.py meddx/calibration/temperature.py meddx/cli_options.py meddx/cohort.py \
	meddx/config.py meddx/config_files.py meddx/data/__init__.py meddx/data/dataset.py meddx/data/summary.py \
	meddx/data/index.py meddx/data/prefetch.py meddx/dicom_times.py \
	meddx/dicomweb/client.py meddx/dicomweb/guard.py meddx/dicomweb/multipart.py meddx/dicomweb/query.py \
	meddx/dicomweb/ref.py meddx/dicomweb/store.py meddx/errors.py meddx/evaluate.py meddx/export/fhir.py \
	meddx/export/fhir_writes.py meddx/export/sr.py meddx/fhirclient/client.py meddx/fhirclient/query.py \
	meddx/fhirclient/ref.py meddx/fhirclient/search.py meddx/files.py meddx/ingest/audio.py \
	meddx/ingest/device_logs.py meddx/ingest/device_tensorizer.py meddx/ingest/dicom.py meddx/ingest/dicom_io.py \
	meddx/ingest/dicom_series.py meddx/ingest/ehr_tensorizer.py meddx/ingest/fhir.py \
	meddx/ingest/fhir_bulk.py meddx/ingest/fhir_status.py meddx/ingest/fhir_times.py \
	meddx/ingest/fhir_versions.py meddx/ingest/file_checks.py meddx/ingest/image_resize.py \
	meddx/ingest/notes.py meddx/ingest/units.py meddx/ingest/video.py meddx/metrics.py \
	meddx/models/backbone.py meddx/models/config.py meddx/models/encoders/audio.py \
	meddx/models/encoders/device_logs.py meddx/models/encoders/ehr.py meddx/models/encoders/imaging.py \
	meddx/models/encoders/video.py meddx/models/frozen.py meddx/models/heads.py meddx/models/input_ranges.py meddx/models/ood.py \
	meddx/models/pretraining.py meddx/models/text_cache.py meddx/pipelines.py \
	meddx/predictions/columns.py meddx/predictions/table.py meddx/predictions/types.py meddx/records.py \
	meddx/specs.py meddx/splits.py meddx/synth/__init__.py meddx/synth/audio.py meddx/synth/cohort.py \
	meddx/synth/ct.py meddx/synth/device_logs.py meddx/synth/fhir.py meddx/synth/interactions.py meddx/synth/notes.py \
	meddx/synth/video.py meddx/training/__init__.py \
	meddx/training/distributed.py meddx/training/early_stopping.py meddx/training/fits.py \
	meddx/training/trainer.py meddx/training/validation.py

.PHONY: demo test test-quick doctest test-latest lint install constraints sample-data schemas bench clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@echo "installing meddx and its dependencies into $(VENV) at the versions in $(CONSTRAINTS) (PyTorch included: a few minutes)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

$(LINT_STAMP): $(STAMP)
	@echo "installing ruff and mypy into $(VENV)"
	$(PIP) -e '.[test,lint]'
	touch $(LINT_STAMP)

test-latest:
	@echo "installing the newest versions pip resolves for meddx into $(LATEST_VENV) (no constraints: a few minutes)"
	# seeded with a copy of $(VENV) when there is one (PyTorch is most of it); --upgrade-strategy eager
	# then moves every package to the newest release pyproject.toml's ranges admit
	test -x $(LATEST_PY) || { test -x $(PY) && cp -a $(VENV) $(LATEST_VENV); } || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install --quiet --upgrade pip
	$(LATEST_PY) -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[test,lint]'
	@echo "newer than $(CONSTRAINTS):"; $(LATEST_PY) -m pip freeze --all --exclude-editable | grep -vxF -f $(CONSTRAINTS) || echo "  none"
	$(LATEST_PY) -m pytest -q $(LATEST_TESTS)

# After `make test-latest` (and a whole `make test` with those versions) passes: move constraints.txt to them.
constraints:
	test -x $(LATEST_PY) || { echo "run make test-latest first"; exit 1; }
	{ grep '^#' $(CONSTRAINTS); $(LATEST_PY) -m pip freeze --all --exclude-editable; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

demo: $(STAMP)
	$(VENV)/bin/meddx demo --out runs/demo

# Everything: the whole suite, then the docstring examples.
test: $(STAMP)
	$(PY) -m pytest -q
	$(PY) -m pytest -q --doctest-modules $(DOCTEST_MODULES)

test-quick: $(STAMP)
	$(PY) -m pytest -q -m "$(QUICK_MARKERS)"

doctest: $(STAMP)
	$(PY) -m pytest -q --doctest-modules $(DOCTEST_MODULES)

# ruff (lint rules and format) over the library, tests and benchmarks, and mypy over the library; settings in
# pyproject.toml.
LINT_PATHS := meddx tests benchmarks
lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

# Regenerate the committed sample cohort (byte for byte, except the videos: the same decoded frames).
sample-data: $(STAMP)
	rm -rf sample_data
	$(VENV)/bin/meddx sample-data --out sample_data --patients 60 --seed 7

schemas: $(STAMP)
	$(PY) -m meddx.schemas schemas

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf runs .pytest_cache $(LATEST_VENV)
