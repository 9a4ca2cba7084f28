# One-command entry points (see README). VENV can be overridden: make test VENV=/path/to/venv
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export DVC_NO_ANALYTICS := 1

.PHONY: setup run test test-fast bench ui tracking-server tracking-server-stop clean-venv readme-results

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## run: set up, then run the whole DVC pipeline (synthetic data, local SQLite MLflow, CPU)
run: $(STAMP)
	test -d .git || git init --quiet
	test -d .dvc || $(VENV)/bin/dvc init --quiet
	PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/dvc repro --keep-going dvc.yaml || \
	  { PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/dvc repro --single-item report; exit 1; }

## readme-results: rewrite the README's results block from the runs in mlflow.db (after `make run`)
readme-results: $(STAMP)
	$(VENV)/bin/unet3plus report --out reports/ablations.md --readme README.md --spread benchmarks/bench_recipe.json

## test: set up, then run the test suite
test: $(STAMP)
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --timeout 600 --durations 15

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_preprocess.py
	$(PY) benchmarks/bench_models.py

## tracking-server: a team tracking server on this machine: PostgreSQL + MLflow with basic auth on
## http://127.0.0.1:5000, data and generated passwords under .tracking/ (prints what to export)
tracking-server: $(STAMP)
	$(PY) -m unet3plus.tracking_server start --root .tracking

tracking-server-stop: $(STAMP)
	$(PY) -m unet3plus.tracking_server stop --root .tracking

## ui: browse runs and registered models; open the printed URL (the runs table, not the GenAI overview)
ui: $(STAMP)
	@echo "Runs: $$($(PY) -c 'from unet3plus.config import load_config; from unet3plus.tracking import runs_view_url; print(runs_view_url(load_config("params.yaml").mlflow))')"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000
