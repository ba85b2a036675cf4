# birefnet-pipeline: `make repro` sets everything up and runs the pipeline; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin

include offline.env
export $(shell sed -n 's/^\([A-Z_][A-Z0-9_]*\)=.*/\1/p' offline.env)
export PREFECT_HOME := $(abspath $(PREFECT_HOME))
export PYTHONPATH := $(abspath $(PYTHONPATH))
export PATH := $(BIN):$(PATH)

.PHONY: repro test test-fast test-gpu lint setup

$(VENV)/.installed: pyproject.toml requirements.lock
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import birefnet, torch, timm, ray, mlflow, prefect, dvc, webdataset"
	touch $@

## setup: create .venv with the pinned dependencies (also done by repro and test)
setup: $(VENV)/.installed

## repro: install if needed, then run the whole pipeline (dvc repro) on params.yaml
repro: $(VENV)/.installed
	$(BIN)/dvc repro

## test: the full suite, slow end-to-end tests included (what CI runs)
test: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not gpu and not data" $(PYTEST_ARGS)

## test-fast: the quick lane (no slow tests)
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## test-gpu: the gpu lane (needs a CUDA device; fails without one). benchmarks/gpu_check.sh runs it plus the GPU benchmarks
test-gpu: $(VENV)/.installed
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check birefnet pipelines tests benchmarks

# ---- Prefect: local server, process worker and the retrain deployment (README: "Scheduling with Prefect") ----
PREFECT_PORT ?= 4200
PREFECT_POOL ?= birefnet-process
PREFECT_LOCAL_API := http://127.0.0.1:$(PREFECT_PORT)/api

.PHONY: prefect-server prefect-worker deploy

## prefect-server: a Prefect server on 127.0.0.1:$(PREFECT_PORT) (UI and API); Ctrl-C stops it
prefect-server: $(VENV)/.installed
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

## prefect-worker: a process worker of pool $(PREFECT_POOL) (runs the retrain flow runs); Ctrl-C twice stops it
prefect-worker: $(VENV)/.installed
	PREFECT_API_URL=$${PREFECT_API_URL:-$(PREFECT_LOCAL_API)} $(BIN)/prefect worker start --pool $(PREFECT_POOL) --type process

## deploy: create the work pool (infra/prefect/work-pool.json) if missing, then create or update the retrain
## deployment of prefect.yaml (cron, concurrency limit 1) from this folder with Prefect's CLI
deploy: $(VENV)/.installed
	export PREFECT_API_URL=$${PREFECT_API_URL:-$(PREFECT_LOCAL_API)}; \
	$(BIN)/prefect work-pool inspect $(PREFECT_POOL) >/dev/null 2>&1 || \
	  $(BIN)/prefect work-pool create $(PREFECT_POOL) --type process --base-job-template infra/prefect/work-pool.json; \
	BIREFNET_REPO=$(CURDIR) $(BIN)/prefect --no-prompt deploy --all
