"""Recipes: a YAML file of sections whose every key has a typed, documented default here, overridable on the command
line as --section.key=value.

Each section is a dataclass. A field's type says how a command-line string is read (int, float, bool, list) and,
as a `Literal`, which values it may take; its `doc` is what `loopfit train --help` prints. Each section checks its
own values and the ones that depend on each other when it is built (`__post_init__` -> `check`), so a recipe that
loads is one the trainer can run; what needs the run itself (the number of ranks, files on disk) is checked by
`Recipe.check_runnable` and the data pipeline. Unknown keys are errors with a suggestion: a typo must never train
silently with a default. A renamed key (RENAMED_KEYS) is still read under its old name for one release, with a
one-line notice on stderr.
"""

import dataclasses
import difflib
import math
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union, get_args, get_origin, get_type_hints

import yaml

from .. import LoopfitError, recipes


def key(default, doc):
    """A recipe key: its default and a one-line description for --help (a list or dict default is copied per use)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def choices(tp):
    """The allowed values of a Literal type (also inside Optional[...]), or None."""
    if get_origin(tp) is Literal:
        return get_args(tp)
    if _is_union(tp):
        for arm in get_args(tp):
            if get_origin(arm) is Literal:
                return get_args(arm)
    return None


class Section:
    """Base of the recipe sections: checks each value against its field's type, then the section's own `check`."""

    def __post_init__(self):
        name = SECTION_NAMES.get(type(self), type(self).__name__)
        for f, tp in _fields(type(self)):
            value = getattr(self, f.name)
            allowed = choices(tp)
            if allowed is not None and value not in allowed and not (value is None and _optional(tp)):
                raise LoopfitError(f"recipe key '{name}.{f.name}' is {value!r}: choose one of {', '.join(allowed)}")
        self.check()

    def check(self):
        """Cross-field checks of this section (raise LoopfitError naming the key and the fix)."""


# --------------------------------------------------------------------------------------------- the sections


@dataclass
class ModelConfig(Section):
    """the starting weights"""

    init_from: str = key("", "a converted loopfit folder, a plain transformers folder (the baseline), or an offline "
                             "model's short name")


@dataclass
class DataConfig(Section):
    """what the trainer reads: exactly one of synthetic, tokens, or prepared data (root + blend, phases or weights)"""

    synthetic: Literal["random", "pattern"] | None = key(None, "synthetic tokens for smoke tests and benchmarks: "
                                                                  "random, or pattern (learnable arithmetic sequences)")
    tokens: str | None = key(None, "one .npy / .pt file of token ids, sampled in windows (the last 5% held out)")
    root: str | None = key(None, "the --out folder of `loopfit prepare`")
    blend: str | dict | None = key(None, "a blend YAML file (or mapping) of `phases` and `datasets`, the keys "
                                                  "data.phases and data.datasets describe")
    phases: list | None = key(None, "inline blend: a list of {name, weights, until} phases; every phase but the "
                                    "last ends at its until: {step: N}, {fraction: F} (of train.steps) or "
                                    "{lr_fraction: X} (once lr <= X * its starting lr)")
    weights: dict | None = key(None, "inline blend of one phase: {DATASET: weight}")
    datasets: dict | None = key(None, "inline blend: {DATASET: folder} where a name is not a folder under root")
    seq_len: int = key(1024, "tokens per training sequence")
    pack: Literal["concat", "docs"] = key("concat", "concat: documents run together | docs: each sequence starts "
                                                    "at a document, EOS-padded")
    eval: str | None = key(None, "the prepared dataset whose 'val' split gives the held-out loss")
    vocab_size: int | None = key(None, "largest token id + 1 (synthetic: default 256; tokens: default from the file)")

    def check(self):
        if self.seq_len < 1:
            raise LoopfitError(f"data.seq_len is {self.seq_len}: it must be >= 1")
        inline = any(v is not None for v in (self.phases, self.weights, self.datasets))
        kinds = [k for k, on in (("data.synthetic", self.synthetic is not None),
                                 ("data.tokens", self.tokens is not None),
                                 ("data.root / data.blend", self.root is not None or self.blend is not None or inline))
                 if on]
        if len(kinds) > 1:
            raise LoopfitError(f"{' and '.join(kinds)} are both set: a recipe reads one kind of data, remove the other")
        if self.kind == "blend" and not self.blend_spec():
            raise LoopfitError("data needs a blend: data.blend: FILE.yaml, or data.weights: {DATASET: 1.0}")
        if self.kind == "blend" and self.vocab_size is not None:
            raise LoopfitError("data.vocab_size is for synthetic or tokens data: prepared data knows its tokenizer, "
                               "remove data.vocab_size")

    @property
    def kind(self):
        """'synthetic', 'tokens', 'blend', or None when the recipe has no data."""
        if self.synthetic is not None:
            return "synthetic"
        if self.tokens is not None:
            return "tokens"
        if any(v is not None for v in (self.root, self.blend, self.phases, self.weights, self.datasets)):
            return "blend"
        return None

    def blend_spec(self):
        """The blend to load: data.blend, or the inline phases / weights / datasets."""
        inline = {k: getattr(self, k) for k in ("phases", "weights", "datasets") if getattr(self, k) is not None}
        return self.blend or inline


@dataclass
class RecurrenceConfig(Section):
    """how many loops each micro-batch runs (docs/papers.md §2)"""

    mode: Literal["sample", "fixed"] = key("sample", "sample: Poisson-lognormal depth per micro-batch | fixed: "
                                                     "exactly `mean` loops")
    mean: int = key(32, "mean recurrence rbar (its maximum when a curriculum ramps it)")
    backprop: int = key(8, "k_max: the last k loops get gradients, earlier ones run under no_grad")
    curriculum: Literal["none", "linear", "1-sqrt"] = key("1-sqrt", "how the curriculum ramps up its target")
    curriculum_fraction: float = key(0.75, "ramp over this fraction of training, then hold")
    curriculum_target: Literal["mean", "backprop", "both"] = key("mean", "what the curriculum ramps")
    eval_loops: int = key(0, "loops r for the held-out loss (0: `mean`)")
    depth_per: Literal["micro_batch", "step"] = key("micro_batch", "micro_batch: a new (n, k) per micro-batch (the "
                                                                   "authors') | step: one per optimizer step")

    def check(self):
        if self.mean < 1 or self.backprop < 1:
            raise LoopfitError("recurrence.mean and recurrence.backprop must be >= 1")
        if self.eval_loops < 0:
            raise LoopfitError(f"recurrence.eval_loops is {self.eval_loops}: use >= 1 loops, or 0 for recurrence.mean")
        if not 0 < self.curriculum_fraction <= 1:
            raise LoopfitError(f"recurrence.curriculum_fraction is {self.curriculum_fraction}: choose a fraction "
                               "in (0, 1]")


@dataclass
class OptimConfig(Section):
    """the optimizers"""

    name: Literal["muon", "adamw"] = key("muon", "muon: Muon for hidden matrices + AdamW for the rest | adamw: AdamW "
                                                 "for everything")
    lr: float = key(1e-3, "Muon lr")
    adamw_lr: float = key(5e-5, "AdamW lr (embeddings, head, norms; everything when name is adamw)")
    weight_decay: float = key(1e-4, "decoupled weight decay of both optimizers")
    betas: list[float] = key([0.9, 0.95], "AdamW betas (beta1, beta2)")
    eps: float = key(1e-8, "AdamW eps")
    muon_momentum: float = key(0.95, "Muon momentum")
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = key("original", "Muon's lr scaling per matrix shape "
                                                                             "(torch.optim.Muon's adjust_lr_fn)")
    grad_clip: float = key(1.0, "clip the global gradient norm to this (0 disables)")

    def check(self):
        for name in ("lr", "adamw_lr", "weight_decay", "eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise LoopfitError(f"optim.{name} is {value}: it must be a finite number >= 0, e.g. "
                                   f"--optim.{name}={OptimConfig.__dataclass_fields__[name].default}")
        if len(self.betas) != 2:
            raise LoopfitError(f"optim.betas is {self.betas}: give two numbers, e.g. --optim.betas=[0.9,0.95]")
        if not all(0 <= b < 1 for b in self.betas):
            raise LoopfitError(f"optim.betas is {self.betas}: each must lie in [0, 1), e.g. --optim.betas=[0.9,0.95]")
        if not 0 <= self.muon_momentum < 1:
            raise LoopfitError(f"optim.muon_momentum is {self.muon_momentum}: it must lie in [0, 1), e.g. 0.95")
        if not self.grad_clip >= 0:
            raise LoopfitError(f"optim.grad_clip is {self.grad_clip}: use a positive norm, or 0 to disable clipping")


CPT_FLOOR, FLOOR = 0.01, 0.001


@dataclass
class ScheduleConfig(Section):
    """the lr schedule (loopfit.train.schedules)"""

    name: Literal["wsd", "cosine", "constant", "cpt"] = key(
        "wsd", "wsd: warmup-stable-decay | cosine | constant | cpt: continued pretraining, cosine from the start lr")
    warmup: float = key(0.005, "warmup: a fraction of the steps if < 1, else a number of steps")
    decay: float = key(0.8, "wsd: the fraction of steps spent decaying")
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = key("cosine", "wsd: the shape of the decay")
    floor: float | None = key(None, f"final lr as a fraction of the start lr (unset: {CPT_FLOOR} for cpt, continued "
                                       f"pretraining decays to lr / 100; {FLOOR} otherwise)")

    def check(self):
        if self.floor is None:  # resolved here, so the recipe written with the run states the value used
            self.floor = CPT_FLOOR if self.name == "cpt" else FLOOR
        if not 0 <= self.floor <= 1:
            raise LoopfitError(f"schedule.floor is {self.floor}: choose a fraction of the start lr in [0, 1]")
        if self.warmup < 0 or not 0 <= self.decay <= 1:
            raise LoopfitError("schedule.warmup must be >= 0 and schedule.decay a fraction in [0, 1]")


@dataclass
class TrainConfig(Section):
    """the run"""

    out_dir: str = key("runs/train", "where checkpoints, metrics and the final model go")
    steps: int = key(1000, "optimizer steps")
    batch_size: int = key(64, "global sequences per optimizer step (all ranks, all micro-batches)")
    micro_batch_size: int = key(4, "sequences per forward pass per rank; the rest is gradient accumulation")
    seed: int = key(0, "seed of the initial state noise, the depth draws and the data order")
    precision: Literal["auto", "fp32", "bf16"] = key("auto", "auto: bf16 autocast on GPU, fp32 on CPU")
    compile: Literal["auto", "true", "false"] = key("auto", "torch.compile each transformer block (auto: on CUDA)")
    activation_checkpointing: Literal["none", "core", "all"] = key("none", "recompute these blocks' activations in "
                                                                           "the backward")
    on_nonfinite: Literal["stop", "skip"] = key("stop", "stop: checkpoint the last good state and exit with a message "
                                                        "| skip: drop the step")
    log_every: int = key(1, "write metrics every N steps")
    eval_every: int = key(0, "held-out loss every N steps (0: only at the end, if the data has a held-out set)")
    eval_batches: int = key(4, "batches of the held-out loss")
    peak_flops: float = key(0.0, "FLOP/s for MFU (0: the datasheet for known GPUs, a measured matmul on CPU)")
    tensorboard: bool = key(True, "also write TensorBoard logs to out_dir/tb (with tensorboard in train.loggers)")
    loggers: list[str] = key(["jsonl", "csv", "tensorboard"], "where metrics go: jsonl and csv (always written), "
                             "tensorboard, wandb, mlflow, trackio (each an extra: pip install 'loopfit[wandb]'); "
                             "e.g. --train.loggers=[jsonl,csv,wandb]")
    progress: bool = key(True, "show a progress bar")
    trainable: str = key("all", "which parameters train: all, adapter, core, adapter+core, lora (a set per phase: "
                                "adapter:0.1,all = the adapter alone for the first 10% of steps, then all; a phase "
                                "ends at a fraction of the steps if < 1, else at a step)")

    def check(self):
        if self.steps < 1 or self.batch_size < 1 or self.micro_batch_size < 1:
            raise LoopfitError("train.steps, train.batch_size and train.micro_batch_size must be >= 1")
        from .trainable import parse_phases

        parse_phases(self.trainable, self.steps)  # raises naming the bad part
        if self.log_every < 1 or self.eval_every < 0 or self.eval_batches < 1:
            raise LoopfitError("train.log_every and train.eval_batches must be >= 1, train.eval_every >= 0")
        from .trackers import check_loggers

        check_loggers(self.loggers)
        self.check_world(1)

    def check_world(self, world):
        """The global batch splits into micro-batches on `world` ranks."""
        per_step = self.micro_batch_size * world
        if self.batch_size % per_step:
            raise LoopfitError(
                f"train.batch_size {self.batch_size} is not divisible by micro_batch_size {self.micro_batch_size} x "
                f"{world} rank(s) = {per_step}: choose a batch size that is a multiple of {per_step}")

    def accumulation(self, world):
        """Micro-batches per rank per optimizer step."""
        return self.batch_size // (self.micro_batch_size * world)


@dataclass
class CheckpointConfig(Section):
    """checkpoints in out_dir/checkpoints"""

    every: int = key(500, "steps between checkpoints (0: only at the end and on a signal)")
    keep: int = key(3, "keep the last K checkpoints")

    def check(self):
        if self.every < 0 or self.keep < 1:
            raise LoopfitError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")


@dataclass
class DistributedConfig(Section):
    """multi-GPU runs (used only under torchrun)"""

    strategy: Literal["ddp", "fsdp"] = key("ddp", "ddp: replicate the model | fsdp: FSDP2 fully_shard per block")


@dataclass
class DistillConfig(Section):
    """distillation from a teacher model (loopfit.train.distill); off when `teacher` is empty"""

    teacher: str = key("", "base: the model model.init_from was converted from | a model folder, GGUF file or offline "
                           "short name with the student's tokenizer | empty: off (cross-entropy only)")
    alpha: float = key(0.5, "loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher || student); 0: pure distillation")
    temperature: float = key(1.0, "T: both distributions are softened by T in the KL term")

    def check(self):
        if not 0 <= self.alpha <= 1:
            raise LoopfitError(f"distill.alpha is {self.alpha}: choose a weight in [0, 1] (1: cross-entropy only)")
        if not self.temperature > 0:
            raise LoopfitError(f"distill.temperature is {self.temperature}: use a temperature > 0 (1: unchanged)")

    @property
    def enabled(self):
        return bool(self.teacher)


@dataclass
class LoraConfig(Section):
    """LoRA on the core's linear layers, shared by every loop or one per loop (loopfit.train.lora); off at rank 0"""

    rank: int = key(0, "rank of each low-rank delta (0: no LoRA); train only it with train.trainable=lora")
    alpha: float = key(16.0, "the delta is scaled by alpha / rank")
    targets: list[str] = key(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                             "which linear layers of the core blocks get a delta")
    lr: float = key(1e-4, "AdamW lr of the LoRA factors (Muon does not train them, see loopfit.train.lora)")
    per_loop: bool = key(False, "a different delta for each loop (relaxed recursion), kept in the model, not merged")
    loops: int = key(0, "per_loop: how many loops get a delta (0: recurrence.mean); later loops run the shared weight")
    init: Literal["zero", "svd"] = key("zero", "per_loop: zero (B = 0) | svd: loop t starts at the truncated SVD of "
                                               "the base layer it stands for minus the core layer")

    def check(self):
        if self.rank < 0:
            raise LoopfitError(f"lora.rank is {self.rank}: use a rank >= 1, or 0 for no LoRA")
        if self.loops < 0:
            raise LoopfitError(f"lora.loops is {self.loops}: use >= 1 loops, or 0 for recurrence.mean")
        if self.rank and not self.alpha > 0:
            raise LoopfitError(f"lora.alpha is {self.alpha}: use a positive scale (the delta is alpha / rank x BA)")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    recurrence: RecurrenceConfig = field(default_factory=RecurrenceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def to_dict(self):
        """Every key with its value; the data section without its unset keys (a recipe that loads back the same)."""
        d = dataclasses.asdict(self)
        d["data"] = {k: v for k, v in d["data"].items() if v is not None}
        return d

    def check_runnable(self, world=1):
        """What a training run needs beyond a valid recipe: a model, data, and a batch that splits over the ranks."""
        from ..assets import OFFLINE_MODELS

        if not self.model.init_from:
            raise LoopfitError("no model: set model.init_from to a converted loopfit folder, a transformers model "
                               f"folder or an offline model ({', '.join(OFFLINE_MODELS)})")
        if self.data.kind is None:
            raise LoopfitError("the recipe has no data: set data.root and data.blend (from `loopfit prepare`), or "
                               "data.synthetic / data.tokens (see the recipes shipped in loopfit/recipes/)")
        self.train.check_world(world)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Recipe)}
SECTION_NAMES = {cls: name for name, cls in SECTIONS.items()}
RENAMED_KEYS = {"recurrence.eval_steps": "recurrence.eval_loops"}  # old name -> new, read for one release
_NOTIFIED = set()  # renamed keys already announced in this process


def _fields(cls):
    hints = get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _is_union(tp):
    return get_origin(tp) in (Union, types.UnionType)


def _optional(tp):
    return _is_union(tp) and type(None) in get_args(tp)


# --------------------------------------------------------------------------------------------- reading values


def _type_name(tp):
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if get_origin(tp) is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return {list: "a list", dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(name, value, tp):
    """`value` (from YAML or a command-line string) as the field type `tp` says, or a one-line error."""
    origin, args = get_origin(tp), get_args(tp)
    if _is_union(tp):  # X | None, or blend's str-or-mapping
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        return _coerce(name, value, dict if isinstance(value, dict) and dict in arms else arms[0])
    if origin is Literal:
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if text not in args:
            raise LoopfitError(f"recipe key '{name}' is {value!r}: choose one of {', '.join(args)}")
        return text
    try:
        if tp is bool:
            if isinstance(value, str):
                value = {"true": True, "false": False, "1": True, "0": False}[value.lower()]
            if not isinstance(value, (bool, int)):
                raise TypeError
            return bool(value)
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            return "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        if origin is list or tp is list:
            items = list(value) if isinstance(value, (list, tuple)) else str(value).split(",")
            return [args[0](v) for v in items] if args else items
        if tp is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
    except (ValueError, TypeError, KeyError):
        raise LoopfitError(f"recipe key '{name}' expects {_type_name(tp)}, got {value!r}") from None
    raise TypeError(f"recipe field type {tp} has no reader")  # a programming error, not a user's


def all_keys():
    """Every dotted key a recipe may set, e.g. 'optim.lr'."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown(name):
    from .trackers import LOGGERS

    close = difflib.get_close_matches(name, all_keys() + list(SECTIONS), n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else "see `loopfit train --help` for the recipe keys"
    leaf = name.rpartition(".")[2]
    if leaf in LOGGERS:
        hint = f"trackers are listed in train.loggers, e.g. --train.loggers=[jsonl,csv,tensorboard,{leaf}]"
    return LoopfitError(f"unknown recipe key '{name}': {hint}")


def _put(raw, dotted, value):
    """Set SECTION.KEY[.SUBKEY...] in the nested dict of raw values; a subkey goes inside a mapping-valued key."""
    section, _, rest = dotted.partition(".")
    if section not in SECTIONS:
        raise _unknown(dotted)
    node = raw.setdefault(section, {})
    *parents, leaf = rest.split(".")
    if parents and parents[0] not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
        raise _unknown(f"{section}.{parents[0]}")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[leaf] = value


def _renamed(pairs, where):
    """(dotted key, value) pairs with deprecated keys under their new names (one stderr line per old key and
    process). An old and a new name set to different values in the same place (`where`) are refused."""
    given = dict(pairs)
    for old, new in RENAMED_KEYS.items():
        if old in given and new in given and given[old] != given[new]:
            raise LoopfitError(f"{where} sets both {old} ({given[old]!r}) and {new} ({given[new]!r}): {old} is the "
                               f"deprecated name of {new}; keep only {new}")
        if old in given and old not in _NOTIFIED:
            _NOTIFIED.add(old)
            print(f"loopfit: recipe key {old} is deprecated, use {new} (removed in the next release)",
                  file=sys.stderr)
    return [(RENAMED_KEYS.get(name, name), value) for name, value in pairs]


def _build(section, values):
    cls = SECTIONS[section]
    kwargs = {}
    for f, tp in _fields(cls):
        if f.name in values:
            kwargs[f.name] = _coerce(f"{section}.{f.name}", values.pop(f.name), tp)
    if values:
        raise _unknown(f"{section}.{sorted(values)[0]}")
    return cls(**kwargs)


def parse_override(text):
    """'--optim.lr=3e-4' or 'optim.lr=3e-4' -> ('optim.lr', 0.0003)."""
    body = text[2:] if text.startswith("--") else text
    name, eq, raw = body.partition("=")
    if not eq or "." not in name:
        raise LoopfitError(f"override {text!r} must look like --section.key=value (e.g. --optim.lr=3e-4)")
    return name, yaml.safe_load(raw) if raw else ""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            name = self.construct_object(key_node, deep=deep)
            if name in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {name!r} is given twice (line {key_node.start_mark.line + 1}): keep one",
                    key_node.start_mark)
            seen.add(name)
        return super().construct_mapping(node, deep=deep)


def load_recipe(source=None, overrides=()):
    """Recipe from a YAML path or dict (or defaults), then `overrides`: strings like '--train.steps=10', pairs, or
    a mapping ({'train.steps': 10} or {'train': {'steps': 10}})."""
    if isinstance(source, (str, Path)):
        path = recipes.resolve(source)
        if not path.is_file():
            raise LoopfitError(f"recipe {path} not found: pass a YAML file or a shipped recipe "
                               f"({', '.join(recipes.shipped())})")
        try:
            data = yaml.load(path.read_text(), Loader=UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise LoopfitError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    else:
        data = dict(source or {})
    if not isinstance(data, dict):
        raise LoopfitError("a recipe must be a mapping of sections (model, data, recurrence, optim, ...)")
    raw = {}
    for section, values in data.items():
        if section not in SECTIONS:  # a misspelt section: suggest with its first key, 'recurrence.mean'
            raise _unknown(f"{section}.{next(iter(values))}" if isinstance(values, dict) and values else str(section))
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise LoopfitError(f"recipe section '{section}' must be a mapping of keys")
        pairs = _renamed([(f"{section}.{k}", v) for k, v in values.items()], "the recipe")
        raw[section] = {name.partition(".")[2]: v for name, v in pairs}
    if isinstance(overrides, dict):  # {"train.steps": 10} or {"train": {"steps": 10}}
        nested = all(isinstance(v, dict) and "." not in k for k, v in overrides.items())
        overrides = ([(f"{k}.{sub}", value) for k, v in overrides.items() for sub, value in v.items()] if nested
                     else list(overrides.items()))
    pairs = [parse_override(item) if isinstance(item, str) else tuple(item) for item in overrides]
    for name, value in _renamed(pairs, "the command line"):
        _put(raw, name, value)
    return Recipe(**{section: _build(section, raw.get(section, {})) for section in SECTIONS})


def data_config(data):
    """A DataConfig from a DataConfig or a dict of data keys (checked like a recipe's data section)."""
    return data if isinstance(data, DataConfig) else _build("data", dict(data or {}))


# --------------------------------------------------------------------------------------------- --help


def describe_keys():
    """The recipe keys for --help, grouped by section: key, default, choices and what it does."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"\n{section}: {cls.__doc__.strip()}")
        for f, tp in _fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            allowed = choices(tp)
            shown = "unset" if default is None else repr(default)
            what = f.metadata["doc"] + (f" [{' | '.join(allowed)}]" if allowed else "")
            lines.append(f"  {section}.{f.name} = {shown}\n      {what}")
    lines.append("\nrenamed (the old name is still read, with a notice, until the next release):")
    lines += [f"  {old} -> {new}" for old, new in RENAMED_KEYS.items()]
    return "\n".join(lines)
