"""benchmarks/gpu_check.py (`make gpu-check`): refuses in one line without a GPU, and its every check runs on the
CPU with tiny models (the GPU figures themselves need a GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=900,
                          check=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_in_one_line_without_a_gpu():
    proc = run()
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "gpu-check: no CUDA GPU here: run it on a machine with one (or --device cpu --tiny for a smoke run)"]


def test_every_check_runs_on_tiny_models_on_the_cpu():
    proc = run("--device", "cpu", "--tiny", "--no-compile", "--r", "4", "--k", "2", "--batch", "2", "--seq", "32",
               "--warmup", "1", "--steps", "1", "--new-tokens", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [x["check"] for x in lines] == ["train_r32_k8", "fsdp_one_rank", "transformers_r1", "loopfit_r1",
                                           "generation"]
    for x in lines[:4]:
        assert x["tokens_per_s"] > 0 and x["peak_memory_gib"] > 0 and x["loss_finite"]
        assert 0 < x["mfu_paper"] <= x["mfu_full"]
    assert lines[0]["mfu_paper"] < lines[0]["mfu_full"]  # the adapter and final norm count only in the full count
    assert (lines[0]["r"], lines[0]["k"]) == (4, 2) and (lines[3]["r"], lines[3]["k"]) == (1, 1)
    assert lines[4]["new_tokens"] == 4 and lines[4]["tokens_per_s"] > 0
