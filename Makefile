# convcg: every target installs what it needs into .venv first. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := data/synthetic-small
DEMO_EXPERIMENT ?= unified_parallel
# torch threads of the demo: the setting the README's demo figures were measured at (float32 results depend on it)
DEMO_THREADS ?= 2
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo data test test-all test-extras lint format typecheck clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: pip takes the local CPU build; a resolver must never pull a CUDA torch.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(STAMP) ## Create .venv and install pinned dependencies (torch==2.13.0 first)

$(DEMO_DATA)/impressions.parquet: $(STAMP)
	$(BIN)/convcg data synth --preset small --seed 0 --out $(DEMO_DATA)

data: $(DEMO_DATA)/impressions.parquet ## Generate the default synthetic logs (small preset)

demo: data ## Install, make data, train +experiment=unified_parallel, evaluate, print results
	$(BIN)/convcg data validate $(DEMO_DATA)
	$(BIN)/convcg train +experiment=$(DEMO_EXPERIMENT) data.dir=$(CURDIR)/$(DEMO_DATA) trainer.enable_progress_bar=false threads=$(DEMO_THREADS)
	$(BIN)/convcg eval --run latest threads=$(DEMO_THREADS)
	@echo
	@$(BIN)/convcg runs --limit 5  # the newest runs, and how to open the UI on this store (local or a server)

.PHONY: ablation
ABLATION_GRID ?= designs
ABLATION_ARGS ?=
ablation: data ## Run conf/ablate/designs.yaml on the small logs -> reports/designs/ (~1 h on 2 idle CPU cores)
	$(BIN)/convcg ablate $(ABLATION_GRID) data.dir=$(CURDIR)/$(DEMO_DATA) trainer.enable_progress_bar=false $(ABLATION_ARGS)

.PHONY: bench
BENCH_ARGS ?=
bench: $(STAMP) ## Speed/scale benchmarks -> reports/bench/bench.md + MLflow (20-36 min; BENCH_ARGS=--quick)
	$(BIN)/python -m convcg_cli.bench run $(BENCH_ARGS)

# Workers of one thread each: two torch thread pools sharing two cores wait for each other.
TEST_WORKERS ?= 2
TEST_THREADS = OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 POLARS_MAX_THREADS=1
test: $(STAMP) ## Run the fast test suite: -m "not slow", TEST_WORKERS=2 one-thread workers, ~3 min on 2 idle cores (CI)
	$(TEST_THREADS) $(BIN)/python -m pytest -m "not slow" -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-all: $(STAMP) ## Run every test: the fast suite plus the slow ones (full trainings, DDP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

.PHONY: test-extras
test-extras: $(STAMP) ## Install the optional extras (tune, joblib, slurm) and run the tests that need them (CI skips those)
	$(BIN)/pip install -q -e '.[tune,joblib,slurm]'
	$(BIN)/python -m pytest -q tests/test_tune.py tests/test_hydra_cli.py tests/test_ablate.py $(PYTEST_ARGS)

.PHONY: mutate
MUTATE_ARGS ?=
mutate: $(STAMP) ## Mutation testing of the numerical core -> reports/mutation/report.md (~35 min; MUTATE_ARGS=--module losses)
	nice -n 19 $(BIN)/python tools/mutate.py $(MUTATE_ARGS)

.PHONY: faults
faults: $(STAMP) ## Run the fault-injection tests (marker faults, slow ones included; ~5 min): docs/reference/reliability.md
	$(BIN)/python -m pytest -m faults -q $(PYTEST_ARGS)

.PHONY: browser-test
SCREENSHOTS ?=
browser-test: $(STAMP) ## MLflow UI in headless Chromium (apt-get install chromium first; SCREENSHOTS=docs/mlflow-ui)
	$(BIN)/pip install -q -e '.[browser]'
	CONVCG_UI_SCREENSHOTS=$(SCREENSHOTS) $(BIN)/python -m pytest -m browser -q $(PYTEST_ARGS)

.PHONY: docs
docs: $(STAMP) ## The manual (docs/) into site/ with mkdocs --strict: a broken link, or a config reference older than conf/, fails
	$(BIN)/python tools/config_reference.py --check
	$(BIN)/mkdocs build --strict --site-dir site

lint: $(STAMP) ## ruff lint + format check
	$(BIN)/ruff check convcg_cli tests
	$(BIN)/ruff format --check convcg_cli tests

format: $(STAMP) ## ruff format + autofix
	$(BIN)/ruff format convcg_cli tests
	$(BIN)/ruff check --fix convcg_cli tests

typecheck: $(STAMP) ## mypy on the package
	$(BIN)/mypy convcg_cli

clean: ## Remove outputs, MLflow store and generated data (keeps .venv)
	rm -rf outputs mlflow.db mlartifacts data
