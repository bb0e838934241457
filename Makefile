# FedSense: `make demo` runs a 3-site federated simulation; `make test` runs the whole test suite.
# Both set up everything they need on a fresh machine (a .venv with the pinned CPU PyTorch).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := demo-data
DEMO_ROUNDS ?= 3
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast docs clean
venv: $(STAMP)

# torch is installed first and pinned: 2.13.0 is a CPU wheel on this machine's disk; an unpinned
# torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/fedprox-demo
	$(BIN)/fedsense data demo --out $(DEMO_DATA) --size 128 --subjects 4 --seed 0
	$(BIN)/fedsense simulate --sites deploy/sites/site-a.toml deploy/sites/site-b.toml deploy/sites/site-c.toml \
		--rounds $(DEMO_ROUNDS) --strategy fedprox --mu 0.01 --name fedprox-demo --run-dir runs/fedprox-demo \
		--model unrolled --set 'model-args={"num_cascades": 4, "chans": 32, "num_layers": 5}'
	@echo "Metrics: runs/fedprox-demo/metrics.jsonl  Checkpoints: runs/fedprox-demo/checkpoints/"
	@echo "View: $(BIN)/fedsense metrics show runs/fedprox-demo | $(BIN)/fedsense dashboard runs/fedprox-demo"

test: $(STAMP)
	$(BIN)/pytest -v $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

# The docs' lists of strategies, models, baselines, mask patterns and losses, from their registries.
docs: $(STAMP)
	$(BIN)/python -m common.docs_gen

clean:
	rm -rf $(VENV) runs $(DEMO_DATA) .pytest_cache

-include deploy/images.mk
