"""`loopfit compare` on two real short runs (a tiny recurrent model and a tiny plain Llama, one tokenizer), each
trained with `loopfit train` and evaluated with `loopfit eval`, all through the CLI: the report names the
matched FLOPs, both plots are written, different tokenizers warn, bad input is one line."""

import json

import pytest
import tiny_models
import torch
import yaml

from loopfit.cli import main as cli

TEXT = "\n\n".join(f"The keeper climbed {n} steps at dusk and lit the lamp before the boats came home." for n in
                   range(40))


pytestmark = pytest.mark.usefixtures("one_thread")


def train_and_eval(model, tok, root, name):
    """`loopfit train` a few steps from `model`, then `loopfit eval` its final folder (loss at r = 1, 2, 4)."""
    init = root / f"{name}-init"
    model.save_pretrained(init)
    tok.save_pretrained(init)
    recipe = {
        "model": {"init_from": str(init)},
        "data": {"synthetic": "pattern", "seq_len": 32},
        "recurrence": {"mean": 4, "backprop": 2, "curriculum": "linear", "curriculum_fraction": 0.5},
        "optim": {"lr": 0.02, "adamw_lr": 0.003},
        "schedule": {"name": "constant", "warmup": 0},
        "train": {"out_dir": str(root / name), "steps": 8, "batch_size": 4, "micro_batch_size": 4,
                  "progress": False, "tensorboard": False, "eval_every": 2, "eval_batches": 1},
        "checkpoint": {"every": 0},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli(["train", str(path)]) == 0
    assert cli(["eval", str(root / name / "final"), "--loops", "1,2,4", "--tasks", "loss",
                "--data", str(root / "text.txt"), "--seq-len", "32", "--max-tokens", "128"]) == 0
    return root / name


@pytest.fixture(scope="module")
def runs(smollm2_tokenizer, tmp_path_factory):
    """Two real runs with SmolLM2's tokenizer: 'recurrent' (1,2,1 layers, mean r 4) and 'plain' (2-layer Llama)."""
    root = tmp_path_factory.mktemp("compare-runs")
    (root / "text.txt").write_text(TEXT)
    tok = smollm2_tokenizer
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        rec = tiny_models.recurrent(len(tok), eos_token_id=tok.eos_token_id)
        plain = tiny_models.llama(len(tok), eos_token_id=tok.eos_token_id)
        return {"root": root, "recurrent": train_and_eval(rec, tok, root, "recurrent"),
                "plain": train_and_eval(plain, tok, root, "plain")}
    finally:
        torch.set_num_threads(old)


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def last_at_or_below(run, key, budget):
    return [(m["flops"], m[key]) for m in metrics(run) if m.get(key) is not None and m["flops"] <= budget][-1]


def table_row(report, name):
    return [line for line in report.splitlines() if line.startswith(f"| {name} |")]


def test_report_names_matched_flops_and_draws_both_plots(runs, tmp_path, capsys):
    out = tmp_path / "report"
    capsys.readouterr()
    assert cli(["compare", str(runs["recurrent"]), str(runs["plain"]), "--out", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err  # one tokenizer: no warning
    report = (out / "report.md").read_text()
    totals = {name: metrics(runs[name])[-1]["flops"] for name in ("recurrent", "plain")}
    # the looped core costs more per token than the plain model's two layers, so the plain run sets the budget
    assert totals["recurrent"] > totals["plain"] > 0
    budget = min(totals.values())
    assert f"Matched training compute: **{budget:.3e} FLOPs**" in report
    # matched table: each run's last loss at or below the budget, with the FLOPs where it was logged
    matched = report.split("## Loss at matched training FLOPs")[1].split("##")[0]
    for name in ("recurrent", "plain"):
        flops, loss = last_at_or_below(runs[name], "loss", budget)
        ev_flops, ev = last_at_or_below(runs[name], "eval_loss", budget)
        (row,) = table_row(matched, name)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == name and cells[2] == f"{loss:.4g}" and cells[3] == f"{flops:.3e}"
        assert cells[4] == f"{ev:.4g}" and cells[5] == f"{ev_flops:.3e}"
        assert float(cells[3]) <= budget * (1 + 1e-3)
    assert float(table_row(matched, "plain")[0].split("|")[4]) == pytest.approx(budget, rel=1e-3)
    # eval by test r: the recurrent model differs across r, the plain one repeats its single figure
    evals = report.split("## Eval metrics by test-time loops r")[1]
    results = {name: json.loads((runs[name] / "final/eval/results.json").read_text()) for name in totals}
    for name, res in results.items():
        (row,) = [line for line in evals.splitlines() if line.startswith(f"| loss | loss | {name} |")]
        values = [v.strip() for v in row.strip("|").split("|")[-3:]]
        expected = [f"{r['value']:.4g}" for r in sorted(res["rows"], key=lambda r: r["loops"]) if r["metric"] == "loss"]
        assert values == expected
        assert f"{totals[name]:.3e}" in row  # each run's training FLOPs named beside its eval figures
    assert len(set(values)) == 1  # plain (the last one read): r ignored
    for png in ("flops.png", "loops.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and (out / png).stat().st_size > 5000
    assert "![loss vs training FLOPs](flops.png)" in report and "![metric vs loops r](loops.png)" in report


def char_tokenizer(folder):
    """A tiny character-level tokenizer: a vocabulary unlike SmolLM2's."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = ["<eos>", "<unk>"] + sorted(set(TEXT))
    tk = Tokenizer(models.BPE({c: i for i, c in enumerate(chars)}, [], unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")
    tok.save_pretrained(folder)
    return tok


def test_runs_with_different_tokenizers_warn(runs, tmp_path, capsys):
    other = tmp_path / "char-model"
    tok = char_tokenizer(other)
    torch.manual_seed(0)
    tiny_models.llama(len(tok), num_hidden_layers=1, eos_token_id=tok.eos_token_id).save_pretrained(other)
    assert cli(["eval", str(other), "--loops", "1,2", "--data", str(runs["root"] / "text.txt"), "--seq-len", "32",
                "--max-tokens", "128"]) == 0
    capsys.readouterr()
    out = tmp_path / "report"
    assert cli(["compare", str(runs["recurrent"]), str(other), "--out", str(out)]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1 and "runs use different tokenizers, so their losses are not comparable" in err[0]
    report = (out / "report.md").read_text()
    assert "> **Warning:** runs use different tokenizers" in report
    assert "char-model" in report and (out / "loops.png").exists()


def test_bad_runs_are_refused_in_one_line(runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for bad, message in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "neither metrics.jsonl")):
        capsys.readouterr()
        assert cli(["compare", str(runs["plain"]), str(bad), "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("loopfit compare: error:") and message in err[0], err
    assert not (tmp_path / "r").exists()
