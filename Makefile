# FedSense: `make demo` runs a 3-site federated simulation; `make test` runs the whole test suite.
# Both set up everything they need on a fresh machine (a .venv with the pinned CPU PyTorch).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := demo-data
DEMO_ROUNDS ?= 3
DEMO_FINE_TUNE_STEPS ?= 30
PYTEST_ARGS ?=

.PHONY: venv demo lint test test-fast docs clean compose-up
venv: $(STAMP)

# torch is installed first and pinned: 2.13.0 is a CPU wheel on this machine's disk; an unpinned
# torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The best configuration of docs/BENCHMARKS.md ("Quality"): the unrolled-DC model, FedAvg with each site
# keeping its Adam state, then every site fine-tunes the selected global model (its personalised model).
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/fedsense data demo --out $(DEMO_DATA) --size 128 --subjects 4 --seed 0 --overwrite
	$(BIN)/fedsense simulate --sites deploy/sites/site-a.toml deploy/sites/site-b.toml deploy/sites/site-c.toml \
		--rounds $(DEMO_ROUNDS) --strategy fedavg --name demo --run-dir runs/demo --client-cpus 1 \
		--model unrolled --set 'model-args={"num_cascades": 4, "chans": 32, "num_layers": 5}' \
		--set client-optimizer=keep --set evaluate-with-train=true --set fine-tune-steps=$(DEMO_FINE_TUNE_STEPS)
	@echo "Metrics: runs/demo/metrics.jsonl  Checkpoints: runs/demo/checkpoints/  Fine-tuned: runs/demo/site-state/"
	@echo "View: $(BIN)/fedsense metrics show runs/demo | $(BIN)/fedsense dashboard runs/demo"

# ruff (lint rules and formatting) and mypy (common strictly, server, client), as configured in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# CI (.ci/run) calls this target: the tests run only once the code passes lint.
test: lint
	$(BIN)/pytest -v --durations=30 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

# The docs' lists of strategies, models, baselines, mask patterns and losses, from their registries.
docs: $(STAMP)
	$(BIN)/python -m common.docs_gen

# runs/ may hold files that older compose runs wrote as the image's uid 10001: deploy/clean-runs.sh removes
# those through a throwaway container of the local base image.
clean:
	rm -rf $(VENV) $(DEMO_DATA) .pytest_cache
	BASE_IMAGE=$(BASE_IMAGE) bash deploy/clean-runs.sh runs

# The compose demo with ./runs owned by you: created first, and its owner passed in case it is recreated.
compose-up:
	mkdir -p runs
	FEDSENSE_HOST_UID=$$(id -u) FEDSENSE_HOST_GID=$$(id -g) docker compose up

-include deploy/images.mk
