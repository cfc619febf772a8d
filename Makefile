# `make demo` and `make test` each work on a fresh machine: they create .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINT_STAMP := $(VENV)/.lint-installed

.PHONY: demo test lint install sample-data schemas bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

$(LINT_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,lint]'
	touch $(LINT_STAMP)

demo: $(STAMP)
	$(VENV)/bin/meddx demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

# ruff (lint rules and format) and mypy over the library; settings in pyproject.toml.
lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check meddx
	$(VENV)/bin/ruff format --check meddx
	$(VENV)/bin/mypy

# Regenerate the committed sample cohort byte-for-byte.
sample-data: $(STAMP)
	rm -rf sample_data
	$(VENV)/bin/meddx sample-data --out sample_data --patients 60 --seed 7

schemas: $(STAMP)
	$(PY) -m meddx.schemas schemas

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf runs .pytest_cache
