# The two commands for a fresh machine:  `make run`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test clean

$(BIN)/face-assets: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,train]'
	touch $@

setup: $(BIN)/face-assets

## Set up, then run the main job on the default input into data/.
run: setup
	$(BIN)/face-assets index

## Set up, then run the whole test suite.
test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) data/*.duckdb data/*.wal data/cache
