"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 give the single-process losses for the same global batch."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import tiny_models
import torch
import yaml
from safetensors.torch import load_file

STEPS = 4
# absolute, on the loss. DDP differs only in the order of the gradient sum. Under FSDP2, Muon's Newton-Schulz runs
# on sharded DTensors (sharded reductions), a different float order that Muon's large lr amplifies over steps:
# measured 1.8e-4 at step 4 (a per-shard, wrong orthogonalisation would be off by far more).
TOL = {"ddp": 1e-4, "fsdp": 1e-3}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    # zero initial state: no per-rank noise, so the runs are comparable step by step
    tiny_models.recurrent(mean_recurrence=3, state_init="zeros").save_pretrained(root / "tiny")
    recipe = {
        "model": {"init_from": str(root / "tiny")},
        "data": {"synthetic": "pattern", "seq_len": 16},
        "recurrence": {"mode": "fixed", "mean": 3, "backprop": 2, "curriculum": "none"},
        "optim": {"lr": 0.02, "adamw_lr": 0.003},
        "schedule": {"name": "constant", "warmup": 0},
        "train": {"steps": STEPS, "batch_size": 8, "micro_batch_size": 2, "progress": False, "tensorboard": False,
                  "eval_every": 0, "eval_batches": 1},
        "checkpoint": {"every": 2, "keep": 2},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    single = root / "single"
    run([sys.executable, "-m", "loopfit.cli", "train", str(root / "recipe.yaml"), f"--train.out_dir={single}"])
    return root, losses(single)


def run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def torchrun(root, out, strategy, *extra):
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                "loopfit.cli", "train", str(root / "recipe.yaml"), f"--train.out_dir={out}",
                f"--distributed.strategy={strategy}", *extra])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_single_process_and_resume(setup, strategy, tmp_path):
    root, single = setup
    out = tmp_path / strategy
    torchrun(root, out, strategy)
    assert losses(out) == pytest.approx(single, abs=TOL[strategy])
    # Muon momentum of every rank is in the checkpoint: resuming from step 2 reproduces steps 3-4
    shutil.rmtree(out / "checkpoints/step-00000004")
    shutil.rmtree(out / "final")
    torchrun(root, out, strategy, "--resume")
    assert losses(out) == pytest.approx(single, abs=TOL[strategy])
    osd = torch.load(out / "checkpoints/step-00000004/optimizer.pt", weights_only=True)
    weights = load_file(out / "checkpoints/step-00000004/model.safetensors")
    bufs = {name: s["momentum_buffer"] for name, s in osd["state"].items() if "momentum_buffer" in s}
    assert "model.adapter.weight" in bufs and len(bufs) == sum(1 for k, v in weights.items() if v.ndim == 2) - 2
    for name, buf in bufs.items():  # full, gathered matrices (not one rank's shard), all updated
        assert buf.shape == weights[name].shape and buf.abs().sum() > 0, name


def _tiny_prepared_data(root):
    """A tiny model with a word-level tokenizer and a prepared dataset whose 'val' split holds 10 windows of 16."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from loopfit.data import prepare

    torch.manual_seed(0)
    tiny_models.recurrent(mean_recurrence=2, state_init="zeros").save_pretrained(root / "tiny")
    words = [f"w{i}" for i in range(50)]
    raw = Tokenizer(models.WordLevel({"<eos>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}},
                                     unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="[UNK]").save_pretrained(root / "tiny")
    docs = [" ".join(words[(i * 7 + j) % 50] for j in range(40)) for i in range(40)]
    (root / "text.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare([f"general={root / 'text.jsonl'}"], str(root / "tiny"), root / "data", holdout=0.1, progress=False)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_unequal_heldout_batches_per_rank_do_not_hang(strategy, tmp_path):
    """train.eval_batches=1 on 2 ranks: rank 0 holds the one held-out batch, rank 1 none. Every rank still runs
    the same number of forwards (they are collectives), and the held-out loss is the single process's."""
    _tiny_prepared_data(tmp_path)
    recipe = {
        "model": {"init_from": str(tmp_path / "tiny")},
        "data": {"root": str(tmp_path / "data"), "weights": {"general": 1.0}, "seq_len": 16, "eval": "general"},
        "recurrence": {"mode": "fixed", "mean": 2, "backprop": 1, "curriculum": "none"},
        "optim": {"name": "adamw", "adamw_lr": 0.001},
        "schedule": {"name": "constant", "warmup": 0},
        "train": {"steps": 2, "batch_size": 4, "micro_batch_size": 2, "progress": False, "tensorboard": False,
                  "eval_every": 1, "eval_batches": 1},
        "checkpoint": {"every": 0},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run([sys.executable, "-m", "loopfit.cli", "train", str(tmp_path / "recipe.yaml"),
         f"--train.out_dir={tmp_path / 'single'}"])
    out = tmp_path / strategy
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "loopfit.cli",
           "train", str(tmp_path / "recipe.yaml"), f"--train.out_dir={out}", f"--distributed.strategy={strategy}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=180)  # a hang is a failure here, not a stuck suite
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "final" / "model.safetensors").is_file()

    def heldout(folder):
        return [r["eval_loss"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                if "eval_loss" in r]

    single = heldout(tmp_path / "single")
    assert len(single) == 2 and heldout(out) == pytest.approx(single, abs=TOL[strategy])


@pytest.fixture(scope="module")
def distill_setup(setup, tmp_path_factory):
    """The same run distilled from a tiny plain teacher (alpha 0.3, T 2), with the adapter alone for the first two
    steps: the single-process losses, cross-entropies and KLs."""
    root, _ = setup
    torch.manual_seed(1)
    tiny_models.llama(num_hidden_layers=2).save_pretrained(root / "teacher")
    extra = [f"--distill.teacher={root / 'teacher'}", "--distill.alpha=0.3", "--distill.temperature=2",
             "--train.trainable=adapter:2,all"]
    single = tmp_path_factory.mktemp("distill") / "single"
    run([sys.executable, "-m", "loopfit.cli", "train", str(root / "recipe.yaml"), f"--train.out_dir={single}", *extra])
    return root, extra, single


def series(out, key):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_distillation_under_torchrun_matches_single_process(distill_setup, strategy, tmp_path):
    """The teacher runs beside the student on each rank (sharded per block under FSDP2); the trainable phase
    switch (adapter, then all) is DDP's, FSDP2 trains one set: there the run keeps the adapter phase off."""
    root, extra, single = distill_setup
    out = tmp_path / strategy
    if strategy == "fsdp":
        extra = extra[:-1]
        single = tmp_path / "single-all"
        run([sys.executable, "-m", "loopfit.cli", "train", str(root / "recipe.yaml"), f"--train.out_dir={single}",
             *extra])
    torchrun(root, out, strategy, *extra)
    for key in ("loss", "ce", "kl"):
        assert series(out, key) == pytest.approx(series(single, key), abs=TOL[strategy]), key
    assert series(out, "flops_teacher") == series(single, "flops_teacher")
    assert series(single, "kl")[0] > 1e-3  # a real KL between two different models
