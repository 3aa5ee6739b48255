"""Every shipped recipe (src/loopfit/recipes/) goes through the real recipe loader and data pipeline (a typo'd key
fails here), and the GPU recipes carry the paper's settings (docs/papers.md §1, §2, §5)."""

import dataclasses
import re
from pathlib import Path

import pytest
import tiny_models

from loopfit import recipes
from loopfit.convert import plan_layers
from loopfit.data import prepare
from loopfit.train.config import load_recipe
from loopfit.train.schedules import lr_factor, lr_fraction
from loopfit.train.sources import build_source

# the tiny datasets below are repeated many times over a 25k-step recipe: expected here
pytestmark = pytest.mark.filterwarnings("ignore:dataset .* will be repeated")

RECIPES_DIR = Path(__file__).parents[2] / "src" / "loopfit" / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
GPU = {"tinyllama-448": (22, (4, 8, 4), ([0, 1, 2, 3], list(range(10, 18)), [18, 19, 20, 21])),
       "llama32-1b-464": (16, (4, 6, 4), ([0, 1, 2, 3], list(range(6, 12)), [12, 13, 14, 15])),
       "olmo2-1b-464": (16, (4, 6, 4), ([0, 1, 2, 3], list(range(6, 12)), [12, 13, 14, 15]))}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Tiny prepared `general` and `math` datasets (what the recipes' blends name), over 2 x 1024 tokens each."""
    root = tmp_path_factory.mktemp("recipe-data")
    for name, line in (("general", "The river ran past the old mill and the town. "),
                       ("math", "Tom has 3 apples and buys 4 more, so he has 3 + 4 = 7 apples. ")):
        src = root.parent / f"{root.name}-{name}.txt"
        src.write_text(line * 300)
        prepare([f"{name}={src}"], tiny_models.tokenizer(), root, holdout=0.0, progress=False)
    return root


def sched(cfg):
    s = cfg.schedule
    return cfg.train.steps, s.name, s.warmup, s.decay, s.decay_shape, s.floor


def test_recipes_are_found():
    names = {p.stem for p in RECIPES}
    assert (recipes.shipped() == sorted(names)
            and load_recipe("quickstart") == load_recipe(RECIPES_DIR / "quickstart.yaml"))
    assert {*GPU, *(f"{n}-baseline" for n in GPU)} <= names and any(n.startswith("quickstart") for n in names)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_its_data_section_is_valid(path, data_root):
    cfg = load_recipe(path)  # unknown keys raise LoopfitError with a suggestion
    assert cfg.model.init_from and cfg.train.out_dir
    assert cfg.train.batch_size % cfg.train.micro_batch_size == 0
    data = dataclasses.replace(cfg.data, root=str(data_root))
    steps = cfg.train.steps
    source = build_source(data, cfg.train.batch_size, 0, 1, 0, steps, lambda s: lr_fraction(s, *sched(cfg)))
    assert source.sampler.seq_len == cfg.data.seq_len
    # the phases exist in the data and the sampler hands out batches from both ends of the run
    for step in (0, steps - 1):
        assert source.batch(step)["input_ids"].shape == (cfg.train.batch_size, cfg.data.seq_len)


@pytest.mark.parametrize("name", sorted(GPU))
def test_gpu_recipes_carry_the_papers_settings(name):
    path = next(p for p in RECIPES if p.stem == name)
    cfg = load_recipe(path)
    r, o, s = cfg.recurrence, cfg.optim, cfg.schedule
    assert (r.mode, r.mean, r.backprop, r.curriculum, r.curriculum_fraction, r.curriculum_target) == (
        "sample", 32, 8, "1-sqrt", 0.75, "mean")
    assert r.eval_loops == 32 and cfg.data.seq_len == 1024
    assert ((o.name, o.lr, o.adamw_lr, o.weight_decay, o.betas, o.grad_clip)
            == ("muon", 1e-3, 5e-5, 1e-4, [0.9, 0.95], 1.0))
    assert o.eps == 1e-10 and r.depth_per == "micro_batch"  # the authors' AdamW eps and per-micro-batch depth
    assert s.name == "wsd" and s.decay_shape == "cosine" and s.floor == 0.001
    assert 0.0025 <= s.warmup <= 0.005 and 0.6 <= s.decay <= 0.9  # warmup 0.25-0.5%, decay the last 60-90%
    assert cfg.train.precision == "auto"  # bf16 autocast on GPU over fp32 weights
    # the convert command in the header makes the paper's layer choice (docs/papers.md §1 table)
    layers, counts, expected = GPU[name]
    m = re.search(r"--layers (\d+),(\d+),(\d+)", path.read_text())
    assert m and tuple(map(int, m.groups())) == counts
    plan = plan_layers(layers, counts)
    assert (plan.prelude, plan.core, plan.coda) == expected
    # the baseline differs only in the model, the output folder and the (unused) recurrence section
    base = load_recipe(path.with_name(f"{name}-baseline.yaml")).to_dict()
    mine = cfg.to_dict()
    for d in (base, mine):
        d.pop("model"), d.pop("recurrence"), d["train"].pop("out_dir")
    assert base == mine


@pytest.mark.parametrize("name", sorted(GPU))
def test_gpu_blend_switches_at_a_fifth_of_the_lr_after_warmup(name, data_root):
    cfg = load_recipe(next(p for p in RECIPES if p.stem == name))
    steps = cfg.train.steps
    assert lr_factor(0, *sched(cfg)) < 0.2  # the warmup starts below lr_start / 5 ...
    source = build_source(dataclasses.replace(cfg.data, root=str(data_root)), cfg.train.batch_size, 0, 1, 0, steps,
                          lambda s: lr_fraction(s, *sched(cfg)))
    switch = next(s for s in range(steps) if source.sampler.phase_at(s) == 1)
    assert lr_factor(switch, *sched(cfg)) <= 0.2 < lr_factor(switch - 1, *sched(cfg))  # ... but only the decay counts
    assert 0.74 < switch / steps < 0.78  # cosine decay over the last 80%: lr_start / 5 at about 76%


@pytest.mark.parametrize("path", [p for p in RECIPES if "loopfit convert" in p.read_text()], ids=lambda p: p.stem)
def test_the_header_converts_at_the_depth_the_recipe_trains_at(path):
    """A recipe's header command converts with `--recurrence` equal to its recurrence.mean, so the folder's default
    r is the trained one from the start (training's final/ writes it too)."""
    (line,) = [line for line in path.read_text().splitlines() if "loopfit convert" in line]
    depth = re.search(r"--recurrence (\d+)", line)
    assert depth and int(depth.group(1)) == load_recipe(path).recurrence.mean, line
