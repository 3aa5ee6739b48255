"""The vLLM tier: run in `.venv-vllm` (`make test-vllm`), skipped where vLLM is not installed.

vLLM's engine runs in the test process (no engine subprocess) so that each model loads in seconds, with a
small CPU KV cache: the machine is shared."""

import gc
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

try:  # this folder is itself importable as a namespace package named vllm: ask for a module only vLLM has
    from vllm import LLM  # noqa: F401
except ImportError:  # not installed here: the tier runs in .venv-vllm (`make test-vllm`)
    collect_ignore_glob = ["test_*.py"]

ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=256, max_num_batched_tokens=256, max_num_seqs=8)


@pytest.fixture
def make_llm():
    """vllm.LLM(folder, ...) with the tier's small engine settings; each engine is shut down after the test."""
    from vllm import LLM

    made = []

    def make(folder, **kwargs):
        made.append(LLM(str(folder), **{**ENGINE, **kwargs}))
        return made[-1]

    yield make
    for llm in made:
        llm.llm_engine.engine_core.shutdown()
    made.clear()
    gc.collect()


@pytest.fixture(scope="session")
def serve_argv():
    """The command line of `vllm serve FOLDER`. vllm-cpu 0.32.0's `vllm` command fails for every model (it looks
    up the metadata of a package named vllm, which vllm-cpu is not): there, the server module `vllm serve` runs."""

    def argv(folder):
        try:
            importlib.metadata.version("vllm")
            return [str(Path(sys.executable).with_name("vllm")), "serve", str(folder)]
        except importlib.metadata.PackageNotFoundError:
            return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]

    return argv


@pytest.fixture(scope="session")
def smollm2_loopfit(tmp_path_factory):
    """The real SmolLM2-135M converted by `loopfit convert` (default layers, random adapter), once a session."""
    out = tmp_path_factory.mktemp("smollm2") / "loopfit"
    subprocess.run([sys.executable, "-m", "loopfit.cli", "convert", "smollm2-135m", "--out", str(out), "--no-parity"],
                   check=True, capture_output=True, timeout=900)
    return out
