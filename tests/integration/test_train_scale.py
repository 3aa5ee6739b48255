"""Training at scale, proven on the CPU: the loss without full logits, activation checkpointing, bf16 autocast for
every family, per-block compilation without recompiles, batched Newton-Schulz, depth per micro-batch and the
paper's FLOP count. Tolerances are stated per test (fp32 unless said)."""

import copy
import json
import os
import subprocess
import sys

import pytest
import tiny_models
import torch
import yaml
from safetensors.torch import load_file

from loopfit import LoopfitError
from loopfit.model import causal_lm_loss, linear_cross_entropy
from loopfit.train.config import load_recipe
from loopfit.train.flops import param_counts, train_flops
from loopfit.train.optim import Muon, _newton_schulz, _same_shape_batches
from loopfit.train.performance import compile_blocks, set_activation_checkpointing
from loopfit.train.recurrence import depth_for_step
from loopfit.train.trainer import train

VOCAB = 256


def batch(seed=0, rows=2, length=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    labels = ids.clone()
    labels[0, 3:6] = -100  # ignored positions must stay ignored
    return ids, labels


def loss_and_grads(model, ids, labels, num_steps=(2, 3), return_logits=True):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, num_steps=num_steps, return_logits=return_logits)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a, b, tol):
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() <= tol, name


class SavedTensors:
    """Shapes of the tensors autograd keeps for the backward (what activation memory is made of)."""

    def __enter__(self):
        self.shapes = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)
        self._hooks.__enter__()
        return self

    def _pack(self, t):
        self.shapes.append(tuple(t.shape))
        return t

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def elements(self):
        return sum(torch.Size(s).numel() for s in self.shapes)


# ------------------------------------------------------------------ loss without the full logits


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: soft-capped logits
def test_loss_without_full_logits_equals_full_loss_and_gradients(family):
    torch.manual_seed(0)
    model = tiny_models.recurrent_family(family, state_init="zeros").train()
    ids, labels = batch()
    with SavedTensors() as full_saved:
        full_loss, full_grads = loss_and_grads(model, ids, labels)
    with SavedTensors() as lean_saved:
        lean_loss, lean_grads = loss_and_grads(model, ids, labels, return_logits=False)
    assert abs(full_loss - lean_loss) <= 1e-5
    assert_same_grads(full_grads, lean_grads, 1e-5)
    # the full path keeps [tokens, vocab] logits for the backward; the lean one keeps nothing of vocabulary width
    assert any(s and s[-1] == VOCAB for s in full_saved.shapes)
    assert not any(s and s[-1] == VOCAB for s in lean_saved.shapes)


def test_linear_cross_entropy_in_many_chunks_matches_the_full_logits():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 41, 32, generator=g, requires_grad=True)
    weight = torch.randn(300, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 300, (3, 41), generator=g)
    labels[1, :10] = -100
    for softcap, items in ((None, None), (5.0, 77.0)):
        logits = hidden @ weight.T
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        ref = causal_lm_loss(logits, labels, items)
        ref_grads = torch.autograd.grad(ref, (hidden, weight))
        ours = linear_cross_entropy(hidden, weight, labels, items, softcap, chunk_elements=300 * 7)  # 18 chunks
        grads = torch.autograd.grad(ours, (hidden, weight))
        assert abs(ref - ours) <= 1e-5
        for a, b in zip(ref_grads, grads):
            assert (a - b).abs().max() <= 1e-5


# ------------------------------------------------------------------ activation checkpointing


# per-loop LoRA (relaxed recursion): each loop of the core reads its own delta, three loops of them
LOOP_LORA = {"rank": 2, "alpha": 4.0, "loops": 3, "targets": ["q_proj", "up_proj"]}


def relaxed(model):
    """model with nonzero per-loop deltas (a fresh relaxed model's are zero, like the shared model)."""
    with torch.no_grad():
        for linear in model.model.loop_linears:
            linear.loop_lora_A.normal_(std=0.3)
            linear.loop_lora_B.normal_(std=0.3)
    return model


@pytest.mark.parametrize("loop_lora", [None, LOOP_LORA], ids=["shared", "per-loop-lora"])
def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less(loop_lora):
    torch.manual_seed(0)
    base = relaxed(tiny_models.recurrent(state_init="zeros", loop_lora=loop_lora).train())
    ids, labels = batch()
    results = {}
    for which in ("none", "core", "all"):
        model = copy.deepcopy(base)
        assert set_activation_checkpointing(model, which) == {"none": 0, "core": 2, "all": 4}[which]
        with SavedTensors() as saved:
            results[which] = (*loss_and_grads(model, ids, labels, return_logits=False), saved.elements())
    for which in ("core", "all"):
        assert abs(results[which][0] - results["none"][0]) <= 1e-6
        assert_same_grads(results[which][1], results["none"][1], 1e-6)
    assert results["all"][2] < results["core"][2] < results["none"][2]
    with pytest.raises(LoopfitError, match="choose one of none, core, all"):
        load_recipe({}, ["--train.activation_checkpointing=blocks"])


# ------------------------------------------------------------------ bf16 autocast


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_bf16_autocast_trains_every_family_on_cpu(family):
    torch.manual_seed(0)
    model = tiny_models.recurrent_family(family, state_init="zeros").train()
    ids, labels = batch()
    fp32_loss, _ = loss_and_grads(model, ids, labels, return_logits=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss, grads = loss_and_grads(model, ids, labels, return_logits=False)
    assert torch.isfinite(bf16_loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert abs(bf16_loss - fp32_loss) <= 0.02 * fp32_loss  # bf16 keeps ~3 significant digits
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32 under autocast


# ------------------------------------------------------------------ compilation


@pytest.mark.parametrize("loop_lora", [None, LOOP_LORA], ids=["shared", "per-loop-lora"])
def test_compiled_blocks_run_every_loop_and_depth_without_recompiling(loop_lora):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = relaxed(tiny_models.recurrent(num_prelude_layers=2, num_core_layers=3, num_coda_layers=2,
                                          state_init="zeros", loop_lora=loop_lora).train())
    model = copy.deepcopy(eager)
    set_activation_checkpointing(model, "core")
    compile_blocks(model)
    ids, labels = batch()
    graphs = []
    for num_steps in [(0, 2), (3, 2), (1, 1), (5, 3), (0, 4)]:
        loss, grads = loss_and_grads(model, ids, labels, num_steps, return_logits=False)
        ref_loss, ref_grads = loss_and_grads(eager, ids, labels, num_steps, return_logits=False)
        assert abs(loss - ref_loss) <= 1e-5
        assert_same_grads(grads, ref_grads, 1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    # 7 blocks, 20 loops in all, three graphs made in the first two calls and none after: prelude and coda with
    # gradients, core blocks that recompute in the backward, loops without gradients
    assert graphs == [2, 3, 3, 3, 3], graphs
    assert not counters["recompiles"]


def cli(args, env=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "loopfit.cli", "train", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    torch.manual_seed(0)
    tiny_models.recurrent().save_pretrained(root / "tiny")
    recipe = {
        "model": {"init_from": str(root / "tiny")},
        "data": {"synthetic": "pattern", "seq_len": 16},
        "recurrence": {"mean": 4, "backprop": 2, "curriculum": "none"},
        "optim": {"lr": 0.02, "adamw_lr": 0.003},
        "schedule": {"name": "constant", "warmup": 0},
        "train": {"steps": 4, "batch_size": 4, "micro_batch_size": 2, "progress": False, "eval_batches": 1,
                  "tensorboard": False},
        "checkpoint": {"every": 2, "keep": 2},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_compiled_training_matches_eager_and_resumes_bit_exact(tiny_recipe, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert cli([str(tiny_recipe), f"--train.out_dir={eager}", "--train.compile=false"]).returncode == 0
    proc = cli([str(tiny_recipe), f"--train.out_dir={compiled}", "--train.compile=true",
                "--train.activation_checkpointing=core"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "blocks compiled" in proc.stderr
    assert losses(compiled) == pytest.approx(losses(eager), abs=1e-4)
    reference = load_file(compiled / "final/model.safetensors")
    for done in ("checkpoints/step-00000004", "final"):  # as if killed after the checkpoint of step 2
        subprocess.run(["rm", "-r", str(compiled / done)], check=True)
    proc = cli([str(tiny_recipe), f"--train.out_dir={compiled}", "--train.compile=true",
                "--train.activation_checkpointing=core", "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = load_file(compiled / "final/model.safetensors")
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_compile_refused_in_one_line_where_it_cannot_work(tiny_recipe, tmp_path):
    no_compiler = {"CXX": str(tmp_path / "no-such-g++")}
    proc = cli([str(tiny_recipe), f"--train.out_dir={tmp_path / 'a'}", "--train.compile=true"], env=no_compiler)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "C++ compiler" in line and "train.compile=false" in line
    assert not (tmp_path / "a" / "checkpoints").exists()
    # auto does not compile on a CPU, so the same machine trains
    proc = cli([str(tiny_recipe), f"--train.out_dir={tmp_path / 'b'}", "--train.steps=1"], env=no_compiler)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------ Muon


def test_batched_newton_schulz_equals_one_matrix_at_a_time():
    g = torch.Generator().manual_seed(0)
    shapes = [(48, 16), (48, 16), (16, 48), (48, 16), (32, 32), (16, 48)]
    mats = [torch.randn(*s, generator=g) for s in shapes]
    coeffs = Muon([torch.nn.Parameter(mats[0])]).param_groups[0]["ns_coefficients"]
    batched = _newton_schulz(torch.stack(mats[:2]), coeffs, 5, 1e-7)
    for i in range(2):
        assert (batched[i] - _newton_schulz(mats[i], coeffs, 5, 1e-7)).abs().max() <= 1e-5
    assert _same_shape_batches(mats) == [[0, 1, 3], [2, 5], [4]]
    # three optimizer steps: batched Muon equals a per-matrix reference, momentum and all
    params = [torch.nn.Parameter(m.clone()) for m in mats]
    ref = [m.clone() for m in mats]
    bufs = [torch.zeros_like(m) for m in mats]
    opt = Muon(params, lr=0.02, weight_decay=0.1)
    lr = 0.02
    for _ in range(3):
        grads = [torch.randn(*s, generator=g) for s in shapes]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        for i, gr in enumerate(grads):
            bufs[i].lerp_(gr, 1 - 0.95)
            update = _newton_schulz(gr.lerp(bufs[i], 0.95), coeffs, 5, 1e-7)
            ref[i].mul_(1 - lr * 0.1).add_(update, alpha=-lr * max(1, shapes[i][0] / shapes[i][1]) ** 0.5)
    for p, r in zip(params, ref):
        assert (p - r).abs().max() <= 1e-5


# ------------------------------------------------------------------ the authors' bookkeeping


@pytest.mark.parametrize("depth_per", ["micro_batch", "step"])
def test_depth_drawn_per_micro_batch_and_flops_by_the_papers_count(tiny_recipe, tmp_path, depth_per):
    out = tmp_path / "run"
    cfg = yaml.safe_load(tiny_recipe.read_text())
    cfg["train"].update(batch_size=8, micro_batch_size=2, steps=3)  # 4 micro-batches per step
    cfg["recurrence"].update(mean=6, backprop=2, depth_per=depth_per)
    train(cfg, [f"--train.out_dir={out}"])
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    rec = load_recipe(cfg).recurrence
    counts = param_counts(tiny_models.recurrent())
    flops = flops_full = 0
    for step, row in enumerate(rows):
        draws = [depth_for_step(step, 3, rec, 0, i if depth_per == "micro_batch" else None)[:2] for i in range(4)]
        flops += sum(train_flops(2 * 16, counts, n, k) for n, k in draws)
        flops_full += sum(train_flops(2 * 16, counts, n, k, full=True) for n, k in draws)
        assert row["n"] == pytest.approx(sum(n for n, _ in draws) / 4, abs=1e-3)
        assert row["flops"] == pytest.approx(flops, rel=1e-12)
        assert row["flops_full"] == pytest.approx(flops_full, rel=1e-12) and row["flops_full"] > row["flops"]
    if depth_per == "micro_batch":  # four draws a step, not one: their depths differ somewhere
        assert any(len({depth_for_step(s, 3, rec, 0, i) for i in range(4)}) > 1 for s in range(3))


def test_curriculum_ramp_rounds_up():
    rec = load_recipe({"recurrence": {"mode": "fixed", "mean": 8, "backprop": 8, "curriculum": "linear",
                                      "curriculum_fraction": 0.25}}).recurrence
    # ramp = ceil(0.25 * 10) = 3 steps (round would give 2): step 2 is still ramping
    assert depth_for_step(2, 10, rec)[2] == 6 and depth_for_step(3, 10, rec)[2] == 8
    rec.curriculum_fraction = 0.7  # 0.7 * 10 = 7.000000000000001 in floats: still 7 steps
    assert depth_for_step(6, 10, rec)[2] < 8 and depth_for_step(7, 10, rec)[2] == 8
