# Tetherless — developer entry points. Each target refreshes .venv when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ./data
LISTEN ?= 127.0.0.1:8080
PYTEST_ARGS ?=

.PHONY: run test lint typecheck contracts check bench clean openapi chart validate-deploy fuzz crash-test

$(BIN)/activate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(BIN)/activate

run: $(BIN)/activate
	$(BIN)/tetherless serve --data $(DATA) --listen $(LISTEN)

test: $(BIN)/activate
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(BIN)/activate
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/activate
	$(BIN)/mypy

contracts: $(BIN)/activate
	$(BIN)/lint-imports

check: lint typecheck contracts test

openapi: $(BIN)/activate
	$(BIN)/tetherless admin openapi > docs/openapi.json

# Render every chart scenario and kustomize overlay into build/deploy/ (lint + strict schema checks).
chart: $(BIN)/activate
	$(BIN)/python -m deploy.render --out build/deploy

# All offline deployment checks: the above, the kubernetes-validate CLI on its output, then tests/deploy.
validate-deploy: chart
	$(BIN)/kubernetes-validate --strict --quiet --no-warn build/deploy/*.yaml
	$(BIN)/python -m pytest tests/deploy $(PYTEST_ARGS)

bench: $(BIN)/activate
	$(BIN)/python -m bench

# Long fuzzing runs: hypothesis decoders + schemathesis with FUZZ_EXAMPLES each, then atheris if installed.
FUZZ_EXAMPLES ?= 2000
FUZZ_SECONDS ?= 300
fuzz: $(BIN)/activate
	TETHERLESS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/fuzz -o timeout=0 -q
	if $(BIN)/python -c 'import atheris' 2>/dev/null; then \
		$(BIN)/python -m tests.fuzz.atheris_decoders -max_total_time=$(FUZZ_SECONDS); fi

# Jepsen-style crash checker: CRASH_CYCLES SIGKILL/restart cycles under concurrent sends.
CRASH_CYCLES ?= 100
crash-test: $(BIN)/activate
	$(BIN)/python -m tests.jepsen.crash_checker --cycles $(CRASH_CYCLES)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
