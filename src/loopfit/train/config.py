"""Recipes: a YAML file of sections whose every key has a default here, overridable as --section.key=value.

Unknown keys are errors with a suggestion (a typo must never train silently with a default). The `data`
section is passed as-is to the data pipeline, which checks its own keys.
"""

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import LoopfitError, recipes


@dataclass
class ModelConfig:
    init_from: str = ""            # a converted loopfit folder, a plain transformers folder, or an offline short name


@dataclass
class RecurrenceConfig:
    mode: str = "sample"           # sample: Poisson-lognormal depth per step | fixed: exactly `mean` loops
    mean: int = 32                 # mean recurrence rbar (its maximum when a curriculum ramps it)
    backprop: int = 8              # k_max: the last k loops get gradients, earlier ones run under no_grad
    curriculum: str = "1-sqrt"     # none | linear | 1-sqrt
    curriculum_fraction: float = 0.75  # ramp over this fraction of training, then hold
    curriculum_target: str = "mean"    # mean | backprop | both
    eval_steps: int = 0            # loops for held-out loss (0: `mean`)
    depth_per: str = "micro_batch"     # micro_batch: a new (n, k) per micro-batch (the authors') | step: one per step


@dataclass
class OptimConfig:
    name: str = "muon"             # muon (Muon for hidden matrices + AdamW for the rest) | adamw
    lr: float = 1e-3               # Muon lr
    adamw_lr: float = 5e-5         # AdamW lr (embeddings, head, norms; everything when name is adamw)
    weight_decay: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    muon_momentum: float = 0.95
    muon_adjust_lr: str = "original"   # original | match_rms_adamw (torch.optim.Muon's adjust_lr_fn)
    grad_clip: float = 1.0         # 0 disables


@dataclass
class ScheduleConfig:
    name: str = "wsd"              # wsd | cosine | constant | cpt
    warmup: float = 0.005          # fraction of steps if < 1, else steps
    decay: float = 0.8             # wsd: fraction of steps spent decaying
    decay_shape: str = "cosine"    # linear | cosine | 1-sqrt
    floor: float = 0.001           # final lr as a fraction of the start lr (cpt: 0.01)


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    steps: int = 1000
    batch_size: int = 64           # global sequences per optimizer step (all ranks, all micro-batches)
    micro_batch_size: int = 4      # sequences per forward pass per rank; the rest is gradient accumulation
    seed: int = 0
    precision: str = "auto"        # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    compile: str = "auto"          # auto (on CUDA) | true | false: torch.compile each transformer block
    activation_checkpointing: str = "none"  # none | core | all: recompute these blocks in the backward
    on_nonfinite: str = "stop"     # stop (checkpoint last good state, exit with a message) | skip (drop the step)
    log_every: int = 1
    eval_every: int = 0            # held-out loss every N steps (0: only at the end if the data has a held-out set)
    eval_batches: int = 4
    peak_flops: float = 0.0        # FLOP/s for MFU (0: datasheet for known GPUs, measured matmul on CPU)
    tensorboard: bool = True
    progress: bool = True


@dataclass
class CheckpointConfig:
    every: int = 500               # steps between checkpoints (0: only at the end and on a signal)
    keep: int = 3                  # keep the last K checkpoints


@dataclass
class DistributedConfig:
    strategy: str = "ddp"          # ddp | fsdp (FSDP2 fully_shard per block); used only under torchrun


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: dict = field(default_factory=dict)
    recurrence: RecurrenceConfig = field(default_factory=RecurrenceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self):
        return dataclasses.asdict(self)


CHOICES = {
    "recurrence.mode": ("sample", "fixed"),
    "recurrence.curriculum": ("none", "linear", "1-sqrt"),
    "recurrence.curriculum_target": ("mean", "backprop", "both"),
    "optim.name": ("muon", "adamw"),
    "optim.muon_adjust_lr": ("original", "match_rms_adamw"),
    "schedule.name": ("wsd", "cosine", "constant", "cpt"),
    "schedule.decay_shape": ("linear", "cosine", "1-sqrt"),
    "recurrence.depth_per": ("micro_batch", "step"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.compile": ("auto", "true", "false"),
    "train.activation_checkpointing": ("none", "core", "all"),
    "train.on_nonfinite": ("stop", "skip"),
    "distributed.strategy": ("ddp", "fsdp"),
}


def all_keys():
    """Every dotted key a recipe may set, e.g. 'optim.lr' (the data section's keys belong to the data pipeline)."""
    keys = []
    for section in dataclasses.fields(Recipe):
        if section.name == "data":
            continue
        keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(section.default_factory())]
    return keys


def _unknown(key):
    close = difflib.get_close_matches(key, all_keys() + [s.name for s in dataclasses.fields(Recipe)], n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else "see `loopfit train --help` for the recipe keys"
    return LoopfitError(f"unknown recipe key '{key}': {hint}")


def _coerce(key, value, default):
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                value = {"true": True, "false": False, "1": True, "0": False}[value.lower()]
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, list):
            return list(value) if isinstance(value, (list, tuple)) else [float(v) for v in str(value).split(",")]
        if isinstance(default, str):
            value = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    except (ValueError, TypeError, KeyError):
        raise LoopfitError(f"recipe key '{key}' expects {type(default).__name__}, got {value!r}") from None
    if key in CHOICES and value not in CHOICES[key]:
        raise LoopfitError(f"recipe key '{key}' is {value!r}: choose one of {', '.join(CHOICES[key])}")
    return value


def _set(recipe, key, value):
    section, _, name = key.partition(".")
    if section == "data" and name:
        node = recipe.data
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
        return
    if section == "data":
        if not isinstance(value, dict):
            raise LoopfitError("recipe section 'data' must be a mapping")
        recipe.data = dict(value)
        return
    if not name or not hasattr(recipe, section) or not hasattr(getattr(recipe, section), name):
        raise _unknown(key)
    obj = getattr(recipe, section)
    setattr(obj, name, _coerce(key, value, getattr(obj, name)))


def parse_override(text):
    """'--optim.lr=3e-4' or 'optim.lr=3e-4' -> ('optim.lr', 0.0003)."""
    body = text[2:] if text.startswith("--") else text
    key, eq, raw = body.partition("=")
    if not eq or "." not in key:
        raise LoopfitError(f"override {text!r} must look like --section.key=value (e.g. --optim.lr=3e-4)")
    return key, yaml.safe_load(raw) if raw else ""


def load_recipe(source=None, overrides=()):
    """Recipe from a YAML path or dict (or defaults), then `overrides`: strings like '--train.steps=10' or pairs."""
    recipe = Recipe()
    if isinstance(source, (str, Path)):
        path = recipes.resolve(source)
        if not path.is_file():
            raise LoopfitError(f"recipe {path} not found: pass a YAML file or a shipped recipe ({', '.join(recipes.shipped())})")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise LoopfitError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    else:
        data = dict(source or {})
    if not isinstance(data, dict):
        raise LoopfitError("a recipe must be a mapping of sections (model, data, recurrence, optim, ...)")
    for section, values in data.items():
        if section == "data":
            _set(recipe, "data", values or {})
        elif not isinstance(values, dict):
            raise _unknown(section) if not hasattr(recipe, section) else LoopfitError(
                f"recipe section '{section}' must be a mapping of keys")
        else:
            for name, value in values.items():
                _set(recipe, f"{section}.{name}", value)
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        _set(recipe, key, value)
    return recipe


def describe_keys():
    """One line per recipe key with its default, for --help."""
    lines = []
    for section in dataclasses.fields(Recipe):
        if section.name == "data":
            lines.append("  data.*                       passed to the data pipeline (see `loopfit prepare --help`)")
            continue
        for f in dataclasses.fields(section.default_factory()):
            default = getattr(section.default_factory(), f.name)
            lines.append(f"  {section.name}.{f.name:<{27 - len(section.name)}} {default!r}")
    return "\n".join(lines)
