"""A converted folder carries its own model files and meets whatever transformers the user has: folders written by
an earlier loopfit load and generate with the installed loopfit, and a refreshed folder works on its own."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from loopfit import LoopfitForCausalLM
from loopfit.cli import main

OLD_MODELING = Path(__file__).parents[1] / "data" / "modeling_loopfit_0_1_0.py"  # as shipped by loopfit 0.1.0


def old_module():
    spec = importlib.util.spec_from_file_location("modeling_loopfit_0_1_0", OLD_MODELING)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # save_pretrained copies the model's module file from sys.modules
    spec.loader.exec_module(module)
    return module


def greedy_by_recomputation(model, ids, mask, steps, new_tokens):
    """Greedy decoding with a full forward per token (no cache): the reference every cached path must equal."""
    seq, m = ids, mask
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(seq, attention_mask=m, num_steps=steps).logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return seq


def old_folder(path):
    """A tiny model converted and saved by loopfit 0.1.0's own model file."""
    old = old_module()
    torch.manual_seed(0)
    cfg = old.LoopfitConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                            num_key_value_heads=2, num_prelude_layers=1, num_core_layers=2, num_coda_layers=1,
                            adapter_init="mean", mean_recurrence=3)
    model = old.LoopfitForCausalLM(cfg).eval()
    model.save_pretrained(path)
    shutil.copy(OLD_MODELING, path / "modeling.py")
    return model


def batch():
    torch.manual_seed(1)
    ids = torch.randint(1, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return ids, mask


def test_folder_from_loopfit_0_1_0_generates_with_the_installed_loopfit(tmp_path):
    old = old_folder(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)  # loopfit is imported: its registered class serves
    assert type(model) is LoopfitForCausalLM
    ids, mask = batch()
    out = model.generate(ids, attention_mask=mask, num_steps=5, max_new_tokens=6, do_sample=False, pad_token_id=0)
    # the old file's own forward, recomputing every token, is the reference: same weights, same numbers
    assert torch.equal(out, greedy_by_recomputation(old, ids, mask, 5, 6))
    assert len(set(out[0, -6:].tolist())) > 1  # a real continuation, not a constant token


def test_convert_refresh_rewrites_only_the_model_file(tmp_path, capsys):
    old_folder(tmp_path)
    weights = (tmp_path / "model.safetensors").read_bytes()
    assert main(["convert", str(tmp_path), "--refresh"]) == 0
    assert "refreshed" in capsys.readouterr().err
    from loopfit.model import model_files

    for path in model_files():  # the whole model package, modeling.py now importing its siblings
        assert (tmp_path / path.name).read_text() == path.read_text(), path.name
    assert (tmp_path / "model.safetensors").read_bytes() == weights
    ids, mask = batch()
    # without loopfit, the folder's own file (trust_remote_code) now serves this transformers' generate
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
assert "loopfit" not in sys.modules
ids, mask = torch.tensor({ids.tolist()}), torch.tensor({mask.tolist()})
print(model.generate(ids, attention_mask=mask, num_steps=4, max_new_tokens=5, do_sample=False, pad_token_id=0).tolist())
"""
    run = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    reference = greedy_by_recomputation(AutoModelForCausalLM.from_pretrained(tmp_path), ids, mask, 4, 5)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == reference.tolist()


def test_convert_refresh_refuses_a_folder_that_is_not_loopfit(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert main(["convert", str(tmp_path), "--refresh"]) == 2
    err = capsys.readouterr().err
    assert "not a loopfit model folder" in err and len(err.strip().splitlines()) == 1
