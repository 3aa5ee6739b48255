"""`loopfit train` end to end on tiny models: loss falls, the final folder loads, bad input is refused clearly."""

import json
import os
import subprocess
import sys

import pytest
import tiny_models
import torch
import yaml
from safetensors.torch import load_file

from loopfit import LoopfitConfig, LoopfitError, LoopfitForCausalLM
from loopfit.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_models.recurrent()
    out = tmp_path_factory.mktemp("tiny-loopfit")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_models.llama()
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    return out


def recipe(init_from, out_dir, **sections):
    r = {
        "model": {"init_from": str(init_from)},
        "data": {"synthetic": "pattern", "seq_len": 32},
        "recurrence": {"mean": 4, "backprop": 2, "curriculum": "linear", "curriculum_fraction": 0.5},
        "optim": {"lr": 0.02, "adamw_lr": 0.003},
        "schedule": {"name": "wsd", "warmup": 2, "decay": 0.3},
        "train": {"out_dir": str(out_dir), "steps": 30, "batch_size": 8, "micro_batch_size": 4, "progress": False,
                  "eval_every": 15, "eval_batches": 2},
        "checkpoint": {"every": 10, "keep": 2},
    }
    for section, values in sections.items():
        r[section] = {**r.get(section, {}), **values}
    return r


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_recurrent_loss_falls_and_final_folder_loads(tiny_dir, tmp_path):
    out = tmp_path / "run"
    result = train(recipe(tiny_dir, out))
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert result["step"] == 30 and result["stopped"] is None
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.5, (first, last)
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert len(evals) == 2 and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    # each held-out loss is logged with the compute spent so far, so `loopfit compare` can place it
    at_step = {r["step"]: r["flops"] for r in rows}
    assert [(e["step"], e["flops"]) for e in evals] == [(15, at_step[15]), (30, result["flops"])]
    # recurrence draws follow the curriculum; FLOPs add up per the paper's formula
    assert rows[0]["rbar"] == 1 and rows[-1]["rbar"] == 4
    assert all(r["k"] <= 2 for r in rows)
    assert rows[-1]["flops"] == pytest.approx(result["flops"]) and rows[-1]["tokens"] == 30 * 8 * 32
    # checkpoints: last K kept; the final folder is an ordinary transformers checkpoint
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000020", "step-00000030"]
    from transformers import AutoModelForCausalLM

    import loopfit  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    saved = load_file(out / "checkpoints/step-00000030/model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("step,loss,eval_loss")
    assert list((out / "tb").iterdir())


def test_final_folder_carries_the_depth_it_was_trained_at(tiny_dir, tmp_path):
    """Converted at r = 4, trained at recurrence.mean = 6: final/ says 6, so generate's default depth and eval's
    train_mean_recurrence tell the truth."""
    from transformers import AutoModelForCausalLM

    assert json.loads((tiny_dir / "config.json").read_text())["mean_recurrence"] == 4
    out = tmp_path / "run"
    train(recipe(tiny_dir, out, recurrence={"mean": 6, "mode": "fixed", "curriculum": "none"},
                 train={"steps": 1, "eval_every": 0}, checkpoint={"every": 0}))
    assert json.loads((out / "final" / "config.json").read_text())["mean_recurrence"] == 6
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.mean_recurrence == 6
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids, num_steps=6).logits)


def test_plain_baseline_cli_with_overrides(plain_dir, tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(recipe(plain_dir, tmp_path / "unused")))
    out = tmp_path / "plain"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "loopfit.cli", "train", str(path), f"--train.out_dir={out}", "--train.steps=20",
           "--optim.name=adamw", "--optim.adamw_lr=3e-3", "--checkpoint.every=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert len(rows) == 20 and rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert rows[0]["flops"] == 6 * (sum(p.numel() for p in _plain_params(plain_dir))) * 8 * 32
    assert "n" in rows[0] and rows[0]["n"] == 0
    # a typo is refused with a suggestion, as one line
    bad = subprocess.run(cmd[:5] + ["--optim.adamw_lrr=1"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "did you mean 'optim.adamw_lr'" in bad.stderr


def _plain_params(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return [p for p in model.parameters() if id(p) not in skip]


def test_bad_input_is_refused_with_the_fix(tiny_dir, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(LoopfitError, match="no model: set model.init_from"):
        train(recipe("", out))
    with pytest.raises(LoopfitError, match="not a model folder"):
        train(recipe(tmp_path / "missing", out))
    with pytest.raises(LoopfitError, match="the recipe has no data"):
        train({**recipe(tiny_dir, out), "data": {}})
    with pytest.raises(LoopfitError, match="data.root .* does not exist"):
        train({**recipe(tiny_dir, out), "data": {"root": str(tmp_path / "nodata"), "weights": {"x": 1}}})
    with pytest.raises(LoopfitError, match="batch_size 10 is not divisible by micro_batch_size 4"):
        train(recipe(tiny_dir, out, train={"batch_size": 10}))
    with pytest.raises(LoopfitError, match="token ids up to 999 .* another tokenizer"):
        train({**recipe(tiny_dir, out), "data": {"synthetic": "random", "vocab_size": 1000, "seq_len": 16}})
    with pytest.raises(LoopfitError, match="nothing to resume"):
        train(recipe(tiny_dir, out), resume="latest")
    result = train(recipe(tiny_dir, out, train={"steps": 2, "eval_every": 0}))
    # with no periodic eval, the one at the end still carries the run's tokens and FLOPs
    (end,) = [r for r in read_metrics(out) if "eval_loss" in r]
    assert (end["step"], end["tokens"], end["flops"]) == (2, result["tokens"], result["flops"])
    with pytest.raises(LoopfitError, match="already holds a run .* --resume"):
        train(recipe(tiny_dir, out, train={"steps": 2}))


def test_corrupt_latest_checkpoint_falls_back(tiny_dir, tmp_path, capfd):
    out = tmp_path / "corrupt"
    r = recipe(tiny_dir, out, train={"steps": 6, "eval_every": 0}, checkpoint={"every": 2, "keep": 3})
    train(r)
    f = out / "checkpoints/step-00000006/model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    capfd.readouterr()
    result = train(r, ["--train.steps=8"], resume="latest")
    err = capfd.readouterr().err
    assert "step-00000006 is unusable: model.safetensors does not match its checksum" in err
    assert "resumed from" in err and "step-00000004 at step 4" in err
    assert result["step"] == 8
    steps = [row["step"] for row in read_metrics(out) if "loss" in row]
    assert steps == list(range(1, 9))  # rows the lost checkpoint covered were rewritten, none duplicated


def test_nonfinite_loss_stops_with_last_good_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "nan"
    r = recipe(tiny_dir, out, optim={"name": "adamw", "adamw_lr": 1e30, "grad_clip": 0},
               schedule={"name": "constant", "warmup": 0}, train={"steps": 20, "eval_every": 0})
    with pytest.raises(LoopfitError,
                       match=r"non-finite training signal at step (\d+) .* last good state .* --resume") as e:
        train(r)
    bad_step = int(e.value.args[0].split("at step ")[1].split()[0])
    saved = out / f"checkpoints/step-{bad_step - 1:08d}/model.safetensors"
    assert saved.exists() and all(torch.isfinite(t).all() for t in load_file(saved).values())
    # with skip, the run goes on and finishes
    result = train(r, ["--train.on_nonfinite=skip", f"--train.out_dir={tmp_path / 'skip'}"])
    assert result["step"] == 20
    assert any(row.get("skipped") for row in read_metrics(tmp_path / "skip"))


@pytest.mark.real
def test_real_smollm2_slice_loss_falls(tmp_path, smollm2_tokenizer):
    """A (2,2,2) slice of the real SmolLM2-135M (24 of 30 layers dropped) heals on real prepared text."""
    from loopfit.convert import convert
    from loopfit.data import prepare

    model_dir = tmp_path / "smol-222"
    convert("smollm2-135m", model_dir, layers=(2, 2, 2), adapter_init="passthrough", parity=False, log=lambda *a: None)
    prepare(["general"], smollm2_tokenizer, tmp_path / "data", limit=400, holdout=0.05, progress=False)
    r = {
        "model": {"init_from": str(model_dir)},
        "data": {"root": str(tmp_path / "data"), "weights": {"general": 1.0}, "seq_len": 64, "eval": "general"},
        "recurrence": {"mode": "fixed", "mean": 2, "backprop": 2, "curriculum": "none"},
        # AdamW: Muon's Newton-Schulz on 576 x 1536 matrices costs ~9 s a step on one CPU thread
        "optim": {"name": "adamw", "adamw_lr": 0.001},
        "schedule": {"name": "constant", "warmup": 0},
        "train": {"out_dir": str(tmp_path / "run"), "steps": 10, "batch_size": 4, "micro_batch_size": 4,
                  "progress": False, "tensorboard": False, "eval_every": 0, "eval_batches": 2},
        "checkpoint": {"every": 0},
    }
    result = train(r)
    rows = [row for row in read_metrics(tmp_path / "run") if "loss" in row]
    first, last = sum(x["loss"] for x in rows[:3]) / 3, sum(x["loss"] for x in rows[-3:]) / 3
    # measured: 11.8 -> 7.5 nats (mean of the first and last 3 steps), held-out 7.6 at the end
    assert last < first - 2.0, (first, last)
    assert result["eval_loss"] is not None and result["eval_loss"] < first - 2.0
    assert all(row["mfu"] > 0 and row["tokens_per_s"] > 0 for row in rows)


def test_data_from_another_tokenizer_is_refused(tmp_path, smollm2_tokenizer):
    """Prepared data carries its tokenizer's fingerprint; a model folder with another tokenizer is refused even
    when every token id fits its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from loopfit.data import prepare

    model_dir = tmp_path / "model"
    LoopfitForCausalLM(LoopfitConfig(vocab_size=49152, **tiny_models.SIZES, num_prelude_layers=1, num_core_layers=1,
                                     num_coda_layers=1)).save_pretrained(model_dir)
    raw = Tokenizer(models.WordLevel({"<eos>": 0, "[UNK]": 1, "hello": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="[UNK]").save_pretrained(model_dir)
    (tmp_path / "text.txt").write_text("Some words to tokenise, enough for a few windows. " * 50)
    prepare([f"general={tmp_path / 'text.txt'}"], smollm2_tokenizer, tmp_path / "data", progress=False)
    r = recipe(model_dir, tmp_path / "run")
    r["data"] = {"root": str(tmp_path / "data"), "weights": {"general": 1.0}, "seq_len": 32}
    with pytest.raises(LoopfitError,
                       match="another tokenizer .* re-run `loopfit prepare` with the model's --tokenizer"):
        train(r)
