"""`loopfit export`: an offline GGUF model or a trained plain baseline as a plain transformers folder that loads
where loopfit is not installed, with the same logits."""

import subprocess
import sys

import pytest
import tiny_models
import torch

from loopfit.cli import main

LOAD_WITHOUT_LOOPFIT = """
import sys; sys.modules["loopfit"] = None
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({folder!r})
with torch.no_grad():
    torch.save(m(torch.tensor([[1, 5, 9, 3, 7]])).logits, {dest!r})
"""


def logits_without_loopfit(folder, tmp_path):
    dest = tmp_path / "logits.pt"
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_LOOPFIT.format(folder=str(folder), dest=str(dest))],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(dest)


def test_a_trained_plain_baseline_exports_without_loopfits_files(tmp_path, smollm2_tokenizer, capsys):
    from loopfit.train import train

    torch.manual_seed(0)
    tiny_models.llama(len(smollm2_tokenizer), hidden_size=32, intermediate_size=64).save_pretrained(tmp_path / "base")
    smollm2_tokenizer.save_pretrained(tmp_path / "base")
    train({"model": {"init_from": str(tmp_path / "base")}, "data": {"synthetic": "pattern", "seq_len": 8},
           "train": {"out_dir": str(tmp_path / "run"), "steps": 1, "batch_size": 2, "micro_batch_size": 2,
                     "progress": False, "tensorboard": False}, "checkpoint": {"every": 0}})
    assert main(["export", str(tmp_path / "run/final"), "--out", str(tmp_path / "hf")]) == 0
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert "README.md" not in names and not any(n.endswith(".py") for n in names)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run/final")
    with torch.no_grad():
        expected = trained(torch.tensor([[1, 5, 9, 3, 7]])).logits
    # the same weights: equal up to the float order of another thread count
    torch.testing.assert_close(logits_without_loopfit(tmp_path / "hf", tmp_path), expected, rtol=1e-5, atol=1e-5)
    assert main(["export", str(tmp_path / "run/final"), "--out", str(tmp_path / "hf")]) == 2  # exists: --force
    assert "already exists" in capsys.readouterr().err


@pytest.mark.real
def test_the_offline_gguf_exports_to_a_plain_folder(tmp_path):
    from loopfit.loading import load_base

    assert main(["export", "smollm2-135m", "--out", str(tmp_path / "smol")]) == 0
    base, _ = load_base("smollm2-135m")
    with torch.no_grad():
        expected = base(torch.tensor([[1, 5, 9, 3, 7]])).logits
    torch.testing.assert_close(logits_without_loopfit(tmp_path / "smol", tmp_path), expected, rtol=1e-4, atol=1e-4)
