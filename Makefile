# The README's two commands.
#   make demo   install, train the small Shakespeare model on CPU (1-3 min), print a sample
#               (make demo DATA=FILE: on FILE instead)
#   make test   install the dev dependencies and run the test suite
#   make llamacpp  install llama.cpp for the GGUF tests (node-llama-cpp from npm; the tests do it too)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The tested PyTorch (2.13.0, CPU wheel) is pinned in constraints.txt.
PIP_INSTALL := $(BIN)/python -m pip install --quiet -c constraints.txt
# make demo DATA=FILE trains on FILE (offline: a copy of tiny-shakespeare, or any text). Without it,
# a local copy of tiny-shakespeare in ../shared/data when there is one; else quill downloads it once.
DATA ?= $(wildcard ../shared/data/tinyshakespeare.txt)
DEMO_DATA := $(if $(DATA),--data $(DATA),)

.PHONY: demo test install install-dev lint llamacpp

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(PIP_INSTALL) -e .

install-dev: $(BIN)/python
	$(PIP_INSTALL) -e '.[dev]'

demo: install
	$(BIN)/quill train --config shakespeare-char-cpu $(DEMO_DATA) --out runs/shakespeare-char-cpu --overwrite

test: install-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check quillgpt tests benchmarks

# The pinned node-llama-cpp (tests/llamacpp/package-lock.json): its prebuilt linux-x64 CPU llama.cpp.
llamacpp:
	cd tests/llamacpp && npm ci --omit=optional --ignore-scripts --no-audit --no-fund --loglevel=error
