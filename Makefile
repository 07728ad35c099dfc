# Two commands do all the set-up on a fresh machine with Python 3.11 and make:
#   make demo   creates .venv, installs, runs the demo job on the bundled data
#   make test   creates .venv, installs the dev extras, runs the test suite
# GPU users: make demo TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: demo test test-slow test-all lint format bench clean

# torch first, pinned, so the package's own `torch>=...` is already satisfied and pip never
# pulls a multi-GB CUDA build on a CPU machine.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e .
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/anogan-batch demo --out demo-out

test: $(BIN)/.installed-dev
	$(BIN)/ruff check anogan_batch tests scripts
	$(BIN)/ruff format --check anogan_batch tests scripts
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Slow tests (over a minute each) are left out of `make test`.
test-slow: $(BIN)/.installed-dev
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: $(BIN)/.installed-dev
	$(BIN)/python -m pytest -m '' $(PYTEST_ARGS)

lint: $(BIN)/.installed-dev
	$(BIN)/ruff check anogan_batch tests scripts

format: $(BIN)/.installed-dev
	$(BIN)/ruff format anogan_batch tests scripts
	$(BIN)/ruff check --fix anogan_batch tests scripts

bench: $(BIN)/.installed
	$(BIN)/anogan-batch bench --json bench.json

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache *.egg-info
