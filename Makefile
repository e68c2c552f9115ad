# One-command setup: `make test` makes .venv, installs torch and tokenmill, runs lint and tests.
PYTHON ?= python3
VENV ?= .venv
# The CPU build where no GPU is present; override, e.g. TORCH="torch==2.13.0 --index-url ...", for CUDA.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

install: $(BIN)/.installed

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/tokenmill bench throughput

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
