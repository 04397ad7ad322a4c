# mocoq: `make train` pre-trains MoCo v2 on Fashion-MNIST for 10 minutes; `make test` runs the tests.
# Both set themselves up from a clean clone. `make help` lists every target.

PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
# torch and torchvision are installed first, pinned, so pip does not fetch another build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
ARGS       ?=
PYTEST_ARGS ?=
# pytest-xdist workers for make test (auto: one per core; 0: in this process, one at a time).
TEST_WORKERS ?= auto
# The recipe `make train` runs (conf/experiment/); ARGS="experiment=..." picks another.
TRAIN_RECIPE ?= fmnist_cpu_10min

.DEFAULT_GOAL := help
.PHONY: help setup data train test lint tb bench peer baselines plot clean

help: ## List the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

setup: $(BIN)/.installed ## Create .venv and install torch, mocoq and the dev tools

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

data: setup ## Make sure Fashion-MNIST is available (Debian package, else torchvision download)
	@PYTHON=$(BIN)/python scripts/get_fashion_mnist.sh

train: setup data ## Pre-train on Fashion-MNIST for 10 minutes of this CPU, report kNN accuracy (ARGS=overrides)
	$(BIN)/mocoq-train $(if $(filter experiment=%,$(ARGS)),,experiment=$(TRAIN_RECIPE)) $(ARGS)

test: setup ## Run the test suite (PYTEST_ARGS=... to select)
	@PYTHON=$(BIN)/python scripts/get_fashion_mnist.sh || \
		echo "note: Fashion-MNIST unavailable; its real-data tests will be skipped"
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: setup ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

tb: setup ## Open TensorBoard on every run under outputs/
	$(BIN)/tensorboard --logdir outputs

# lightly (the peer) comes with the dev extra, never as a mocoq dependency.
# docs/benchmarks.md and docs/results.md have the numbers.
bench: setup data ## Speed benchmarks vs a supervised step and lightly (ARGS=...)
	$(BIN)/python scripts/bench.py $(ARGS)

peer: setup data ## mocoq against lightly's MoCo on one recipe, kNN over seeds (ARGS=...)
	$(BIN)/python scripts/peer_lightly.py $(ARGS)

baselines: setup data ## Raw-pixel, random-init and supervised baselines of a run (ARGS="--run <dir>")
	$(BIN)/python scripts/baselines.py $(ARGS)

plot: setup ## Plot a run's TensorBoard scalars to <RUN>/run.png (RUN=<run dir>, ARGS=...)
	$(BIN)/python scripts/plot_run.py $(RUN) $(ARGS)

clean: ## Remove caches (keeps .venv and outputs/)
	rm -rf .pytest_cache .mypy_cache .ruff_cache
