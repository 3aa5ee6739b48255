"""`loopfit eval` on tiny models with SmolLM2's real tokenizer: r reaches the model, plain models run once,
batched generation equals one-by-one generation, results/plots are written, bad input is refused clearly."""

import json
import subprocess
import sys

import pytest
import tiny_models
import torch

from loopfit import LoopfitError, LoopfitForCausalLM
from loopfit.cli import main as cli
from loopfit.eval import run as eval_run
from loopfit.eval.generation import generate
from loopfit.eval.prompts import gsm8k_prompt
from loopfit.loading import load
from loopfit.loops import parse_loops

pytestmark = pytest.mark.usefixtures("one_thread")


def _save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_loopfit(smollm2_tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    tok = smollm2_tokenizer
    model = tiny_models.recurrent(len(tok), eos_token_id=tok.eos_token_id, state_init="zeros")
    return _save(model, tok, tmp_path_factory.mktemp("tiny-loopfit"))


@pytest.fixture(scope="module")
def tiny_plain(smollm2_tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    tok = smollm2_tokenizer
    model = tiny_models.llama(len(tok), eos_token_id=tok.eos_token_id)
    return _save(model, tok, tmp_path_factory.mktemp("tiny-plain"))


def by(rows, task, metric):
    return {r["loops"]: r["value"] for r in rows if r["task"] == task and r["metric"] == metric}


def test_cli_sweep_writes_results_plot_and_samples(tiny_loopfit, tmp_path, capsys):
    out = tmp_path / "eval"
    code = cli(["eval", str(tiny_loopfit), "--loops", "1,4,2", "--tasks", "loss,gsm8k_1shot", "--limit", "2",
                "--max-new-tokens", "4", "--seq-len", "64", "--max-tokens", "256", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["recurrent"] and results["loops"] == [1, 2, 4] and results["train_mean_recurrence"] == 4
    loss = by(results["rows"], "loss", "loss")
    assert sorted(loss) == [1, 2, 4]
    assert len({round(v, 6) for v in loss.values()}) == 3  # each r really ran a different number of loops
    acc = by(results["rows"], "gsm8k_1shot", "accuracy_flexible")
    assert sorted(acc) == [1, 2, 4] and all(0 <= v <= 1 for v in acc.values())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 3 and {s["loops"] for s in samples} == {1, 2, 4}
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "| loss | loss |" in table and "r=4" in table


def test_plain_model_runs_once_and_repeats_across_r(tiny_plain, tmp_path):
    results = eval_run.evaluate(str(tiny_plain), loops=[1, 8], tasks=["loss"], seq_len=64, max_tokens=256,
                                out=tmp_path / "e")
    assert results["recurrent"] is False and results["train_mean_recurrence"] is None
    loss = by(results["rows"], "loss", "loss")
    assert loss[1] == loss[8]
    assert results["tokenizer"].startswith("sha256:")


def test_batched_left_padded_generation_equals_one_by_one(tiny_loopfit):
    model, tok = load(tiny_loopfit)
    prompts = [gsm8k_prompt(q, "1shot") for q in ("What is 2 + 2?", "Tom has 3 cats and buys 12 more. How many?",
                                                   "A")]
    tok.padding_side = "right"  # generate pads on the left and must give the caller's setting back
    batched = generate(model, tok, prompts, num_steps=3, max_new_tokens=6, stop=["\n\n"], batch_size=3)
    assert tok.padding_side == "right"
    single = generate(model, tok, prompts, num_steps=3, max_new_tokens=6, stop=["\n\n"], batch_size=1)
    assert batched == single


def test_eval_reads_loops_from_the_edge_module_not_another_verb():
    """`--loops` and the speculation settings are read by `loopfit.loops`; no module of `loopfit.eval` imports
    another verb's module (generate, convert, analyze, quickstart)."""
    import ast
    from pathlib import Path

    import loopfit.eval

    verbs = {"generate", "convert", "analyze", "quickstart"}
    for path in Path(loopfit.eval.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                assert node.module not in verbs and not (node.module is None and
                                                         {a.name for a in node.names} & verbs), path.name


def test_bad_input_is_refused_with_one_line(tiny_loopfit, tmp_path, capsys):
    for loops in ("", "0,2", "-1", "1,x"):
        with pytest.raises(LoopfitError, match="--loops"):
            parse_loops(loops)
    assert cli(["eval", str(tiny_loopfit), "--tasks", "gsm9k"]) == 2
    assert "unknown task 'gsm9k'" in capsys.readouterr().err
    no_tok = tmp_path / "no-tokenizer"
    LoopfitForCausalLM.from_pretrained(tiny_loopfit).save_pretrained(no_tok)
    capsys.readouterr()
    assert cli(["eval", str(no_tok), "--loops", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("loopfit eval:")]
    assert len(err) == 1 and "no tokenizer in" in err[0] and "save_pretrained" in err[0]


def test_cli_help_teaches_the_tasks():
    out = subprocess.run([sys.executable, "-m", "loopfit.cli", "eval", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "gsm8k_1shot" in out.stdout and "math-verify" in out.stdout


def test_exit_rule_counts_loops_of_real_tokens(tiny_loopfit, tiny_plain, tmp_path, capsys):
    """--exit adds a mean_loops row: with a threshold every step passes, each decoded token stops after 2 loops
    (the earliest a rule can compare two loops); tokens are counted only up to each row's end."""
    out = tmp_path / "exit"
    assert cli(["eval", str(tiny_loopfit), "--loops", "4", "--tasks", "gsm8k_1shot", "--limit", "3",
                "--max-new-tokens", "5", "--exit", "kl:1e9", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    (loops,) = [r for r in rows if r["metric"] == "mean_loops"]
    assert loops["value"] == 2 and loops["exit"] == "kl:1e9" and 1 <= loops["n"] <= 3 * 4
    capsys.readouterr()
    assert cli(["eval", str(tiny_plain), "--tasks", "gsm8k", "--exit", "kl:1e-3"]) == 2
    assert "--exit needs a loopfit (recurrent) model" in capsys.readouterr().err
    assert cli(["eval", str(tiny_loopfit), "--tasks", "gsm8k", "--exit", "kl"]) == 2
    assert "must look like kl:5e-4" in capsys.readouterr().err


def test_math_task_scores_with_math_verify(tiny_loopfit, tmp_path):
    """`math500` end to end: Minerva prompt, the boxed answer extracted, math-verify's verdict per sample."""
    out = tmp_path / "math"
    assert cli(["eval", str(tiny_loopfit), "--loops", "1,2", "--tasks", "math500", "--limit", "2",
                "--max-new-tokens", "3", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["loops"], r["metric"]) for r in rows} == {(1, "accuracy_math_verify"), (2, "accuracy_math_verify")}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["reference"] and s["correct"] in (0.0, 1.0) for s in samples)
    assert all(s["completion"] and "Problem:" not in s["completion"] for s in samples)
