# Two commands on a fresh machine:
#   make serve   set up a virtual environment and start the service with the shipped default model
#   make test    set up everything the tests need and run the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test install install-test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cpu]'

serve: install
	$(BIN)/snipserve serve --host $(HOST) --port $(PORT)

# torch is pinned in the train extra to the CPU build (2.13.0); the GPU extra is never installed here.
install-test: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cpu,train,export,dev]'
	bash scripts/install-test-tools.sh
	if [ -f scripts/install-browser.sh ]; then bash scripts/install-browser.sh; fi

test: install-test
	$(BIN)/python -m pytest

bench: install-test
	$(BIN)/snipserve bench

lint: install-test
	$(BIN)/ruff check service snipserve_client models exporters loadtest tests
	$(BIN)/mypy service snipserve_client

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
