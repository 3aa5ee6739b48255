"""`loopfit quickstart` end to end at its smallest setting, through the command line, on the real SmolLM2-135M."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

SMALLEST = ["--steps", "1", "--limit", "200", "--gsm8k", "2", "--max-new-tokens", "8", "--eval-loops", "1,2",
            "--gsm8k-loops", "1,2", "--eval-tokens", "256", "--device", "cpu", "--draft-loops", "1"]


def loopfit(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "loopfit.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=1200)


@pytest.mark.real
def test_quickstart_smallest_end_to_end(tmp_path):
    out = tmp_path / "qs"
    p = loopfit("quickstart", *SMALLEST, "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    # one summary line per stage
    for i, stage in enumerate(("convert", "prepare", "train", "eval", "report"), 1):
        assert re.search(rf"^\[{i}/5\] {stage}: .+\(\d+ s\)$", p.stderr, re.M), f"no summary line for {stage}"

    report = (out / "REPORT.md").read_text()
    assert "## At equal training FLOPs" in report
    table = [line for line in report.splitlines() if line.startswith("| recurrent (5, 10, 5), cross-entropy |")]
    assert [line.split("|")[2].strip() for line in table] == ["1", "2"]  # one row per test r
    assert any(line.startswith("| plain smollm2-135m") for line in report.splitlines())
    control = [line for line in report.splitlines() if line.startswith("| recurrent (5, 10, 5), random init |")]
    assert [line.split("|")[2].strip() for line in control] == ["1", "2"]  # the control, evaluated alike
    distilled = [line for line in report.splitlines()
                 if line.startswith("| recurrent (5, 10, 5), distilled from the base |")]
    assert [line.split("|")[2].strip() for line in distilled] == ["1", "2"]  # healed from the base, evaluated alike
    assert all(re.search(r"\| \d+\.\d{4} \| \d+% \| \d+% \|$", line) for line in table + control + distilled)
    assert "Distillation from the base" in report and "still costs" in report
    untrained = next(line for line in report.splitlines() if line.startswith("| recurrent, random init, untrained |"))
    assert float(untrained.split("|")[5]) > 9.0  # chance level for a 49k vocabulary is ln(49152) = 10.8
    assert "Reusing the pretrained layers" in report and "random-init" in (out / "compare" / "report.md").read_text()
    for png in re.findall(r"\]\(([^)]+\.png)\)", report):
        assert (out / png).stat().st_size > 1000, png
    assert len(re.findall(r"\.png\)", report)) == 3

    # equal training FLOPs: the plain model's steps are chosen so its FLOPs are within half a plain step's FLOPs
    state = json.loads((out / "quickstart.json").read_text())
    train = state["stages"]["train"]
    rec, plain = train["recurrent"]["flops"], train["plain"]["flops"]
    assert abs(plain - rec) <= 0.5 * train["plain_flops_per_step"] * (1 + 1e-9)
    control = train["random-init"]  # the control: same steps, tokens and seeded depth draws, so the same FLOPs
    assert (control["step"], control["tokens"]) == (train["recurrent"]["step"], train["recurrent"]["tokens"])
    assert control["flops"] == pytest.approx(rec, rel=1e-12)
    # the distilled run's total compute (student + teacher forward) matches the cross-entropy run's within half a step
    kd = train["distilled"]
    total = kd["flops"] + kd["flops_teacher"]
    assert kd["flops_teacher"] > 0 and abs(total - rec) <= 0.5 * total / kd["step"] * (1 + 1e-9)
    kd_metrics = [json.loads(x) for x in (out / "runs" / "distilled" / "metrics.jsonl").read_text().splitlines()]
    assert all("kl" in m and "ce" in m for m in kd_metrics if "loss" in m)
    for name in ("recurrent", "plain", "random-init"):  # the figures come from the runs' own metrics
        metrics = [json.loads(x) for x in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert max(m.get("flops") or 0 for m in metrics) == pytest.approx(train[name]["flops"], rel=1e-9)
        assert not (out / "runs" / name / "checkpoints").exists()  # dropped once final/ is written

    # GSM8K of the recurrent model decoded r = 2 by self-speculation (drafting at 1 loop); the plain model plainly
    settings = {name: json.loads((out / "runs" / name / "eval" / "gsm8k" / "results.json").read_text())["settings"]
                for name in ("recurrent", "plain", "random-init")}
    assert settings["recurrent"]["draft_loops"] == 1 and settings["plain"]["draft_loops"] is None
    assert settings["random-init"]["draft_loops"] == 1

    # the control model is the converted one's shape and config with other weights (before training)
    from safetensors.torch import load_file

    converted, random_init = out / "model", out / "model-random-init"
    assert json.loads((random_init / "config.json").read_text()) == json.loads((converted / "config.json").read_text())
    a, b = load_file(converted / "model.safetensors"), load_file(random_init / "model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    matrices = [k for k, v in a.items() if v.dim() == 2 and "adapter" not in k]
    # the embeddings (SmolLM2's head stays tied to them) and 7 matrices in each of the 20 layers
    assert len(matrices) == 1 + 7 * 20 and not any(torch.equal(a[k], b[k]) for k in matrices)

    # without the control (--no-control), the same stages' report has no control rows or sentence
    from loopfit.quickstart import RECIPE, report_text

    del state["stages"]["train"]["random-init"], state["stages"]["eval"]["metrics"]["random-init"]
    del state["stages"]["eval"]["metrics"]["random-init-untrained"]
    state["settings"]["control"] = False
    plain_report = report_text(state["settings"], state, "cpu", {"train": 60.0}, RECIPE)
    assert "random init" not in plain_report and "Reusing" not in plain_report and "Train** both models" in plain_report
    assert [line for line in plain_report.splitlines()
            if line.startswith("| recurrent (5, 10, 5), cross-entropy |")] == table

    # a re-run reuses every stage; other settings over the same folder are refused with the fix
    again = loopfit("quickstart", *SMALLEST, "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("done earlier") == 4
    other = loopfit("quickstart", *SMALLEST, "--steps", "2", "--out", str(out))
    assert other.returncode == 2
    assert "other settings (steps)" in other.stderr and "--force" in other.stderr
    without = loopfit("quickstart", *SMALLEST, "--no-control", "--out", str(out))  # the flag reaches the settings
    assert without.returncode == 2 and "other settings (control)" in without.stderr
    without = loopfit("quickstart", *SMALLEST, "--no-distill", "--out", str(out))
    assert without.returncode == 2 and "other settings (distill)" in without.stderr


def test_unknown_model_is_one_line_error(tmp_path):
    p = loopfit("quickstart", "--model", "llama-70b", "--out", str(tmp_path / "qs"))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'llama-70b'" in lines[0] and "smollm2-135m" in lines[0]
    assert not (tmp_path / "qs").exists()


@pytest.mark.parametrize("flag", ["--eval-loops", "--gsm8k-loops"])
def test_a_bad_loop_list_names_its_own_flag(tmp_path, capsys, flag):
    from loopfit.cli import main

    assert main(["quickstart", flag, "0", "--out", str(tmp_path / "qs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} must be positive integers" in err[0]
    assert not (tmp_path / "qs").exists()


def test_help_describes_the_stages():
    p = loopfit("quickstart", "--help")
    assert p.returncode == 0
    for word in ("--minutes", "--steps", "--model", "--device", "passthrough", "equal", "REPORT.md", "--no-control",
                 "random weights", "--no-distill", "teacher"):
        assert word in p.stdout
    # the training the help describes ("1-sqrt curriculum of the mean depth to 4, truncated backprop through the
    # last 2 loops, Muon + AdamW, heal-then-mix blend") is what the shipped recipe it trains with does
    from loopfit.quickstart import RECIPE, recipe_summary

    assert "1-sqrt curriculum of the mean depth to 4," in p.stdout and "last 2 loops, Muon + AdamW" in p.stdout
    assert recipe_summary(RECIPE) == (
        "`quickstart` (recurrence: Poisson-lognormal depth, 1-sqrt curriculum of the mean to 4, backprop through "
        "the last 2 loops; Muon + AdamW; continued-pretraining schedule; data: `heal` (100% `general`), then "
        "`mix` (50% `general`, 50% `math`))")
