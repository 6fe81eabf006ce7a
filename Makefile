# udrv: the two commands of the README, and their parts.
#   make demo   install everything, boot the lab, run the main job
#   make test   install everything, lint, type-check and run all tests (host + lab)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
UDRV   := $(BIN)/udrv

.PHONY: all install lab demo test lint typecheck pytest bench soak clean
all: test

$(BIN)/python:
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q python3-venv; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

lab: install
	$(UDRV) lab setup

demo: lab
	$(UDRV) demo

lint: install
	$(BIN)/ruff check udrv tests bench
	$(BIN)/ruff format --check udrv tests bench

typecheck: install
	$(BIN)/mypy

pytest: lab
	$(BIN)/python -m pytest tests -v --durations=15 -m "not slow"

test: lint typecheck pytest

bench: lab
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.mmio
	$(BIN)/python -m bench.irq
	$(BIN)/python -m bench.net
	$(BIN)/python -m bench.block

# Soak and chaos in the lab (issue 13), not part of `make test`: the tests marked slow, then
# 20-40 minutes under TCG, as loaded as the host is, bounded by --minutes (40). SOAK_ARGS=--quick for a short run (~7 min).
soak: lab
	$(BIN)/python -m pytest tests -v -m slow
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
