# One-command setup: `make serve` makes .venv, installs torch and tokenmill, and serves the demo model;
# `make test` does the same setup, then runs lint and tests.
PYTHON ?= python3
VENV ?= .venv
# torch: with no GPU, the CPU build (a local wheel pip can find, else PyTorch's CPU index);
# with a GPU, PyPI's default (CUDA) build. TORCH="pip arguments" chooses the build yourself.
TORCH_VERSION ?= 2.13.0
TORCH ?=
BIN := $(VENV)/bin

.PHONY: install serve chat test lint bench clean

HOST ?= 127.0.0.1
PORT ?= 8000

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if [ -n "$(TORCH)" ]; then $(BIN)/pip install -q $(TORCH); \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch==$(TORCH_VERSION); \
	else \
	  echo "no GPU: installing torch's CPU build"; \
	  { $(BIN)/pip install -q --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null \
	    && $(BIN)/pip install -q torch==$(TORCH_VERSION); } \
	  || $(BIN)/pip install -q torch==$(TORCH_VERSION) --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,clients,ray,browser,triton,rag]'
	$(BIN)/tokenmill build-kernels || echo "CPU kernels not built: PyTorch ops will be used"
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/tokenmill serve --host $(HOST) --port $(PORT)

chat: install
	$(BIN)/tokenmill chat

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/tokenmill bench throughput

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
