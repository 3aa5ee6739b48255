"""The training loop behind `loopfit train` (its user's view, the command line, is loopfit.train.command):
`train(recipe, overrides, resume=...)` builds the run from a typed recipe, steps it, checkpoints it and writes
final/."""

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .. import LoopfitError, __version__
from ..io import atomic_dir, atomic_file, check_writable, folder_lock
from ..loading import OFFLINE_MODELS, from_pretrained, is_recurrent, offline_folder
from ..model import causal_lm_loss
from . import checkpoint, distributed, lora, trainable
from .config import load_recipe
from .distill import (
    Teacher,
    check_teacher,
    final_norm,
    linear_distill,
    load_teacher,
    run_to_hidden,
    softcap_of,
    teacher_source,
)
from .flops import param_counts, peak_flops, train_flops
from .optim import build_optimizers, remember_base_lr, set_lr
from .performance import compile_blocks, compile_wanted, set_activation_checkpointing
from .recurrence import depth_for_step
from .schedules import lr_factor, lr_fraction
from .sources import build_source

# --------------------------------------------------------------------------------------------- helpers


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and stops after the current step."""

    def __init__(self):
        self.name, self._old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, without a checkpoint
        self.name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _say(d, msg):
    if d.main:
        from tqdm import tqdm

        tqdm.write(f"loopfit train: {msg}", file=sys.stderr)


def _resolve_model(cfg, d):
    """model.init_from as a model folder: an offline short name becomes its fp32 folder (dequantized once)."""
    if cfg.model.init_from in OFFLINE_MODELS:
        if d.main:
            offline_folder(cfg.model.init_from)
        distributed.barrier()
        cfg.model.init_from = str(offline_folder(cfg.model.init_from))
    if not Path(cfg.model.init_from).is_dir() or not (Path(cfg.model.init_from) / "config.json").is_file():
        raise LoopfitError(f"model.init_from {cfg.model.init_from} is not a model folder with a config.json: "
                           "convert one with `loopfit convert` or point to a saved transformers model")


def _check_teacher(cfg, d):
    """The teacher's source (checked against the student's vocabulary and tokenizer), or None without one."""
    if not cfg.distill.enabled:
        return None
    from transformers import AutoConfig

    name = teacher_source(cfg.distill.teacher, cfg.model.init_from)
    vocab = AutoConfig.from_pretrained(cfg.model.init_from).get_text_config().vocab_size
    check_teacher(name, cfg.model.init_from, vocab)
    if name in OFFLINE_MODELS:  # its fp32 folder, dequantized once by one rank
        if d.main:
            offline_folder(name)
        distributed.barrier()
    return name


def _skeleton(folder):
    """The model of `folder` on the meta device: its parameter names and shapes, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))


def _load_model(cfg):
    return from_pretrained(cfg.model.init_from, torch.float32, what="model.init_from")


def _check_data(source, model):
    """Refuse data whose token ids do not fit the model's vocabulary (a different tokenizer)."""
    vocab = model.get_input_embeddings().num_embeddings
    data_vocab = getattr(source, "vocab_size", None)
    if data_vocab is not None and data_vocab > vocab:
        raise LoopfitError(
            f"the data has token ids up to {data_vocab - 1} but the model's vocabulary has {vocab} entries: the data "
            "was tokenized with another tokenizer; prepare it again with the model's tokenizer")
    if hasattr(source, "check_tokenizer"):  # prepared data knows its tokenizer and raises on a mismatch
        source.check_tokenizer(model.config.name_or_path)


def _model_card(run):
    """final/README.md: what this training did (base, conversion, recipe, tokens, FLOPs, held-out loss, r)."""
    cfg, inner = run.cfg, distributed.unwrap(run.model)
    config = inner.config
    src = getattr(config, "source_layers", None) or {}
    base = getattr(config, "base_model_type", None) or getattr(config, "model_type", "?")
    lines = ["---", "library_name: transformers", "tags: [loopfit" + (", depth-recurrence" if run.recurrent else "")
             + "]", "---", "", f"# {Path(cfg.train.out_dir).name}: trained by loopfit {__version__}", ""]
    if run.recurrent:
        lines += [f"A depth-recurrent model converted from a {base} model with {src.get('num_base_layers', '?')} "
                  f"layers (prelude {config.num_prelude_layers}, core {config.num_core_layers} looped, coda "
                  f"{config.num_coda_layers}), then trained from `{cfg.model.init_from}`. Default loops r = "
                  f"{config.mean_recurrence}; trained at mean r = {cfg.recurrence.mean} ({cfg.recurrence.mode}, "
                  f"backprop through the last {cfg.recurrence.backprop} loops, {cfg.recurrence.curriculum} "
                  "curriculum).", ""]
    else:
        lines += [f"A plain {base} model (the baseline), trained from `{cfg.model.init_from}`.", ""]
    head = "tied to the input embeddings" if getattr(config, "tie_word_embeddings", False) else "its own matrix"
    data = {k: v for k, v in cfg.to_dict()["data"].items() if v is not None}
    lines += [
        "| | |", "|---|---|",
        f"| steps | {run.cfg.train.steps} of {cfg.train.batch_size} sequences of {cfg.data.seq_len} tokens |",
        f"| tokens | {run.tokens:,} |",
        f"| FLOPs | {run.flops:.3g} (the paper's count), {run.flops_full:.3g} (full) |",
        f"| final training loss | {run.loss:.4f} |",
        f"| held-out loss | {'n/a' if run.eval_loss is None else f'{run.eval_loss:.4f}'}"
        + (f" at r = {cfg.recurrence.eval_loops or cfg.recurrence.mean}" if run.recurrent else "") + " |",
        f"| optimizer | {cfg.optim.name} (lr {cfg.optim.lr:g}, AdamW lr {cfg.optim.adamw_lr:g}), schedule "
        f"{cfg.schedule.name} |",
        f"| data | {json.dumps(data)} |", f"| output head | {head} |", "",
        "The full recipe is `recipe.yaml` in the run folder; metrics are in `metrics.jsonl`.", "",
    ]
    return "\n".join(lines)


def _export_final(out_dir, model, cfg, d, card=None):
    """OUT/final: a folder from_pretrained loads (weights, config, the tokenizer files of init_from) with a model
    card of this training (`card`) in place of the one init_from carried."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if cfg.lora.rank and not cfg.lora.per_loop:  # a delta shared by every loop is part of the weights
        sd = lora.merged_state_dict(sd, cfg.lora)
    dest = Path(out_dir) / "final"
    if d.main:
        inner = distributed.unwrap(model)
        if is_recurrent(inner):  # the loopfit that wrote the folder: a newer one's folder is refused by an older
            inner.config.loopfit_version = __version__
            # the depth it was trained for (the curriculum's end), not the one `convert` gave it: `generate`
            # without --loops, eval's train_mean_recurrence and its plot read this
            inner.config.mean_recurrence = cfg.recurrence.mean
        with atomic_dir(dest, force=True) as tmp:
            inner.save_pretrained(tmp, state_dict=sd)
            src = Path(cfg.model.init_from)
            for f in src.iterdir():
                if f.is_file() and f.suffix not in (".safetensors", ".bin", ".pt") and f.name not in (
                        "config.json", "model.safetensors.index.json") and not (tmp / f.name).exists():
                    (tmp / f.name).write_bytes(f.read_bytes())
            if card is not None:
                (tmp / "README.md").write_text(card)
    distributed.barrier()
    return dest


def _eval_loss(run):
    """Mean held-out next-token loss at a fixed number of loops (recurrence.eval_loops, default its mean)."""
    cfg, d, model = run.cfg, run.d, run.model
    if not hasattr(run.source, "eval_batches"):
        return None
    r = cfg.recurrence.eval_loops or cfg.recurrence.mean
    kwargs = {"num_steps": r} if run.recurrent else {}
    batches = list(run.source.eval_batches(cfg.train.eval_batches))
    # every rank runs as many forwards as the busiest one: DDP and FSDP forwards are collectives, and ranks may
    # hold unequal numbers of held-out batches (round-robin over a small split); the extra ones count nothing
    (most,) = distributed.all_max([len(batches)], d.device)
    model.eval()
    total = count = 0.0
    with torch.no_grad(), run.autocast():
        for i in range(int(most)):
            b = batches[i] if i < len(batches) else None
            ids = b["input_ids"] if b is not None else torch.zeros((1, 2), dtype=torch.long)
            labels = b.get("labels", b["input_ids"]) if b is not None else ids
            loss = _loss_sum(model, ids.to(d.device), labels.to(d.device), run.recurrent, kwargs).item()
            if b is not None:
                total += loss
                count += (labels[:, 1:] != -100).sum().item()
    model.train()
    total, count = distributed.all_sum([total, count], d.device)
    return total / max(count, 1.0)


def _distill_sum(run, ids, labels, kwargs):
    """(loss, ce, kl) of one micro-batch, each summed over its tokens: distillation from the run's teacher."""
    t_hidden, t_weight = run.teacher.hidden(ids, run.autocast())
    hidden, out = run_to_hidden(run.model, run.student_norm, input_ids=ids, **kwargs)
    inner = distributed.unwrap(run.model)
    loss, ce, kl = linear_distill(hidden, inner.get_output_embeddings().weight, t_hidden, t_weight, labels,
                                  run.cfg.distill.alpha, run.cfg.distill.temperature, 1.0, softcap_of(inner),
                                  run.teacher.softcap)
    run.teacher.release()
    # 0 x the last position's logits: the loss then depends on the forward's output, as DDP / FSDP2 hooks expect
    return loss + 0.0 * out.logits.float().sum(), ce, kl


def _loss_sum(model, ids, labels, recurrent, kwargs):
    """Summed next-token cross-entropy; a loopfit model computes it without materialising the full logits."""
    if recurrent:
        return model(input_ids=ids, labels=labels, num_items_in_batch=1.0, return_logits=False, use_cache=False,
                     **kwargs).loss
    return causal_lm_loss(model(input_ids=ids, use_cache=False, **kwargs).logits, labels, num_items_in_batch=1.0)


def _grad_norm(model, clip):
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _mean(values):
    """Mean of the step's micro-batch depths: an int when they agree (always with recurrence.depth_per=step)."""
    return values[0] if len(set(values)) == 1 else round(sum(values) / len(values), 3)


# --------------------------------------------------------------------------------------------- the run


def train(recipe=None, overrides=(), resume=None, data=None):
    """Run a recipe (YAML path, dict, or None for defaults) with overrides: CLI strings like '--train.steps=10',
    or a mapping ({'train.steps': 10} or {'train': {'steps': 10}}).

    resume: None (start from model.init_from), 'latest' (newest intact checkpoint in out_dir) or a checkpoint
    folder. data: a data source object (see loopfit.train.sources) instead of the recipe's data section.
    Returns a summary dict: step, loss, eval_loss, tokens, flops, out_dir, final, stopped.
    """
    cfg = load_recipe(recipe, overrides)
    started = not torch.distributed.is_initialized()
    d = distributed.setup()
    try:
        result = _train(cfg, d, resume, data)
        if started:
            distributed.barrier()  # no rank leaves the group while another still works: gloo aborts early leavers
        return result
    finally:
        if started:
            distributed.teardown()


def _start_state(cfg, d, resume, out_dir):
    """Checkpoint path to resume from (or None), after the explicit start/resume checks."""
    if d.main and checkpoint.remove_partial(out_dir):
        _say(d, "removed the temporary files of an interrupted write")
    existing = checkpoint.list_checkpoints(out_dir)
    if resume is None:
        if existing:
            raise LoopfitError(
                f"{out_dir} already holds a run (checkpoint at step {existing[0][0]}): continue it with --resume, "
                "or choose another --train.out_dir")
        return None
    if resume != "latest":
        path = Path(resume)
        reason = checkpoint.verify(path) if path.is_dir() else "not a folder"
        if reason:
            raise LoopfitError(f"cannot resume from {path}: {reason}")
        return path
    path, skipped = checkpoint.latest_good(out_dir)
    for msg in skipped:
        _say(d, msg)
    if path is None:
        raise LoopfitError(f"nothing to resume in {out_dir}: no intact checkpoint there; start without --resume")
    return path


def _schedule(cfg):
    """(lr_at, blend_lr_at): the lr multiplier at a step, and what an lr-triggered blend switch reads (1 in warmup)."""
    s, total = cfg.schedule, cfg.train.steps
    args = (s.name, s.warmup, s.decay, s.decay_shape, s.floor)
    return (lambda step: lr_factor(step, total, *args)), (lambda step: lr_fraction(step, total, *args))


SCHEDULE_KEYS = ("optim.lr", "optim.adamw_lr", "train.steps", "schedule.name", "schedule.warmup", "schedule.decay",
                 "schedule.decay_shape", "schedule.floor")


def _resume_changes(ckpt_path, cfg, step):
    """One line naming the lr and schedule keys that differ from the checkpoint's recipe, and the lr at `step`
    before and after (None if nothing that moves the lr changed)."""

    try:
        saved = json.loads((Path(ckpt_path) / "trainer.json").read_text()).get("recipe") or {}
    except (OSError, ValueError):
        return None
    now = cfg.to_dict()

    def value(recipe, dotted):
        section, _, name = dotted.partition(".")
        return (recipe.get(section) or {}).get(name)

    changed = [k for k in SCHEDULE_KEYS if value(saved, k) is not None and value(saved, k) != value(now, k)]
    if not changed:
        return None

    def lr(recipe, which):
        s = recipe["schedule"]
        factor = lr_factor(step, recipe["train"]["steps"], s["name"], s["warmup"], s["decay"], s["decay_shape"],
                           s["floor"])
        base = recipe["optim"]["adamw_lr" if which == "adamw" or recipe["optim"]["name"] == "adamw" else "lr"]
        return base * factor

    which = "adamw" if now["optim"]["name"] == "adamw" else "muon"
    try:
        before, after = lr(saved, which), lr(now, which)
    except (KeyError, TypeError, ValueError):
        before = after = None
    moves = "" if before is None else f"; the {which} lr at step {step + 1} is {after:.3g} (it was {before:.3g})"
    return ("resuming with a changed schedule: " + ", ".join(f"{k} {value(saved, k)} -> {value(now, k)}"
                                                             for k in changed) + moves)


def _depths(cfg, step, accum, recurrent):
    """(n, k, rbar) of each micro-batch of `step`: one draw per micro-batch, or one per step (depth_per=step)."""
    if not recurrent:
        return [(0, 1, 0)] * accum
    per_micro = cfg.recurrence.depth_per == "micro_batch"
    return [depth_for_step(step, cfg.train.steps, cfg.recurrence, cfg.train.seed, i if per_micro else None)[:3]
            for i in range(accum)]


@dataclass
class _Run:
    """What the steps of a run share: set up once by `_setup`, advanced by `_step`, closed by `_finish`."""

    cfg: object
    d: object
    out_dir: Path
    model: object
    recurrent: bool
    counts: dict
    source: object
    optimizers: list
    metrics: object
    peak: float
    bf16: bool
    accum: int
    lr_at: object
    blend_lr_at: object
    teacher: object = None  # distill.teacher loaded (loopfit.train.distill.Teacher), or None
    student_norm: object = None  # where distillation reads the student's final hidden states
    phases: list = None  # train.trainable: [(set, end step)]
    phase: str = "all"  # the set that trains now
    bar: object = None
    start: int = 0
    tokens: int = 0
    flops: float = 0.0
    flops_full: float = 0.0
    flops_teacher: float = 0.0
    last_saved: int = -1  # the step of the newest checkpoint this run holds
    loss: float = math.nan
    eval_loss: float = None
    skipped: int = 0  # steps dropped by train.on_nonfinite=skip in this process

    def autocast(self):
        return torch.autocast(self.d.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def save(self, step):
        state = {"step": step, "tokens": self.tokens, "flops": self.flops, "flops_full": self.flops_full,
                 "flops_teacher": self.flops_teacher, "data": self.source.state_dict()}
        return checkpoint.save(self.out_dir, step, self.model, self.optimizers, state, self.d,
                               self.cfg.checkpoint.keep, recipe=self.cfg.to_dict())

    def saved_path(self, step):
        return checkpoint.checkpoint_dir(self.out_dir) / f"step-{step:08d}"


def _setup(cfg, d, resume, data):
    """Check the recipe against this run, load the model, data and optimizers (or a checkpoint's state)."""
    t = cfg.train
    cfg.check_runnable(d.world)
    _resolve_model(cfg, d)
    teacher_name = _check_teacher(cfg, d)
    phases = trainable.parse_phases(t.trainable, t.steps)
    skeleton, recurrent = _skeleton(cfg.model.init_from), is_recurrent(Path(cfg.model.init_from))
    lora.check(skeleton, cfg.lora, recurrent)
    if cfg.lora.rank:
        lora.apply(skeleton, cfg.lora)  # per loop too: only the names matter to the trainable check
    trainable.check(skeleton, phases, recurrent)
    if len(phases) > 1 and d.world > 1 and cfg.distributed.strategy == "fsdp":
        raise LoopfitError(f"train.trainable {t.trainable} changes the trained set during the run, which FSDP2 does "
                           "not support: use one set with fsdp, or distributed.strategy=ddp")
    out_dir = Path(t.out_dir)
    check_writable(out_dir, "train.out_dir")  # before the model loads
    ckpt_path = _start_state(cfg, d, resume, out_dir)
    torch.manual_seed(t.seed * 1000 + d.rank)

    lr_at, blend_lr_at = _schedule(cfg)
    # the data first: its refusals (a missing split, bad token ids) come before the weights load
    source = data if data is not None else build_source(cfg.data, t.batch_size, d.rank, d.world, t.seed, t.steps,
                                                        blend_lr_at, t.micro_batch_size)
    model = _load_model(cfg)
    recurrent = is_recurrent(model)
    if cfg.lora.rank and cfg.lora.per_loop:
        loops = cfg.lora.loops or cfg.recurrence.mean
        _say(d, f"LoRA rank {cfg.lora.rank} per loop for {loops} loops on {lora.relax(model, cfg.lora, loops)} "
                f"linear layers of the core ({', '.join(cfg.lora.targets)}, init {cfg.lora.init}); kept in final/")
    elif cfg.lora.rank:
        _say(d, f"LoRA rank {cfg.lora.rank} on {lora.apply(model, cfg.lora)} linear layers of the core "
                f"({', '.join(cfg.lora.targets)}), shared by every loop; merged into the weights of final/")
    counts = param_counts(model)
    _check_data(source, model)

    checkpointed = set_activation_checkpointing(model, t.activation_checkpointing)
    compiled = compile_wanted(t.compile, d.device)
    if compiled:
        compile_blocks(model)
    start, tokens, flops, flops_full, flops_teacher = 0, 0, 0.0, 0.0, 0.0
    if ckpt_path is not None:
        start = checkpoint.read_state(ckpt_path)["step"]
    phase = trainable.phase_at(phases, start)
    trained = trainable.apply(model, phase)  # before wrapping: DDP and FSDP2 read requires_grad once
    model = distributed.wrap(model, cfg.distributed.strategy, d)
    model.train()
    # the optimizers hold every parameter some phase trains; a frozen one gets no gradient, so no state
    optimizers = build_optimizers(model, cfg.optim, trainable.union(distributed.unwrap(model), phases), cfg.lora.lr)
    remember_base_lr(optimizers)
    if ckpt_path is not None:
        base_lrs = [[g["base_lr"] for g in opt.param_groups] for opt in optimizers]
        state = checkpoint.load(ckpt_path, model, optimizers, d)
        for opt, lrs in zip(optimizers, base_lrs):  # the recipe's lr, not the one the checkpoint was made with
            for group, lr in zip(opt.param_groups, lrs):
                group["base_lr"] = lr
        start, tokens, flops = state["step"], state["tokens"], state["flops"]
        flops_full = state.get("flops_full", flops)
        flops_teacher = state.get("flops_teacher", 0.0)
        source.load_state_dict(state.get("data", {}))
        _say(d, f"resumed from {ckpt_path} at step {start}" + ("" if state["rng_restored"] else
             f" (saved with {state['world']} ranks, now {d.world}: RNG reseeded, not bit-exact)"))
        note = _resume_changes(ckpt_path, cfg, start)
        if note:
            _say(d, note)
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(out_dir / "recipe.yaml", "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)

    from .metrics import Metrics
    from .trackers import open_trackers

    trackers = open_trackers(t.loggers, out_dir, cfg.to_dict(), ckpt_path is not None) if d.main else []
    metrics = Metrics(out_dir, resume_step=start if ckpt_path else None, enabled=d.main, trackers=trackers,
                      tensorboard=t.tensorboard and "tensorboard" in t.loggers)
    for note in metrics.notes:
        _say(d, note)
    peak, peak_source = peak_flops(d.device, t.peak_flops)
    bf16 = t.precision == "bf16" or (t.precision == "auto" and d.device.type == "cuda")
    accum = t.accumulation(d.world)
    teacher = None
    if teacher_name:
        teacher = Teacher(distributed.place_teacher(load_teacher(teacher_name), cfg.distributed.strategy, d),
                          teacher_name)
        kind = f"recurrent, r = {teacher.loops}" if teacher.recurrent else "plain"
        alpha = cfg.distill.alpha
        _say(d, f"distilling from {teacher_name} ({kind}): loss = {alpha:g} x CE + {1 - alpha:g} x T^2 x KL, T = "
                f"{cfg.distill.temperature:g}")
    if t.trainable != "all":
        _say(d, f"train.trainable {t.trainable}: now {phase}, {trained:,} parameters train")
    _say(d, f"{'recurrent' if recurrent else 'plain'} model, non-embedding params {counts}; {t.steps} steps of "
         f"{t.batch_size} sequences ({t.micro_batch_size} x {d.world} rank(s) x {accum} accumulation); "
         f"MFU against {peak:.3g} FLOP/s ({peak_source})"
         + (f"; {checkpointed} blocks recompute activations" if checkpointed else "")
         + ("; blocks compiled (the first steps compile)" if compiled else ""))

    bar = None
    if d.main and t.progress:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=start, desc="train", dynamic_ncols=True)
    # a resumed run starts from what the killed one logged (its loss shows even if no step is left to run)
    return _Run(cfg, d, out_dir, model, recurrent, counts, source, optimizers, metrics, peak, bf16, accum, lr_at,
                blend_lr_at, teacher, final_norm(model) if teacher else None, phases, phase, bar, start, tokens,
                flops, flops_full, flops_teacher, last_saved=start if ckpt_path else -1,
                loss=metrics.last("loss", math.nan))


def _step_record(done, loss, lrs, grad_norm, depths, run, step_tokens, step_flops, step_flops_full, dt):
    """The metrics line of one optimizer step (totals already include it)."""
    n, k = (_mean([dep[j] for dep in depths]) for j in (0, 1))
    world = run.d.world
    record = {"step": done, "loss": loss, "lr": lrs[0], "grad_norm": grad_norm, "n": n, "k": k,
              "rbar": depths[0][2], "tokens": run.tokens, "flops": run.flops,
              "flops_full": run.flops_full, "tokens_per_s": step_tokens / dt,
              "mfu": step_flops / dt / (run.peak * world), "mfu_full": step_flops_full / dt / (run.peak * world),
              "time": dt}
    if len(lrs) > 1:
        record["lr_adamw"] = lrs[-1]
    return record


def _step(run, step, stop):
    """One optimizer step at 0-based `step`; returns the name of a signal that stops the run before it, else None."""
    cfg, d, t, model = run.cfg, run.d, run.cfg.train, run.model
    lrs = set_lr(run.optimizers, run.lr_at(step))
    depths = _depths(cfg, step, run.accum, run.recurrent)
    batch = run.source.batch(step, run.blend_lr_at(step))
    ids = batch["input_ids"].to(d.device)
    labels = batch.get("labels", batch["input_ids"]).to(d.device)
    local_tokens = float((labels[:, 1:] != -100).sum())
    # one collective: the global count of predicted tokens (loss normaliser) and whether any rank got a signal
    global_tokens, stop_votes = distributed.all_sum([local_tokens, float(stop.name is not None)], d.device)
    if stop_votes:
        return stop.name or "SIGTERM"

    _switch_phase(run, step)
    model = run.model
    t0 = time.perf_counter()
    sums = [0.0, 0.0, 0.0]  # loss, ce, kl
    for i, (n, k, _) in enumerate(depths):
        rows = slice(i * t.micro_batch_size, (i + 1) * t.micro_batch_size)
        kwargs = {"num_steps": (n, k)} if run.recurrent else {}
        with distributed.grad_sync(model, i == run.accum - 1), run.autocast():
            if run.teacher is not None:
                part, ce, kl = _distill_sum(run, ids[rows], labels[rows], kwargs)
                sums[1] += ce.item()
                sums[2] += kl.item()
            else:
                part = _loss_sum(model, ids[rows], labels[rows], run.recurrent, kwargs)
            # sum over tokens / global count, x world because DDP and FSDP average gradients over ranks
            (part * (d.world / max(global_tokens, 1.0))).backward()
        sums[0] += part.item()
    sums = [v / max(global_tokens, 1.0) for v in distributed.all_sum(sums, d.device)]
    loss = run.loss = sums[0]
    grad_norm = _grad_norm(model, cfg.optim.grad_clip)

    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        _nonfinite(run, step, f"loss {loss:.4g}, grad norm {grad_norm:.4g}", lrs)
        return None
    for opt in run.optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = time.perf_counter() - t0
    step_tokens = int(ids.numel() * d.world)
    micro_tokens = step_tokens // run.accum
    step_flops = sum(train_flops(micro_tokens, run.counts, n, k) for n, k, _ in depths)
    step_flops_full = sum(train_flops(micro_tokens, run.counts, n, k, full=True) for n, k, _ in depths)
    run.tokens += step_tokens
    run.flops += step_flops
    run.flops_full += step_flops_full
    done = step + 1
    record = _step_record(done, loss, lrs, grad_norm, depths, run, step_tokens, step_flops, step_flops_full, dt)
    if run.teacher is not None:  # the teacher's forward counts towards the run's compute (`flops` stays the student's)
        run.flops_teacher += run.teacher.flops(step_tokens)
        record.update(ce=sums[1], kl=sums[2], flops_teacher=run.flops_teacher)
    if d.device.type == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
    if t.eval_every and done % t.eval_every == 0:
        run.eval_loss = record["eval_loss"] = _eval_loss(run)
    if done % max(1, t.log_every) == 0 or "eval_loss" in record or done == t.steps:
        run.metrics.log(record)
    if run.bar:
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            r=f"{record['n'] + record['k']:g}" if run.recurrent else "-", lr=f"{lrs[0]:.2e}")
    if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < t.steps:
        run.save(done)
        run.last_saved = done
    return None


def _switch_phase(run, step):
    """Enter the train.trainable phase of `step` (frozen parameters get no gradient, hence no optimizer state)."""
    phase = trainable.phase_at(run.phases, step)
    if phase == run.phase:
        return
    inner = distributed.unwrap(run.model)
    count = trainable.apply(inner, phase)
    run.model = distributed.rewrap(run.model, run.cfg.distributed.strategy, run.d)  # DDP reads requires_grad once
    run.phase = phase
    _say(run.d, f"step {step + 1}: train.trainable phase {phase}, {count:,} parameters train")


def _nonfinite(run, step, what, lrs):
    """A non-finite loss or gradient: drop the step (train.on_nonfinite=skip), or stop and name the newest
    checkpoint from before the update that diverged (the weights after it are the ones that gave `what`)."""
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    if run.cfg.train.on_nonfinite == "skip":
        _say(run.d, f"step {step + 1}: non-finite ({what}); skipped (train.on_nonfinite=skip)")
        run.metrics.log({"step": step + 1, "skipped": 1, "loss": None, "lr": lrs[0]})
        run.skipped += 1
        if run.bar:
            run.bar.update(1)
        return
    if run.bar:
        run.bar.close()
    run.metrics.close()
    poisoned = run.saved_path(step)
    if run.d.main and poisoned.is_dir():  # kept for inspection, out of --resume's way
        poisoned.rename(poisoned.with_name(f"nonfinite-{poisoned.name}"))
    distributed.barrier()
    good = [(s, p) for s, p in checkpoint.list_checkpoints(run.out_dir) if s < step and checkpoint.verify(p) is None]
    head = f"non-finite training signal at step {step + 1} ({what}): stopped; "
    fix = "Lower optim.lr / optim.adamw_lr or optim.grad_clip, check the data"
    if good:
        raise LoopfitError(
            f"{head}the last good state is {good[0][1]} (step {good[0][0]}, before the update that diverged). "
            f"{fix}, then continue with --resume (or set train.on_nonfinite=skip to drop such steps)")
    raise LoopfitError(
        f"{head}no checkpoint precedes the update that diverged (step {step}), so none is kept. {fix}, then start "
        "again from model.init_from in a new train.out_dir (a smaller checkpoint.every keeps one nearer)")


def _check_trained(run):
    """Refuse to export a model that no step trained or whose weights are not all finite."""
    problem = None
    if run.skipped and run.skipped >= run.cfg.train.steps - run.start:
        problem = (f"every step of the run was non-finite and skipped (train.on_nonfinite=skip): nothing was "
                   f"trained, so {run.out_dir / 'final'} is not written. Check model.init_from's weights and the "
                   "data, or lower optim.lr / optim.adamw_lr")
    bad = sum(int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
              for p in run.model.parameters())
    (bad,) = distributed.all_sum([float(bad)], run.d.device)
    if bad and problem is None:
        problem = (f"the trained weights hold non-finite values: {run.out_dir / 'final'} is not written. Lower "
                   "optim.lr / optim.adamw_lr or optim.grad_clip and train again")
    if problem:
        if run.bar:
            run.bar.close()
        run.metrics.close()
        raise LoopfitError(problem)


def _finish(run, done, stopped):
    """Checkpoint the last step; unless a signal stopped the run, the final held-out loss and the final/ folder."""
    cfg, d, t, metrics = run.cfg, run.d, run.cfg.train, run.metrics
    if not stopped:
        _check_trained(run)
    path = run.save(done) if run.last_saved != done else run.saved_path(done)
    if run.bar:
        run.bar.close()
    final = None
    if stopped:
        _say(d, f"stopped by {stopped} after step {done}: checkpoint {path}; continue with `loopfit train "
                f"RECIPE --resume`")
    else:
        logged = metrics.logged(done, "eval_loss")
        if logged is not None:  # the killed run logged it, then died exporting final/: log it once
            run.eval_loss = logged
        elif not t.eval_every or t.steps % t.eval_every:
            run.eval_loss = _eval_loss(run)
            if run.eval_loss is not None:
                metrics.log({"step": done, "eval_loss": run.eval_loss, "tokens": run.tokens, "flops": run.flops,
                             "flops_full": run.flops_full,
                             **({"flops_teacher": run.flops_teacher} if run.teacher else {})})
        final = _export_final(run.out_dir, run.model, cfg, d, _model_card(run) if d.main else None)
        _say(d, f"done: {done} steps, {run.tokens} tokens, {run.flops:.3g} FLOPs, loss {run.loss:.4f}"
                + (f", held-out loss {run.eval_loss:.4f}" if run.eval_loss is not None else "")
                + f"; model in {final}")
    metrics.close()
    return {"step": done, "loss": run.loss, "eval_loss": run.eval_loss, "tokens": run.tokens, "flops": run.flops,
            "flops_teacher": run.flops_teacher, "out_dir": str(run.out_dir), "final": str(final) if final else None,
            "stopped": stopped,
            "checkpoint": str(path)}


def _train(cfg, d, resume, data):
    with contextlib.ExitStack() as held:
        if d.main:  # one run at a time in train.out_dir; the lock dies with its process
            check_writable(Path(cfg.train.out_dir), "train.out_dir")
            held.enter_context(folder_lock(cfg.train.out_dir, "train.out_dir"))
        distributed.barrier()
        return _run(cfg, d, resume, data)


def _run(cfg, d, resume, data):
    run = _setup(cfg, d, resume, data)
    done, stopped = cfg.train.steps, None
    with StopSignal() as stop:
        for step in range(run.start, cfg.train.steps):
            stopped = _step(run, step, stop)
            if stopped:
                done = step
                break
    return _finish(run, done, stopped)
