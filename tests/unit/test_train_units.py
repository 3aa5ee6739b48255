"""Pure pieces of the trainer: recurrence sampler and curriculum, LR schedules, FLOPs, recipes, optimizer groups."""

import math

import numpy as np
import pytest
import tiny_models
import torch

from loopfit import LoopfitError
from loopfit.train.config import load_recipe
from loopfit.train.flops import param_counts, train_flops
from loopfit.train.optim import build_optimizers, split_params
from loopfit.train.recurrence import curriculum_value, depth_for_step, fixed_depth, sample_depth
from loopfit.train.schedules import lr_factor, lr_fraction

# ------------------------------------------------------------------ recurrence


@pytest.mark.parametrize("mean,backprop", [(32, 8), (4, 8), (8, 8), (16, 4)])
def test_sampler_mean_matches_target(mean, backprop):
    draws = [sample_depth(s, mean, backprop, seed=0) for s in range(20000)]
    total = np.array([n + k for n, k in draws])
    # E[p] = rbar + 1 (Poisson(lam) + 1 with E[lam] = rbar); standard error ~ sqrt(var / N) < 0.05 here
    assert abs(total.mean() - (mean + 1)) < 0.25, total.mean()
    ks = np.array([k for _, k in draws])
    assert ks.max() == min(backprop, mean) and ks.min() >= 1
    assert all(n == 0 or k == min(backprop, mean) for n, k in draws)  # no-grad loops only once k is full


def test_sampler_is_a_function_of_seed_and_step_only():
    a = [sample_depth(s, 32, 8, seed=3) for s in range(200)]
    np.random.seed(123)
    torch.manual_seed(123)
    b = [sample_depth(s, 32, 8, seed=3) for s in reversed(range(200))][::-1]
    assert a == b
    assert a != [sample_depth(s, 32, 8, seed=4) for s in range(200)]


def test_curriculum_values():
    # rbar(step) = max(1, ceil(rbar_max * f(step / ramp))) then rbar_max
    assert curriculum_value(0, 100, 32, "linear") == 1
    assert curriculum_value(50, 100, 32, "linear") == 16
    assert curriculum_value(25, 100, 32, "linear") == 8
    assert curriculum_value(100, 100, 32, "linear") == 32
    assert curriculum_value(500, 100, 32, "linear") == 32
    assert curriculum_value(50, 100, 32, "1-sqrt") == math.ceil(32 * (1 - math.sqrt(0.5)))  # 10
    assert curriculum_value(75, 100, 32, "1-sqrt") == 16
    assert curriculum_value(10, 100, 32, "none") == 32
    one_sqrt = [curriculum_value(s, 100, 32, "1-sqrt") for s in range(100)]
    linear = [curriculum_value(s, 100, 32, "linear") for s in range(100)]
    assert one_sqrt == sorted(one_sqrt) and all(a <= b for a, b in zip(one_sqrt, linear))


def test_depth_for_step_modes():
    cfg = load_recipe({"recurrence": {"mode": "fixed", "mean": 12, "backprop": 8, "curriculum": "none"}}).recurrence
    assert depth_for_step(7, 100, cfg) == (4, 8, 12, 8)
    assert fixed_depth(3, 8) == (0, 3)
    cfg = load_recipe({"recurrence": {"mode": "fixed", "mean": 32, "backprop": 8, "curriculum": "linear",
                                      "curriculum_fraction": 0.5, "curriculum_target": "backprop"}}).recurrence
    assert depth_for_step(0, 100, cfg) == (31, 1, 32, 1)   # backprop depth ramps from 1 ...
    assert depth_for_step(25, 100, cfg) == (28, 4, 32, 4)
    assert depth_for_step(60, 100, cfg) == (24, 8, 32, 8)  # ... to 8 after 50% of training
    cfg = load_recipe({"recurrence": {"mean": 32, "backprop": 8, "curriculum": "1-sqrt",
                                      "curriculum_fraction": 0.75}}).recurrence
    early = np.mean([sum(depth_for_step(s, 10000, cfg)[:2]) for s in range(0, 500)])
    late = np.mean([sum(depth_for_step(s, 10000, cfg)[:2]) for s in range(8000, 10000)])
    assert early < 3 and abs(late - 33) < 1


# ------------------------------------------------------------------ schedules


def test_schedule_values():
    # wsd: 10 warmup steps, flat, then the last 50 of 100 steps fall linearly to the floor
    f = [lr_factor(s, 100, "wsd", warmup=10, decay=0.5, decay_shape="linear", floor=0.01) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[10] == 1.0 and f[49] == 1.0
    assert f[50] == 1.0 and f[99] == pytest.approx(0.01)
    assert f[74] == pytest.approx(0.01 + 0.99 * (1 - 24 / 49))
    cos = [lr_factor(s, 101, "cosine", warmup=0, floor=0.1) for s in range(101)]
    assert cos[0] == 1.0 and cos[50] == pytest.approx(0.55) and cos[100] == pytest.approx(0.1)
    # cosine with warmup: 10 linear warmup steps, then cosine from 1 at step 10 to the floor at step 100
    cw = [lr_factor(s, 101, "cosine", warmup=10, floor=0.0) for s in range(101)]
    assert cw[4] == pytest.approx(0.5) and cw[10] == 1.0 and cw[55] == pytest.approx(0.5) and cw[100] == 0.0
    # wsd with cosine decay over the last 20 of 101 steps (81 -> 100) to 0.001 (the GPU recipes' shape)
    wc = [lr_factor(s, 101, "wsd", warmup=0, decay=0.2, decay_shape="cosine", floor=0.001) for s in range(101)]
    assert wc[80] == wc[81] == 1.0 and wc[100] == pytest.approx(0.001)
    assert wc[90] == pytest.approx(0.001 + 0.999 * 0.5 * (1 + math.cos(math.pi * 9 / 19)))
    sq = lr_factor(75, 101, "wsd", warmup=0, decay=1.0, decay_shape="1-sqrt", floor=0.0)
    assert sq == pytest.approx(1 - math.sqrt(0.75))
    assert lr_factor(0, 100, "constant", warmup=0.1) == pytest.approx(0.1) and lr_factor(50, 100, "constant") == 1
    # continued pretraining: no warmup, cosine from the start lr to start/100
    cpt = [lr_factor(s, 1001, "cpt", warmup=0.5, floor=0.01) for s in range(1001)]
    assert cpt[0] == 1.0 and cpt[-1] == pytest.approx(0.01)
    switch = next(s for s, v in enumerate(cpt) if v <= 0.2)  # the blend switch at lr_start / 5
    assert 0.68 < switch / 1000 < 0.72  # about 71% of the way (docs/papers.md §5)
    # the blend reads 1 during warmup (a warmup starting below 1/5 must not trigger the switch), then the factor
    assert lr_factor(0, 100, "wsd", warmup=10) == pytest.approx(0.1) and lr_fraction(0, 100, "wsd", warmup=10) == 1.0
    assert lr_fraction(95, 100, "wsd", warmup=10) == lr_factor(95, 100, "wsd", warmup=10) < 0.2
    assert lr_fraction(0, 100, "cpt", warmup=10) == lr_factor(0, 100, "cpt", warmup=10) == 1.0


# ------------------------------------------------------------------ FLOPs


def test_flops_formula_by_hand():
    counts = {"prelude": 10, "core": 100, "coda": 20}
    # 6 * D * (P + k R + C) + 2 * D * n R with D = 1000, n = 24, k = 8
    assert train_flops(1000, counts, n=24, k=8) == 6 * 1000 * (10 + 800 + 20) + 2 * 1000 * 2400 == 9_780_000
    assert train_flops(1000, {"plain": 130}, n=5, k=5) == 6 * 130 * 1000


def test_param_counts_split_model():
    model = tiny_models.recurrent()
    c = param_counts(model)
    inner = model.model
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert c["core"] == n(inner.core) and c["adapter"] == 2 * 64 * 64 and c["final_norm"] == 64
    assert c["prelude"] == n(inner.prelude)
    total = n(model) - n(inner.embed_tokens) - n(model.lm_head)
    assert c["prelude"] + c["core"] + c["coda"] + c["adapter"] + c["final_norm"] == total
    # the paper's count leaves the adapter and the final norm out; the full count puts them in R and C
    p, r, cc = c["prelude"], c["core"], c["coda"]
    assert train_flops(10, c, n=3, k=2) == 6 * 10 * (p + 2 * r + cc) + 2 * 10 * 3 * r
    r, cc = r + 2 * 64 * 64, cc + 64
    assert train_flops(10, c, n=3, k=2, full=True) == 6 * 10 * (p + 2 * r + cc) + 2 * 10 * 3 * r
    from transformers import LlamaConfig, LlamaForCausalLM

    plain = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    assert param_counts(plain)["plain"] == n(plain) - 256 * 64


def test_fsdp_units_are_the_models_own_blocks():
    """FSDP shards what the model names: every block of a loopfit model, by part, in order; a plain model's
    layers."""
    from loopfit.train.distributed import blocks

    model = tiny_models.recurrent()
    inner = model.model
    assert blocks(model) == model.fsdp_units()
    assert [part for part, _ in blocks(model)] == ["prelude", "core", "core", "coda"]
    assert [b for _, b in blocks(model)] == [*inner.prelude, *inner.core, *inner.coda]
    plain = tiny_models.llama()
    assert [b for _, b in blocks(plain)] == list(plain.model.layers)


# ------------------------------------------------------------------ optimizers and recipes


def test_muon_gets_hidden_matrices_and_adapter():
    model = tiny_models.recurrent()
    muon, adamw = split_params(model)
    muon_names = {n for n, _ in muon}
    assert "model.adapter.weight" in muon_names
    assert all(p.ndim == 2 for _, p in muon)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= {n for n, _ in adamw}
    assert all(p.ndim == 1 for n, p in adamw if "embed" not in n and "lm_head" not in n)
    cfg = load_recipe({"optim": {"lr": 0.02, "adamw_lr": 0.003}}).optim
    opts = build_optimizers(model, cfg)
    assert [type(o).__name__ for o in opts] == ["Muon", "AdamW"]
    assert opts[0].param_groups[0]["lr"] == 0.02 and opts[1].param_groups[0]["lr"] == 0.003
    assert opts[1].param_groups[0]["betas"] == (0.9, 0.95)
    one = build_optimizers(model, load_recipe({"optim": {"name": "adamw"}}).optim)
    assert len(one) == 1
    assert sum(p.numel() for p in one[0].param_groups[0]["params"]) == sum(p.numel() for p in model.parameters())


def test_recipe_overrides_types_and_suggestions(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  lr: 1e-3\ntrain:\n  steps: 10\ndata:\n  synthetic: pattern\n")
    cfg = load_recipe(path, ["--train.steps=5", "--optim.betas=[0.8, 0.9]", "--data.seq_len=16",
                             "--train.tensorboard=false"])
    assert cfg.optim.lr == 0.001 and cfg.train.steps == 5 and cfg.optim.betas == [0.8, 0.9]
    assert (cfg.data.synthetic, cfg.data.seq_len) == ("pattern", 16) and cfg.train.tensorboard is False
    with pytest.raises(LoopfitError, match="unknown recipe key 'optim.lrr': did you mean 'optim.lr'"):
        load_recipe(path, ["--optim.lrr=1"])
    with pytest.raises(LoopfitError, match="did you mean 'train.micro_batch_size'"):
        load_recipe({"train": {"micro_batchsize": 2}})
    with pytest.raises(LoopfitError, match="did you mean 'recurrence.mean'"):
        load_recipe({"recurence": {"mean": 2}})
    with pytest.raises(LoopfitError, match="choose one of linear, cosine, 1-sqrt"):
        load_recipe({}, ["--schedule.decay_shape=sqrt"])
    with pytest.raises(LoopfitError, match="expects int"):
        load_recipe({}, ["--train.steps=ten"])


def test_recipe_sections_are_typed_and_check_themselves():
    from loopfit.train.config import DataConfig, ScheduleConfig, TrainConfig, describe_keys

    # the cpt floor is the config's stated default, not a trainer's rewrite; an explicit floor is kept as given
    assert load_recipe({}).schedule.floor == 0.001 and ScheduleConfig().floor == 0.001
    assert load_recipe({"schedule": {"name": "cpt"}}).schedule.floor == ScheduleConfig(name="cpt").floor == 0.01
    assert load_recipe({"schedule": {"name": "cpt", "floor": 0.001}}).schedule.floor == 0.001
    assert load_recipe({}, ["--schedule.name=cpt"]).to_dict()["schedule"]["floor"] == 0.01  # written with the run
    # choices come from the Literal types, for sections built directly too
    with pytest.raises(LoopfitError, match="recipe key 'train.precision' is 'fp16': choose one of auto, fp32, bf16"):
        TrainConfig(precision="fp16")
    with pytest.raises(LoopfitError, match="recipe key 'data.synthetic' is 'noise': choose one of random, pattern"):
        load_recipe({}, ["--data.synthetic=noise"])
    # the data section is typed: CLI strings become its types, unknown keys get a suggestion
    cfg = load_recipe({"data": {"root": "d", "weights": {"a": 1}}}, ["--data.seq_len=64", "--data.weights.b=0.5"])
    assert cfg.data.seq_len == 64 and cfg.data.weights == {"a": 1, "b": 0.5} and cfg.data.kind == "blend"
    assert cfg.to_dict()["data"] == {"root": "d", "weights": {"a": 1, "b": 0.5}, "seq_len": 64, "pack": "concat"}
    with pytest.raises(LoopfitError, match="unknown recipe key 'data.seqlen': did you mean 'data.seq_len'"):
        load_recipe({"data": {"synthetic": "random", "seqlen": 8}})
    with pytest.raises(LoopfitError, match="recipe key 'data.seq_len' expects int, got 'long'"):
        load_recipe({}, ["--data.seq_len=long"])
    # cross-field checks live in the config
    with pytest.raises(LoopfitError, match="data.synthetic and data.tokens are both set"):
        DataConfig(synthetic="random", tokens="t.npy")
    with pytest.raises(LoopfitError, match="data needs a blend"):
        load_recipe({"data": {"root": "d"}})
    with pytest.raises(LoopfitError, match="batch_size 10 is not divisible by micro_batch_size 4 x 1 rank"):
        load_recipe({"train": {"batch_size": 10}})
    with pytest.raises(LoopfitError, match="batch_size 12 is not divisible by micro_batch_size 4 x 2 rank"):
        load_recipe({"model": {"init_from": "m"}, "data": {"synthetic": "random"}, "train": {"batch_size": 12}}
                    ).check_runnable(world=2)
    with pytest.raises(LoopfitError, match="recurrence.mean and recurrence.backprop must be >= 1"):
        load_recipe({}, ["--recurrence.backprop=0"])
    with pytest.raises(LoopfitError, match="optim.betas is .*: give two numbers"):
        load_recipe({}, ["--optim.betas=0.9"])
    with pytest.raises(LoopfitError, match="the recipe has no data"):
        load_recipe({"model": {"init_from": "m"}}).check_runnable()
    # --help lists every key, grouped by section, with its default, choices and doc
    text = describe_keys()
    assert "\nschedule: " in text and "  train.precision = 'auto'\n" in text and "[auto | fp32 | bf16]" in text
    assert "0.01 for cpt" in text and "data.seq_len = 1024" in text


def test_muon_runs_newton_schulz_in_fp32_on_cpu_and_matches_torch():
    from torch.optim import _muon

    from loopfit.train.optim import Muon, _newton_schulz

    g = torch.randn(96, 40, generator=torch.Generator().manual_seed(0))
    coeffs = (_muon.DEFAULT_A, _muon.DEFAULT_B, _muon.DEFAULT_C)
    ours = _newton_schulz(g, coeffs, 5, 1e-7)
    ref = _muon._zeropower_via_newtonschulz(g, coeffs, 5, 1e-7).float()  # torch's, in bf16
    assert ours.dtype == torch.float32 and ours.shape == g.shape
    assert (ours - ref).abs().max() < 0.03  # bf16 rounding of torch's; the iterate's entries are ~0.1-0.2
    # two optimizer steps agree with torch.optim.Muon to that precision, and the state has the same keys
    a, b = torch.nn.Parameter(g.clone()), torch.nn.Parameter(g.clone())
    opt_a, opt_b = Muon([a], lr=0.02, weight_decay=0.1), torch.optim.Muon([b], lr=0.02, weight_decay=0.1)
    for step in range(2):
        grad = torch.randn(96, 40, generator=torch.Generator().manual_seed(step + 1))
        a.grad, b.grad = grad.clone(), grad.clone()
        opt_a.step(), opt_b.step()
    assert (a - b).abs().max() < 2e-3 and not torch.equal(a, g)
    assert torch.equal(opt_a.state[a]["momentum_buffer"], opt_b.state[b]["momentum_buffer"])
