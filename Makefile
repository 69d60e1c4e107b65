PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
RUNS ?= runs/demo

.PHONY: demo test lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,ray]'
	touch $@

DEMO_STRATEGIES ?= finetune,joint,dns,gpm,ewc,er,er+relation_kd

demo: $(VENV)/.installed
	$(BIN)/comodal compare examples/synth_pairs.yaml --strategies $(DEMO_STRATEGIES) --seeds 2 --out $(RUNS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check comodal tests benchmarks examples

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/trainer_overhead.py
