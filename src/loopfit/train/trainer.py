"""Continue pretraining a recurrent loopfit model (or a plain transformers causal LM, the baseline) from a recipe.

  loopfit train RECIPE.yaml [--section.key=value ...]        start a run from model.init_from (weights only)
  loopfit train RECIPE.yaml --resume                          continue the run in train.out_dir (full state)
  torchrun --nproc-per-node 8 -m loopfit.cli train RECIPE.yaml --distributed.strategy=fsdp

Starting and resuming are different operations. Without --resume, the weights of `model.init_from` (a
converted loopfit folder, or any folder AutoModelForCausalLM loads) are the starting point and the optimizer,
schedule and curriculum start fresh; an out_dir that already holds checkpoints is refused. With --resume the
newest intact checkpoint in out_dir restores model, optimizer (Muon momentum included), step, data position
and RNG, so the run continues as if never stopped (bit for bit on CPU). A corrupt newest checkpoint is
skipped with a message. `--resume PATH` picks a checkpoint folder.

Each micro-batch of a recurrent model draws (n, k) loops (recurrence.*: Poisson-lognormal depth seeded by step
and micro-batch, the same on every rank; curriculum of the mean or the backprop depth, or a fixed r; or one draw
per step with recurrence.depth_per=step), runs n loops without and k with gradients, and each step updates with
Muon + AdamW (optim.*) under an lr schedule (schedule.*: wsd, cosine, constant, cpt). The global batch is
train.batch_size sequences = micro_batch_size x ranks x accumulation steps. The loss of a loopfit model is computed
chunk by chunk without the full fp32 logits; train.compile and train.activation_checkpointing trade start-up time
and recomputation for speed and memory (see loopfit.train.performance).

Writes to train.out_dir: metrics.jsonl / metrics.csv / tb/ (loss, lr, grad norm, n and k (the step's mean over its
micro-batches), tokens, FLOPs by the paper's count (`flops`: adapter and final norm left out, as the authors count)
and the full count (`flops_full`), tokens/s, MFU by both counts), checkpoints/step-N/ (every checkpoint.every
steps, at the end, and on SIGTERM/SIGINT), and final/, a folder from_pretrained loads. A non-finite loss stops
the run with a checkpoint of the last good state (or, with train.on_nonfinite=skip, drops that step).
"""

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
from ..io import atomic_dir, atomic_file, check_writable
from ..loading import OFFLINE_MODELS, from_pretrained, is_recurrent, offline_folder
from ..model import causal_lm_loss
from . import checkpoint, distributed
from .config import describe_keys, load_recipe
from .flops import param_counts, peak_flops, train_flops
from .optim import build_optimizers, remember_base_lr, set_lr
from .performance import compile_blocks, compile_wanted, set_activation_checkpointing
from .recurrence import depth_for_step
from .schedules import lr_factor, lr_fraction
from .sources import build_source

# --------------------------------------------------------------------------------------------- command line


def add_arguments(parser):
    parser.add_argument("recipe", help="YAML recipe file, or the name of a shipped one "
                        "(quickstart, tinyllama-448, ...); every key can be overridden as --section.key=value")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue the run in train.out_dir from its newest intact checkpoint (or CHECKPOINT)")
    parser.epilog = "recipe keys and defaults (override any as --section.key=value):\n" + describe_keys()
    known = parser.parse_known_args

    def parse_args(args=None, namespace=None):
        ns, rest = known(args, namespace)
        bad = [a for a in rest if not (a.startswith("--") and "=" in a and "." in a.split("=", 1)[0])]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)} (recipe overrides look like --optim.lr=3e-4)")
        ns.overrides = rest
        return ns

    parser.parse_args = parse_args


def run(args):
    result = train(args.recipe, getattr(args, "overrides", ()), resume=args.resume)
    return {"SIGTERM": 143, "SIGINT": 130}.get(result.get("stopped"), 0)


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


def _export_final(out_dir, model, cfg, d):
    """OUT/final: a folder from_pretrained loads (weights, config, and the tokenizer files of init_from)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
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
    distributed.barrier()
    return dest


def _eval_loss(run):
    """Mean held-out next-token loss at a fixed number of loops (recurrence.eval_loops, default its mean)."""
    cfg, d, model = run.cfg, run.d, run.model
    if not hasattr(run.source, "eval_batches"):
        return None
    r = cfg.recurrence.eval_loops or cfg.recurrence.mean
    kwargs = {"num_steps": r} if run.recurrent else {}
    model.eval()
    total = count = 0.0
    with torch.no_grad(), run.autocast():
        for b in run.source.eval_batches(cfg.train.eval_batches):
            ids, labels = b["input_ids"].to(d.device), b.get("labels", b["input_ids"]).to(d.device)
            total += _loss_sum(model, ids, labels, run.recurrent, kwargs).item()
            count += (labels[:, 1:] != -100).sum().item()
    model.train()
    total, count = distributed.all_sum([total, count], d.device)
    return total / max(count, 1.0)


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
    """Run a recipe (YAML path, dict, or None for defaults) with overrides like '--train.steps=10'.

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
    if d.main and checkpoint.remove_partial(out_dir):
        _say(d, "removed the partial checkpoint of an interrupted write")
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
    bar: object = None
    start: int = 0
    tokens: int = 0
    flops: float = 0.0
    flops_full: float = 0.0
    last_saved: int = -1  # the step of the newest checkpoint this run holds
    loss: float = math.nan
    eval_loss: float = None

    def autocast(self):
        return torch.autocast(self.d.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def save(self, step):
        state = {"step": step, "tokens": self.tokens, "flops": self.flops, "flops_full": self.flops_full,
                 "data": self.source.state_dict()}
        return checkpoint.save(self.out_dir, step, self.model, self.optimizers, state, self.d,
                               self.cfg.checkpoint.keep, recipe=self.cfg.to_dict())

    def saved_path(self, step):
        return checkpoint.checkpoint_dir(self.out_dir) / f"step-{step:08d}"


def _setup(cfg, d, resume, data):
    """Check the recipe against this run, load the model, data and optimizers (or a checkpoint's state)."""
    t = cfg.train
    cfg.check_runnable(d.world)
    _resolve_model(cfg, d)
    out_dir = Path(t.out_dir)
    check_writable(out_dir, "train.out_dir")  # before the model loads
    ckpt_path = _start_state(cfg, d, resume, out_dir)
    torch.manual_seed(t.seed * 1000 + d.rank)

    model = _load_model(cfg)
    recurrent = is_recurrent(model)
    counts = param_counts(model)
    lr_at, blend_lr_at = _schedule(cfg)
    source = data if data is not None else build_source(cfg.data, t.batch_size, d.rank, d.world, t.seed, t.steps,
                                                        blend_lr_at, t.micro_batch_size)
    _check_data(source, model)

    checkpointed = set_activation_checkpointing(model, t.activation_checkpointing)
    compiled = compile_wanted(t.compile, d.device)
    if compiled:
        compile_blocks(model)
    model = distributed.wrap(model, cfg.distributed.strategy, d)
    model.train()
    optimizers = build_optimizers(model, cfg.optim)
    remember_base_lr(optimizers)

    start, tokens, flops, flops_full = 0, 0, 0.0, 0.0
    if ckpt_path is not None:
        state = checkpoint.load(ckpt_path, model, optimizers, d)
        start, tokens, flops = state["step"], state["tokens"], state["flops"]
        flops_full = state.get("flops_full", flops)
        source.load_state_dict(state.get("data", {}))
        _say(d, f"resumed from {ckpt_path} at step {start}" + ("" if state["rng_restored"] else
             f" (saved with {state['world']} ranks, now {d.world}: RNG reseeded, not bit-exact)"))
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(out_dir / "recipe.yaml", "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)

    from .metrics import Metrics

    metrics = Metrics(out_dir, resume_step=start if ckpt_path else None, tensorboard=t.tensorboard, enabled=d.main)
    for note in metrics.notes:
        _say(d, note)
    peak, peak_source = peak_flops(d.device, t.peak_flops)
    bf16 = t.precision == "bf16" or (t.precision == "auto" and d.device.type == "cuda")
    accum = t.accumulation(d.world)
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
                blend_lr_at, bar, start, tokens, flops, flops_full, last_saved=start if ckpt_path else -1,
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

    t0 = time.perf_counter()
    loss_sum = 0.0
    for i, (n, k, _) in enumerate(depths):
        rows = slice(i * t.micro_batch_size, (i + 1) * t.micro_batch_size)
        kwargs = {"num_steps": (n, k)} if run.recurrent else {}
        with distributed.grad_sync(model, i == run.accum - 1), run.autocast():
            ce = _loss_sum(model, ids[rows], labels[rows], run.recurrent, kwargs)
            # sum over tokens / global count, x world because DDP and FSDP average gradients over ranks
            (ce * (d.world / max(global_tokens, 1.0))).backward()
        loss_sum += ce.item()
    (loss_total,) = distributed.all_sum([loss_sum], d.device)
    loss = run.loss = loss_total / max(global_tokens, 1.0)
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


def _nonfinite(run, step, what, lrs):
    """A non-finite loss or gradient: drop the step (train.on_nonfinite=skip) or save the last good state and stop."""
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    if run.cfg.train.on_nonfinite == "skip":
        _say(run.d, f"step {step + 1}: non-finite ({what}); skipped (train.on_nonfinite=skip)")
        run.metrics.log({"step": step + 1, "skipped": 1, "loss": None, "lr": lrs[0]})
        if run.bar:
            run.bar.update(1)
        return
    path = run.save(step) if run.last_saved != step else run.saved_path(step)
    if run.bar:
        run.bar.close()
    run.metrics.close()
    raise LoopfitError(
        f"non-finite training signal at step {step + 1} ({what}): stopped; the last good state (after step "
        f"{step}) is saved in {path}. Lower optim.lr / optim.adamw_lr or optim.grad_clip, check the data, "
        "then continue with --resume (or set train.on_nonfinite=skip to drop such steps)")


def _finish(run, done, stopped):
    """Checkpoint the last step; unless a signal stopped the run, the final held-out loss and the final/ folder."""
    cfg, d, t, metrics = run.cfg, run.d, run.cfg.train, run.metrics
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
                             "flops_full": run.flops_full})
        final = _export_final(run.out_dir, run.model, cfg, d)
        _say(d, f"done: {done} steps, {run.tokens} tokens, {run.flops:.3g} FLOPs, loss {run.loss:.4f}"
                + (f", held-out loss {run.eval_loss:.4f}" if run.eval_loss is not None else "")
                + f"; model in {final}")
    metrics.close()
    return {"step": done, "loss": run.loss, "eval_loss": run.eval_loss, "tokens": run.tokens, "flops": run.flops,
            "out_dir": str(run.out_dir), "final": str(final) if final else None, "stopped": stopped,
            "checkpoint": str(path)}


def _train(cfg, d, resume, data):
    run = _setup(cfg, d, resume, data)
    done, stopped = cfg.train.steps, None
    with StopSignal() as stop:
        for step in range(run.start, cfg.train.steps):
            stopped = _step(run, step, stop)
            if stopped:
                done = step
                break
    return _finish(run, done, stopped)
