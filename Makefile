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

.PHONY: demo test test-latest lint install constraints sample-data schemas bench clean

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

test: $(STAMP)
	$(PY) -m pytest -q

# ruff (lint rules and format) and mypy over the library; settings in pyproject.toml.
lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check meddx
	$(VENV)/bin/ruff format --check meddx
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
