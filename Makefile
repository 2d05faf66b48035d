# Tetherless — developer entry points.
#
# Dependencies are installed from the hash-pinned lock files in requirements/
# (docs/decisions/0007-lock-files.md): `make run` installs only what the relay
# and the client need, `make test` adds the development tools. A stamp file
# per layer re-installs when its lock file or pyproject.toml changes;
# `make lock` refreshes the lock files after pyproject.toml changed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ./data
LISTEN ?= 127.0.0.1:8080
PYTEST_ARGS ?=
PIP    := $(BIN)/python -m pip --disable-pip-version-check
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP     := $(VENV)/.installed-dev

.PHONY: run test lint typecheck contracts check bench clean openapi chart validate-deploy fuzz crash-test crash-test-postgres lock mutation

$(BIN)/python:
	@echo "make: creating the virtual environment $(VENV) ($(PYTHON))"
	$(PYTHON) -m venv $(VENV)

$(RUNTIME_STAMP): requirements/runtime.txt requirements/build.txt pyproject.toml | $(BIN)/python
	@echo "make: installing the locked runtime dependencies (requirements/runtime.txt) into $(VENV)"
	$(PIP) install --quiet --require-hashes --no-deps -r requirements/runtime.txt -r requirements/build.txt
	@echo "make: installing tetherless itself (editable)"
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	@touch $@

$(DEV_STAMP): requirements/dev.txt $(RUNTIME_STAMP)
	@echo "make: installing the locked development tools (requirements/dev.txt) into $(VENV)"
	$(PIP) install --quiet --require-hashes --no-deps -r requirements/dev.txt
	$(PIP) check
	@touch $@

run: $(RUNTIME_STAMP)
	@echo "make: starting the relay: $(BIN)/tetherless serve --data $(DATA) --listen $(LISTEN) (Ctrl-C stops it)"
	@$(BIN)/tetherless serve --data $(DATA) --listen $(LISTEN)

test: $(DEV_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Refresh the lock files (universal: every platform's wheels, CPython 3.11 and later).
lock: $(DEV_STAMP)
	$(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes -q -o requirements/runtime.txt
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 --generate-hashes -q -o requirements/dev.txt
	$(BIN)/uv pip compile requirements/build.in --universal --python-version 3.11 --generate-hashes -q -o requirements/build.txt

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

contracts: $(DEV_STAMP)
	$(BIN)/lint-imports

check: lint typecheck contracts test

openapi: $(DEV_STAMP)
	$(BIN)/tetherless admin openapi > docs/openapi.json

# Render every chart scenario and kustomize overlay into build/deploy/ (lint + strict schema checks).
chart: $(DEV_STAMP)
	$(BIN)/python -m deploy.render --out build/deploy

# All offline deployment checks: the above, the kubernetes-validate CLI on its output, then tests/deploy.
validate-deploy: chart
	$(BIN)/kubernetes-validate --strict --quiet --no-warn build/deploy/*.yaml
	$(BIN)/python -m pytest tests/deploy $(PYTEST_ARGS)

bench: $(DEV_STAMP)
	$(BIN)/python -m bench

# Long fuzzing runs: hypothesis decoders + schemathesis with FUZZ_EXAMPLES each, then atheris if installed.
FUZZ_EXAMPLES ?= 2000
FUZZ_SECONDS ?= 300
fuzz: $(DEV_STAMP)
	TETHERLESS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/fuzz -o timeout=0 -q
	if $(BIN)/python -c 'import atheris' 2>/dev/null; then \
		$(BIN)/python -m tests.fuzz.atheris_decoders -max_total_time=$(FUZZ_SECONDS); fi

# Jepsen-style crash checker: CRASH_CYCLES SIGKILL/restart cycles under concurrent sends.
CRASH_CYCLES ?= 100
crash-test: $(DEV_STAMP)
	$(BIN)/python -m tests.jepsen.crash_checker --cycles $(CRASH_CYCLES)

# The same with two replicas on PostgreSQL (one SIGKILLed per cycle); CRASH_DATABASE: a server URL whose
# role may create databases (a scratch database is created and dropped).
CRASH_DATABASE ?= $(or $(TETHERLESS_TEST_DATABASE),postgresql://tetherless:tetherless@127.0.0.1:5432/tetherless)
crash-test-postgres: $(DEV_STAMP)
	$(BIN)/python -m tests.jepsen.crash_checker --database $(CRASH_DATABASE) --cycles $(CRASH_CYCLES)

# Mutation testing of the security checks (outside CI; docs/security.md "Mutation testing"): mutmut
# over MUTATION_MODULES with the unit tests in tests/protocol ([tool.mutmut] in pyproject.toml), at
# low priority on MUTATION_WORKERS processes (timing: docs/security.md); the results stay in
# mutants/ (`mutmut show NAME` prints a mutant), the per-module summary goes to
# build/mutation/summary.json and the target fails while a survivor is neither killed nor
# explained in docs/security.md.
MUTATION_MODULES ?= protocol.ratchet.* protocol.session.* protocol.handshake.* protocol.webauthn.* \
	protocol.device_list.* protocol.log.* protocol.enrolment.* protocol.client.chains.* protocol.client.sessions.*
MUTATION_WORKERS ?= 2
mutation: $(DEV_STAMP)
	nice -n 10 $(BIN)/mutmut run --max-children $(MUTATION_WORKERS) $(foreach m,$(MUTATION_MODULES),'$(m)')
	$(BIN)/python -m tests.mutation_summary

# The browser client (web/README.md): install the locked npm packages when web/package-lock.json is newer
# than the installed tree, then rebuild web/dist/ (committed; tests/web checks it matches a fresh build).
.PHONY: web
web: web/node_modules/.package-lock.json
	cd web && npm run build
web/node_modules/.package-lock.json: web/package-lock.json
	cd web && npm ci --no-audit --no-fund

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
