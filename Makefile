# Two commands do all set-up: `make repro` and `make test` (both create .venv when missing).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The install is redone when pyproject.toml changes: the stamp's name carries its hash.
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
MNIST_DIR ?=
PYTEST_ARGS ?=
# test workers (pytest-xdist): one per core, at most 4 (each test may start several trial processes)
TEST_JOBS ?= auto
XDIST := -n $(TEST_JOBS) --maxprocesses=4 --dist loadgroup
# pip without its version nag and progress bars (the install is still reported when it fails).
PIP := $(BIN)/python -m pip --quiet --disable-pip-version-check --no-input
UI_HOST ?= 127.0.0.1
UI_PORT ?= 5000
# empty: the store conf/ defines (paths.mlruns_dir); MLRUNS=/dir shows another one
MLRUNS ?=
SEEDS ?= 5
REPRODUCE_ARGS ?=

.PHONY: setup repro mirror test test-fast ui server sweep bench params clean-stale reproduce

# After the install, `source .venv/bin/activate` also points the `mlflow` CLI at the project's store (once per venv).
setup: $(STAMP)
	@grep -q 'mnistlab-runs activate-hook' $(BIN)/activate || \
	  $(BIN)/mnistlab-runs activate-hook $(if $(MLRUNS),paths.mlruns_dir=$(abspath $(MLRUNS))) >> $(BIN)/activate

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

# MNIST_DIR=/dir points the `mnist-source` DVC remote at a local mirror (git-ignored .dvc/config.local).
# params.yaml is regenerated from conf/ first, so an edit in conf/ is what `dvc repro` sees.
repro: setup mirror
	$(BIN)/python -m mnistlab.params
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro || { $(BIN)/python -m mnistlab.data.hints; exit 1; }

mirror:
ifneq ($(MNIST_DIR),)
	$(BIN)/dvc remote modify --local mnist-source url "$(abspath $(MNIST_DIR))"
endif

test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

# The MLflow UI over the store conf/ defines, on loopback unless UI_HOST says otherwise; prints the link to the
# experiment's training runs first.
ui: setup
	@$(BIN)/mnistlab-runs ui --host $(UI_HOST) --port $(UI_PORT) $(if $(MLRUNS),paths.mlruns_dir=$(abspath $(MLRUNS)))

# The team tracking server (README "Scaling out"): runs and metrics in a database (PostgreSQL; needs the
# `postgres` extra), artifacts proxied into ARTIFACTS_DIR, so nodes need only http://SERVER_HOST:SERVER_PORT.
# Loopback unless SERVER_HOST says otherwise (e.g. SERVER_HOST=0.0.0.0 for the cluster's nodes).
BACKEND_STORE_URI ?= postgresql://mlflow@127.0.0.1:5432/mlflow
ARTIFACTS_DIR ?= mlflow-artifacts
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 5000
SERVER_WORKERS ?= 2
server: setup
	$(BIN)/mlflow server --backend-store-uri "$(BACKEND_STORE_URI)" --serve-artifacts \
	  --artifacts-destination "$(abspath $(ARTIFACTS_DIR))" --host $(SERVER_HOST) --port $(SERVER_PORT) \
	  --workers $(SERVER_WORKERS)

# The optimizer study through DVC (study/dvc.yaml): explore (108 trials), refine, confirm and longer stages, stacked
# (launcher=stacked), report in reports/; the README quotes the generated findings (reports/study.md).
sweep: setup mirror
	$(BIN)/python -m mnistlab.params
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro study/dvc.yaml || { $(BIN)/python -m mnistlab.data.hints; exit 1; }
	$(BIN)/mnistlab-report --quote-into README.md

# Both notebook presets over SEEDS seeds (tracked runs), vs the published numbers: reports/reproduce.*, README table.
# REPRODUCE_ARGS: more flags and Hydra overrides for every run, e.g. REPRODUCE_ARGS=num_threads=1
reproduce: setup mirror
	$(BIN)/python -m mnistlab.params
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro preprocess || { $(BIN)/python -m mnistlab.data.hints; exit 1; }
	$(BIN)/python -m mnistlab.reproduce --seeds $(SEEDS) $(REPRODUCE_ARGS)

bench: setup
	$(BIN)/python benchmarks/epoch_speed.py
	$(BIN)/python benchmarks/command_speed.py
	$(BIN)/python benchmarks/sweep_speed.py

# Regenerates params.yaml (the composed conf/ that `dvc repro` reads) after editing conf/.
params: setup
	$(BIN)/python -m mnistlab.params

clean-stale: setup
	$(BIN)/mnistlab-runs clean-stale
