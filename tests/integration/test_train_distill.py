"""Distillation and trainable subsets through `loopfit train` on tiny converted models: KL ~ 0 from an identical
teacher, alpha 1 is plain cross-entropy, the teacher's FLOPs count, exact resume after kill -9, compile and
activation checkpointing, frozen parameters stay put, and bad input is refused in one line."""

import json

import pytest
import tiny_models
import torch
import yaml
from safetensors.torch import load_file
from test_train_resume import finish, kill_when, launch

from loopfit.cli import main
from loopfit.convert import convert
from loopfit.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 256


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny 4-layer Llama with a tokenizer; its conversion keeping every layer with the passthrough adapter
    (equal to the base at any r); and a (1,1,1) conversion with the paper's random adapter (needs healing)."""
    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    tiny_models.llama(VOCAB, num_hidden_layers=4).save_pretrained(root / "base")
    tiny_models.word_tokenizer().save_pretrained(root / "base")
    quiet = dict(log=lambda line: None, recurrence=3)
    convert(str(root / "base"), root / "whole", layers=(1, 2, 1), adapter_init="passthrough", **quiet)
    convert(str(root / "base"), root / "cut", layers=(1, 1, 1), **quiet)
    return root


def recipe(init_from, out_dir, steps=4, **sections):
    r = {
        "model": {"init_from": str(init_from)},
        "data": {"synthetic": "pattern", "seq_len": 24},
        "recurrence": {"mean": 3, "backprop": 2, "curriculum": "none"},
        "optim": {"lr": 0.02, "adamw_lr": 0.003},
        "schedule": {"name": "constant", "warmup": 0},
        "train": {"out_dir": str(out_dir), "steps": steps, "batch_size": 4, "micro_batch_size": 2,
                  "progress": False, "tensorboard": False, "eval_batches": 1},
        "checkpoint": {"every": 0},
    }
    for section, values in sections.items():
        r[section] = {**r.get(section, {}), **values}
    return r


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_pure_distillation_from_an_identical_conversion_starts_at_zero_kl(folders, tmp_path):
    out = tmp_path / "run"
    train(recipe(folders / "whole", out, steps=2, distill={"teacher": "base", "alpha": 0.0, "temperature": 2.0}))
    first = records(out)[0]
    assert abs(first["kl"]) < 1e-6 and first["loss"] == pytest.approx(4 * first["kl"], abs=1e-6)
    assert first["ce"] > 4  # the student is a random model: its cross-entropy is far from 0
    # the teacher's forward: 2 x its non-embedding parameters x tokens (4 layers of the tiny Llama)
    base_params = sum(p.numel() for n, p in tiny_models.llama(VOCAB, num_hidden_layers=4).named_parameters()
                      if "embed_tokens" not in n and "lm_head" not in n)
    assert first["flops_teacher"] == 2 * base_params * first["tokens"]
    final = records(out)[-1]
    assert "eval_loss" in final and final["flops_teacher"] == 2 * first["flops_teacher"]


def test_alpha_one_is_plain_cross_entropy(folders, tmp_path):
    ce = tmp_path / "ce"
    train(recipe(folders / "cut", ce))
    distilled = tmp_path / "alpha1"
    train(recipe(folders / "cut", distilled, distill={"teacher": str(folders / "base"), "alpha": 1.0}))
    plain, alpha1 = records(ce), records(distilled)
    losses = [r["loss"] for r in plain if "loss" in r]
    assert [r["loss"] for r in alpha1 if "loss" in r] == pytest.approx(losses, abs=2e-5)
    assert [r["ce"] for r in alpha1 if "ce" in r] == pytest.approx(losses, abs=2e-5)
    assert alpha1[-1]["eval_loss"] == pytest.approx(plain[-1]["eval_loss"], abs=2e-5)
    assert all(r["kl"] > 0.01 for r in alpha1 if "kl" in r)  # the cut model differs from its base


def test_distillation_lowers_the_kl_it_optimises(folders, tmp_path):
    out = tmp_path / "run"
    train(recipe(folders / "cut", out, steps=12, distill={"teacher": "base", "alpha": 0.0}))
    kl = [r["kl"] for r in records(out) if "kl" in r]
    assert kl[-1] < 0.7 * kl[0], kl


def test_kill_9_resumes_a_distillation_run_bit_exact(folders, tmp_path):
    path = tmp_path / "recipe.yaml"
    r = recipe(folders / "cut", None, steps=12, distill={"teacher": "base", "alpha": 0.3, "temperature": 2.0},
               checkpoint={"every": 4, "keep": 2})
    del r["train"]["out_dir"]
    path.write_text(yaml.safe_dump(r))
    finish(launch(path, tmp_path / "ref"))
    out = tmp_path / "run"
    proc = launch(path, out)
    kill_when(proc, lambda: (out / "checkpoints/step-00000008/manifest.json").exists())
    finish(launch(path, out, "--resume"))
    a, b = load_file(tmp_path / "ref/final/model.safetensors"), load_file(out / "final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [x["loss"] for x in records(out) if "loss" in x] == [x["loss"] for x in records(tmp_path / "ref")
                                                                 if "loss" in x]
    assert [x["kl"] for x in records(out) if "kl" in x] == [x["kl"] for x in records(tmp_path / "ref") if "kl" in x]


def test_compiled_and_checkpointed_distillation_matches_eager(folders, tmp_path):
    settings = dict(distill={"teacher": "base", "alpha": 0.5})
    train(recipe(folders / "cut", tmp_path / "eager", steps=3, **settings))
    train(recipe(folders / "cut", tmp_path / "fast", steps=3, **settings,
                 train={"out_dir": str(tmp_path / "fast"), "steps": 3, "batch_size": 4, "micro_batch_size": 2,
                        "progress": False, "tensorboard": False, "eval_batches": 1, "compile": "true",
                        "activation_checkpointing": "core"}))
    eager, fast = records(tmp_path / "eager"), records(tmp_path / "fast")
    for key in ("loss", "ce", "kl"):
        assert [r[key] for r in fast if key in r] == pytest.approx([r[key] for r in eager if key in r], abs=1e-4)


def test_adapter_phase_then_all(folders, tmp_path):
    """The adapter alone for the first half: only it moves and only it has optimizer state; then everything."""
    out = tmp_path / "run"
    start = load_file(folders / "cut" / "model.safetensors")
    train(recipe(folders / "cut", out, steps=4, train={"trainable": "adapter:2,all"},
                 checkpoint={"every": 2, "keep": 2}, distill={"teacher": "base", "alpha": 0.5}))
    half = load_file(out / "checkpoints/step-00000002/model.safetensors")
    moved = {k for k in start if not torch.equal(start[k], half[k])}
    assert moved == {"model.adapter.weight"}
    state = torch.load(out / "checkpoints/step-00000002/optimizer.pt", weights_only=True)["state"]
    assert set(state) == {"model.adapter.weight"}
    end = load_file(out / "final/model.safetensors")
    assert {k for k in start if not torch.equal(half[k], end[k])} == set(start)
    state = torch.load(out / "checkpoints/step-00000004/optimizer.pt", weights_only=True)["state"]
    assert set(state) == set(start)


def test_core_only_leaves_the_rest_frozen(folders, tmp_path):
    out = tmp_path / "run"
    start = load_file(folders / "cut" / "model.safetensors")
    train(recipe(folders / "cut", out, steps=2, train={"trainable": "core"}))
    end = load_file(out / "final/model.safetensors")
    moved = {k for k in start if not torch.equal(start[k], end[k])}
    assert moved and all(k.startswith("model.core.") for k in moved)


def test_lora_trains_only_its_factors_with_adamw_and_exports_merged(folders, tmp_path):
    from loopfit import LoopfitForCausalLM
    from loopfit.train import lora
    from loopfit.train.config import LoraConfig

    out = tmp_path / "run"
    settings = {"rank": 2, "alpha": 4.0, "targets": ["q_proj", "down_proj"], "lr": 0.01}
    train(recipe(folders / "cut", out, steps=3, train={"trainable": "lora"}, lora=settings,
                 distill={"teacher": "base", "alpha": 0.5}))
    ckpt = load_file(out / "checkpoints/step-00000003/model.safetensors")
    factors = {k for k in ckpt if ".lora_" in k}
    assert factors == {f"model.core.0.{m}.lora_{x}" for m in ("self_attn.q_proj", "mlp.down_proj") for x in "AB"}
    state = torch.load(out / "checkpoints/step-00000003/optimizer.pt", weights_only=True)["state"]
    assert set(state) == factors and all("exp_avg" in v for v in state.values())  # AdamW, not Muon
    start = load_file(folders / "cut" / "model.safetensors")
    assert all(torch.equal(start[k], ckpt[k]) for k in start)  # the weights themselves stay frozen
    # final/ is an ordinary folder with B A folded in: it computes what the model with its factors computed
    final = LoopfitForCausalLM.from_pretrained(out / "final").eval()
    assert not any(".lora_" in n for n, _ in final.named_parameters())
    with_factors = LoopfitForCausalLM.from_pretrained(folders / "cut")
    lora.apply(with_factors, LoraConfig(**settings))
    with_factors.load_state_dict(ckpt)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(final(ids, num_steps=3).logits, with_factors.eval()(ids, num_steps=3).logits,
                                   atol=1e-5, rtol=0)
    q_proj = final.model.core[0].self_attn.q_proj.weight
    assert not torch.equal(q_proj, with_factors.model.core[0].self_attn.q_proj.weight)


def test_bad_distillation_and_trainable_input_is_refused_in_one_line(folders, tmp_path, capfd):
    torch.manual_seed(0)
    tiny_models.llama(VOCAB + 8, num_hidden_layers=2).save_pretrained(tmp_path / "big-vocab")
    tiny_models.llama(VOCAB, num_hidden_layers=2).save_pretrained(tmp_path / "other-tok")
    tiny_models.word_tokenizer(prefix="x").save_pretrained(tmp_path / "other-tok")
    tiny_models.recurrent(VOCAB).save_pretrained(tmp_path / "unrecorded")
    good = tmp_path / "recipe.yaml"
    good.write_text(yaml.safe_dump(recipe(folders / "cut", tmp_path / "out")))
    cases = [
        ([f"--distill.teacher={tmp_path / 'big-vocab'}"], "has a vocabulary of 264 but the student's is 256"),
        ([f"--distill.teacher={tmp_path / 'other-tok'}"], "uses another tokenizer"),
        ([f"--distill.teacher={tmp_path / 'missing'}"], "does not exist"),
        (["--distill.teacher=base", f"--model.init_from={tmp_path / 'unrecorded'}"],
         "does not record the model it was converted from"),
        (["--distill.teacher=base", f"--model.init_from={folders / 'base'}"], "is a plain model"),
        (["--distill.teacher=base", "--distill.alpha=1.5"], "distill.alpha is 1.5: choose a weight in [0, 1]"),
        (["--distill.teacher=base", "--distill.temperature=0"], "distill.temperature is 0.0: use a temperature > 0"),
        (["--train.trainable=lora"], "selects no parameter"),
        (["--train.trainable=core", f"--model.init_from={folders / 'base'}"], "needs a recurrent loopfit model"),
        (["--train.trainable=adapter:0.5"], "last phase"),
        (["--lora.rank=-1"], "lora.rank is -1: use a rank >= 1, or 0 for no LoRA"),
        (["--lora.rank=33"], "lora.rank 33 is above the smallest targeted matrix side (32)"),  # k_proj: 64 -> 32
        (["--lora.rank=2", f"--model.init_from={folders / 'base'}"], "is a plain model"),
        (["--lora.rank=2", "--lora.targets=[qkv]"], "lora.targets names qkv"),
        (["--lora.rank=2", "--lora.per_loop=true", "--lora.init=svd", f"--model.init_from={tmp_path / 'unrecorded'}"],
         "lora.init svd needs the base model"),
        (["--lora.rank=2", "--lora.per_loop=true", "--lora.loops=-1"], "lora.loops is -1"),
    ]
    capfd.readouterr()
    for args, says in cases:
        rc = main(["train", str(good), *args])
        lines = capfd.readouterr().err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and says in lines[0], (args, lines)
        assert not (tmp_path / "out").exists(), args


def test_per_loop_lora_trains_and_its_folder_decodes_without_loopfit(folders, tmp_path):
    """lora.per_loop with the SVD init: final/ keeps a delta per loop, and where loopfit cannot be imported the
    folder's own model package (trust_remote_code) decodes the same tokens as loopfit does."""
    from loopfit import LoopfitForCausalLM

    out = tmp_path / "run"
    settings = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "up_proj"], "lr": 0.01, "per_loop": True,
                "loops": 2, "init": "svd"}
    train(recipe(folders / "cut", out, steps=2, train={"trainable": "lora"}, lora=settings))
    weights = load_file(out / "final/model.safetensors")
    assert weights["model.core.0.self_attn.q_proj.loop_lora_A"].shape == (2, 4, 64)
    start = load_file(folders / "cut" / "model.safetensors")
    assert all(torch.equal(start[k], weights[k]) for k in start)  # only the deltas trained
    model = LoopfitForCausalLM.from_pretrained(out / "final").eval()
    assert model.config.loop_lora == {"rank": 4, "alpha": 8.0, "loops": 2, "targets": ["q_proj", "up_proj"]}
    ids = torch.randint(2, VOCAB, (2, 7))
    expected = model.generate(ids, num_steps=3, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, num_steps=3, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                      draft_steps=1, draft_tokens=3), expected)
    code = f"""
import sys, torch
sys.modules["loopfit"] = None  # import loopfit fails
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out / 'final')!r}, trust_remote_code=True)
ids = torch.tensor({ids.tolist()})
print(model.generate(ids, num_steps=3, max_new_tokens=6, do_sample=False, pad_token_id=0).tolist())
"""
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == expected.tolist()
