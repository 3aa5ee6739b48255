"""Folders vLLM cannot serve as loopfit models are refused in one line before any engine starts: from Python
(`vllm.LLM`) as a LoopfitError, from `vllm serve` as one stderr line with exit status 2."""

import json
import os
import subprocess

import pytest
import tiny_models
import torch

from loopfit import LoopfitError


def tiny(path, **overrides):
    torch.manual_seed(0)
    tiny_models.recurrent(head_dim=32, **overrides).save_pretrained(path)
    return path


def edit_config(folder, **fields):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return folder


CASES = {
    "r below 1": (lambda p: tiny(p), {"hf_overrides": {"mean_recurrence": 0}}, "mean_recurrence must be"),
    "newer loopfit": (lambda p: edit_config(tiny(p), loopfit_version="99.0.0"), {}, "newer than the installed"),
    "unsupported family": (lambda p: edit_config(tiny(p), base_model_type="gpt_neox"), {}, "family"),
    "not a loopfit config": (lambda p: edit_config(tiny_llama(p), architectures=["LoopfitForCausalLM"]), {},
                             "is not a loopfit model"),
    "not loopfit weights": (lambda p: loopfit_config_over_llama_weights(p), {}, "weights are not a loopfit"),
    "per-loop LoRA": (lambda p: tiny(p, loop_lora={"rank": 2, "alpha": 4.0, "loops": 2, "targets": ["q_proj"]}), {},
                      "a low-rank delta per loop"),
}


def tiny_llama(path):
    torch.manual_seed(0)
    tiny_models.llama(head_dim=32).save_pretrained(path)
    return path


def loopfit_config_over_llama_weights(path):
    tiny_llama(path)
    config = tiny(path.with_name("loopfit")) / "config.json"
    (path / "config.json").write_text(config.read_text())
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_python_api_refuses_in_one_line(case, tmp_path, make_llm):
    make, kwargs, words = CASES[case]
    folder = make(tmp_path / "m")
    with pytest.raises(LoopfitError, match=words) as raised:
        make_llm(folder, skip_tokenizer_init=True, **kwargs)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("case", ["r below 1", "not a loopfit config"])
def test_vllm_serve_refuses_in_one_line(case, tmp_path, serve_argv):
    make, kwargs, words = CASES[case]
    folder = make(tmp_path / "m")
    argv = serve_argv(folder) + ["--skip-tokenizer-init", "--port", "0"]
    if "hf_overrides" in kwargs:
        argv += ["--hf-overrides", json.dumps(kwargs["hf_overrides"])]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    # vLLM prints notices of its own at import (e.g. about Triton) whatever the model: the refusal is loopfit's line
    lines = [line for line in proc.stderr.splitlines() if "loopfit" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("loopfit: error: ") and words in lines[0], proc.stderr[-3000:]
