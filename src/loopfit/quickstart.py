"""The whole loopfit path on a real small model, offline, on a CPU: convert, prepare, train, eval, report.

  loopfit quickstart                         # SmolLM2-135M; --minutes (default 8) is the training budget
  loopfit quickstart --minutes 20            # train longer (steps scale with the minutes)
  loopfit quickstart --steps 1 --limit 200 --gsm8k 2 --max-new-tokens 8 --eval-loops 1,2 --gsm8k-loops 1,2 \
      --eval-tokens 256 --out /tmp/qs        # the smallest setting
  loopfit quickstart --model qwen2.5-0.5b --device cuda --steps 500 --out quickstart-qwen

Stages (each prints one summary line; a finished stage is reused when re-run with the same settings):
  1. convert  the offline model into a recurrent one (and, for the control run, the same shape with random
              weights: `loopfit convert --init random`). Layers: the paper's TinyLlama (4,8,4)-of-22 shape scaled
              to the model's depth (SmolLM2's 30 layers -> (5,10,5): prelude 0-4, core 15-24 looped, coda
              25-29, layers 5-14 dropped), as `loopfit convert` does by default. `loopfit analyze` ranks layers
              better but takes ~5 CPU minutes, a third of the budget. Adapter: `passthrough` ([0|I]), so the
              converted model equals the base minus the dropped layers at every r (loss ~7 vs the paper's
              random adapter at ~13-16): minutes of CPU training cannot heal a random adapter.
  2. prepare  the built-in `general` and `math` corpora (--limit documents each, 2% held out).
  3. train    the recurrent model with the shipped recipe `quickstart` (1-sqrt curriculum of the mean depth to 4,
              truncated backprop through the last 2 loops, Muon + AdamW, heal-then-mix blend), then the plain
              base model with the same recipe for as many steps as give it the same training FLOPs (paper's
              count: 6 * non-embedding params * tokens for plain; loops counted for recurrent; equal within half
              a plain step's FLOPs); then the control: the same recurrent shape and config from random weights,
              trained with the same recipe for the same steps (so the same FLOPs). It shows what reusing the
              pretrained layers buys (--no-control skips it); and the distilled run: the converted model healed
              from its base model (`distill.teacher: base`) for as many steps as give it the cross-entropy run's
              total compute, the teacher's forward counted (--no-distill skips it).
  4. eval     held-out math loss at each --eval-loops r, and a fixed --gsm8k subset of GSM8K (1-shot prompt,
              greedy, --max-new-tokens), for every model (the plain one ignores r); the recurrent models run
              each sweep at the price of its deepest r (loopfit eval's sweep decoding), their GSM8K with
              exact self-speculation inside it (--draft-loops).
  5. report   OUT/REPORT.md: the table at equal FLOPs, plots (OUT/compare/*.png, the recurrent r sweep) and
              what these numbers do and do not show.

Outputs go to --out (default quickstart/). Re-running skips finished stages; an interrupted training run
continues from its checkpoint; other settings over an existing --out need --force (which starts afresh).
--steps counts optimizer steps; r counts loops. --eval-steps, --gsm8k-steps and --draft-steps are the deprecated
names of --eval-loops, --gsm8k-loops and --draft-loops (removed in the next release).
"""

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from . import LoopfitError, recipes
from .io import check_writable

STAGES = ("convert", "prepare", "train", "eval", "report")
RECIPE = recipes.resolve("quickstart")  # shipped inside the package
# Recurrent-model steps per training minute on an idle 2-core CPU, the plain model's equal-FLOPs steps and the
# control's equal steps included (benchmarks/BENCHMARKS.md has the timing this comes from); the distilled run
# adds about a quarter, which --minutes does not count (--no-distill leaves it out).
STEPS_PER_MINUTE = 2
DEFAULT_MINUTES = 8.0
HOLDOUT = 0.02
# The control run: the converted model's shape and config with random weights (OUT/model-random-init), trained as
# OUT/runs/random-init with the recurrent model's recipe and steps.
CONTROL = "random-init"
# The distilled run: the converted model healed from its base (distill.teacher: base) with these settings, for as
# many steps as give it the cross-entropy run's total compute, the teacher's forward included
# (benchmarks/BENCHMARKS.md: healing speed). --no-distill skips it.
DISTILLED = "distilled"
DISTILL = {"alpha": 0.5, "temperature": 1.0}
# old flag names, accepted for one release
RENAMED_FLAGS = {"--eval-steps": "--eval-loops", "--gsm8k-steps": "--gsm8k-loops", "--draft-steps": "--draft-loops"}


def add_arguments(parser):
    from .cli import options_of

    option = options_of(parser, quickstart)
    option("--model", help="offline model short name: smollm2-135m, qwen2.5-0.5b, gemma3-270m (default %(default)s)")
    option("--out", help="output folder (default %(default)s/)")
    option("--minutes", type=float, help=f"training minutes for the recurrent, plain and control runs on a 2-core "
           f"CPU (the distilled run adds about a quarter); sets the recurrent steps at {STEPS_PER_MINUTE}/minute "
           "(default %(default)g)")
    option("--steps", type=int, help="recurrent model's optimizer steps (overrides --minutes)")
    option("--layers", metavar="P,K,C", help="prelude, core, coda layer counts (default: the paper's shape scaled to "
           "the model, (5,10,5) for SmolLM2)")
    option("--adapter-init", choices=("random", "passthrough", "state", "mean"),
           help="adapter init (default %(default)s: starts at the base model minus the dropped layers)")
    option("--limit", type=int, help="documents of each corpus to prepare (default %(default)s)")
    option("--eval-loops", metavar="R,...", help="test-time loops r for the loss (default %(default)s)")
    option("--eval-tokens", type=int, help="held-out math tokens for the loss (default %(default)s)")
    option("--gsm8k", type=int, help="GSM8K test items (a fixed subset; 0 skips; default %(default)s)")
    option("--gsm8k-loops", metavar="R,...", help="test-time loops r for GSM8K (default %(default)s)")
    option("--max-new-tokens", type=int, help="GSM8K generation budget (default %(default)s)")
    option("--draft-loops", type=int, metavar="D",
           help="GSM8K of the recurrent models speculates inside the sweep: each r > D drafts at D loops and is "
           "verified several tokens a pass, for the same completions, faster (the README's Benchmarks give the "
           "speed-up); 0 decodes without drafts; a batch whose drafts are mostly rejected stops drafting "
           "(default %(default)s)")
    option("--device", choices=("auto", "cpu", "cuda"), help="auto: a GPU when there is one (default %(default)s)")
    option("--recipe", help="training recipe file or shipped name (default %(default)s)")
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="skip the control run (the recurrent shape from random weights, same recipe and FLOPs), "
                        "which shows what reusing the pretrained layers buys; saves one of the training runs")
    parser.add_argument("--no-distill", dest="distill", action="store_false",
                        help="skip the distilled run (the converted model healed from its base model by distillation, "
                        "at the cross-entropy run's total compute, teacher included)")
    parser.add_argument("--force", action="store_true", help="delete --out and start afresh")


# ------------------------------------------------------------------------------------------------ settings


def _settings(args):
    """Validated settings that decide the results (a change of any needs a fresh --out)."""
    from .loading import OFFLINE_MODELS
    from .loops import parse_loops

    if args.model not in OFFLINE_MODELS:
        raise LoopfitError(f"unknown model '{args.model}': the quickstart runs offline on {', '.join(OFFLINE_MODELS)}")
    if args.steps is not None and args.steps < 1:
        raise LoopfitError(f"--steps must be >= 1, got {args.steps}")
    if args.steps is None and not args.minutes > 0:
        raise LoopfitError(f"--minutes must be positive, got {args.minutes}")
    for name in ("limit", "eval_tokens", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise LoopfitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if (getattr(args, "draft_loops", None) or 0) < 0:
        raise LoopfitError(f"--draft-loops must be >= 0 (0 decodes plainly), got {args.draft_loops}")
    if args.gsm8k < 0:
        raise LoopfitError(f"--gsm8k must be >= 0 (0 skips GSM8K), got {args.gsm8k}")
    args.recipe = str(recipes.resolve(args.recipe))
    if not Path(args.recipe).is_file():
        raise LoopfitError(f"recipe {args.recipe} not found: pass --recipe FILE or a shipped name "
                           f"({', '.join(recipes.shipped())})")
    layers = None
    if args.layers:
        from .convert import _counts

        layers = list(_counts(_text(args.layers)))
    steps = args.steps or max(1, round(args.minutes * STEPS_PER_MINUTE))
    return {
        "model": args.model, "layers": layers, "adapter_init": args.adapter_init, "steps": steps,
        "limit": args.limit, "eval_steps": parse_loops(_text(args.eval_loops), "--eval-loops"),
        "eval_tokens": args.eval_tokens, "gsm8k": args.gsm8k,
        "gsm8k_steps": parse_loops(_text(args.gsm8k_loops), "--gsm8k-loops"), "max_new_tokens": args.max_new_tokens,
        "recipe_sha256": hashlib.sha256(Path(args.recipe).read_bytes()).hexdigest()[:16],
        "control": bool(args.control),
        "distill": DISTILL if args.distill else None,
    }


def _text(value):
    """A comma list as the command line writes it: '1,2,4' stays, (1, 2, 4) becomes '1,2,4'."""
    return value if isinstance(value, str) else ",".join(map(str, value))


def _device(choice):
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise LoopfitError("--device cuda but torch sees no GPU: use --device cpu (or auto)")
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


class State:
    """OUT/quickstart.json: the settings and each finished stage's summary, so a re-run skips done stages."""

    def __init__(self, out, settings, force):
        self.path = Path(out) / "quickstart.json"
        if force and Path(out).exists():
            shutil.rmtree(out)
        old = json.loads(self.path.read_text()) if self.path.exists() else None
        if old is not None and old["settings"] != settings:
            changed = sorted(k for k in settings if old["settings"].get(k) != settings[k])
            raise LoopfitError(f"{out} holds a quickstart with other settings ({', '.join(changed)}): pass --force "
                               "to start afresh, or choose another --out")
        if old is None and Path(out).exists() and any(Path(out).iterdir()):
            raise LoopfitError(f"{out} exists and is not a quickstart folder: choose another --out or pass --force")
        self.data = old or {"settings": settings, "stages": {}}

    def done(self, stage):
        return self.data["stages"].get(stage)

    def finish(self, stage, summary):
        from .io import atomic_file

        self.data["stages"][stage] = summary
        with atomic_file(self.path, "w") as f:
            json.dump(self.data, f, indent=1)


def _say(msg):
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)
    sys.stderr.flush()


# ------------------------------------------------------------------------------------------------ stages


def stage_convert(s, out, recipe):
    from .convert import _compact, convert, default_layers, plan_layers
    from .loading import base_config
    from .train.config import load_recipe

    n_layers = base_config(s["model"]).num_hidden_layers
    layers = tuple(s["layers"] or default_layers(n_layers))
    depth = load_recipe(recipe).recurrence.mean  # the converted folder's default r is the one it trains at
    same = dict(layers=layers, adapter_init=s["adapter_init"], recurrence=depth, force=True)
    _, report = convert(s["model"], out / "model", **same, log=lambda m: _say(f"  {m}"))
    plan = plan_layers(n_layers, layers)
    summary = {"layers": list(layers), "plan": plan.describe(), "dropped": _compact(plan.dropped) or "none",
               "base_loss": report.base_loss,
               "converted_loss": report.converted_loss, "converted_loops": report.converted_loops,
               "line": f"{s['model']} -> {plan.describe()}; adapter {s['adapter_init']}; sample-text loss base "
                       f"{report.base_loss:.3f}, converted {report.converted_loss:.3f} at r = "
                       f"{report.converted_loops}"}
    if s["control"]:  # the control: the same shape and config, every weight drawn afresh
        _, control = convert(s["model"], out / f"model-{CONTROL}", **same, init="random", log=lambda m: None)
        summary["random_init_loss"] = control.converted_loss
        summary["line"] += f", random init {control.converted_loss:.3f}"
    return summary


def stage_prepare(s, out):
    from .data.prepare import prepare

    results = prepare(["general", "math"], str(out / "model"), out / "data", holdout=HOLDOUT, limit=s["limit"],
                      force=True)
    sizes = {m["name"]: {k: m["splits"][k]["tokens"] for k in ("train", "val")} for _, m, _ in results}
    parts = [f"{n} {v['train']:,} train + {v['val']:,} held-out tokens" for n, v in sizes.items()]
    return {"tokens": sizes, "line": f"{'; '.join(parts)} (first {s['limit']} documents of each)"}


def _overrides(out, init_from, run, steps):
    return [f"--model.init_from={init_from}", f"--data.root={out / 'data'}",
            f"--train.out_dir={out / 'runs' / run}", f"--train.steps={steps}"]


def _train_run(recipe, overrides, run_dir):
    """train(); continues an interrupted run from its checkpoint; drops the checkpoints once final/ exists."""
    from .train import checkpoint
    from .train.trainer import train

    resume = "latest" if checkpoint.list_checkpoints(run_dir) else None
    if resume is None and run_dir.exists():
        shutil.rmtree(run_dir)  # an attempt that died before its first checkpoint: start it again
    result = train(recipe, overrides, resume=resume)
    if result["stopped"]:
        raise KeyboardInterrupt
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # ~1.5 GB each; final/ is what eval reads
    return result


def plain_steps(flops, plain_dir, tokens_per_step):
    """Steps of the plain model that spend `flops` training FLOPs (6 * N * D), and its FLOPs per step."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .train.flops import param_counts, train_flops

    with torch.device("meta"):  # parameter counts without reading weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(plain_dir))
    per_step = train_flops(tokens_per_step, param_counts(model))
    return max(1, round(flops / per_step)), per_step


def distill_steps(flops, steps, base_dir, tokens_per_step):
    """Steps of a distillation run whose total compute (student + the base teacher's forward, 2 * N * D) matches a
    cross-entropy run of `steps` steps and `flops` FLOPs (its FLOPs per step stay as the curriculum gives them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .train.distill import forward_flops
    from .train.flops import param_counts

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    teacher = forward_flops(tokens_per_step, param_counts(base), 1)
    return max(1, round(flops / (flops / steps + teacher)))


def stage_train(s, out, recipe):
    from .loading import offline_folder
    from .train.config import load_recipe

    rec_over = _overrides(out, out / "model", "recurrent", s["steps"])
    rec = _train_run(recipe, rec_over, out / "runs" / "recurrent")
    plain_dir = offline_folder(s["model"])
    cfg = load_recipe(recipe, rec_over)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    steps, per_step = plain_steps(rec["flops"], plain_dir, tokens_per_step)
    plain = _train_run(recipe, _overrides(out, plain_dir, "plain", steps), out / "runs" / "plain")
    gap = (plain["flops"] - rec["flops"]) / rec["flops"]
    keys = ("step", "loss", "eval_loss", "tokens", "flops")
    summary = {
        "recurrent": {k: rec[k] for k in keys},
        "plain": {k: plain[k] for k in keys},
        "plain_flops_per_step": per_step, "flops_gap": gap,
        "line": f"recurrent {rec['step']} steps, {rec['tokens']:,} tokens, {rec['flops']:.3e} FLOPs, loss "
                f"{rec['loss']:.3f}; plain {plain['step']} steps, {plain['tokens']:,} tokens, {plain['flops']:.3e} "
                f"FLOPs ({gap:+.1%}), loss {plain['loss']:.3f}",
    }
    if s.get("distill"):  # healed from the base model, at the cross-entropy run's total compute
        kd_steps = distill_steps(rec["flops"], s["steps"], plain_dir, tokens_per_step)
        teacher = ["--distill.teacher=base", f"--distill.alpha={s['distill']['alpha']}",
                   f"--distill.temperature={s['distill']['temperature']}"]
        kd = _train_run(recipe, _overrides(out, out / "model", DISTILLED, kd_steps) + teacher,
                        out / "runs" / DISTILLED)
        summary[DISTILLED] = {**{k: kd[k] for k in keys}, "flops_teacher": kd["flops_teacher"]}
        total = kd["flops"] + kd["flops_teacher"]
        summary["line"] += (f"; {DISTILLED} {kd['step']} steps, {kd['flops']:.3e} + teacher "
                            f"{kd['flops_teacher']:.3e} FLOPs ({(total - rec['flops']) / rec['flops']:+.1%}), "
                            f"loss {kd['loss']:.3f}")
    if s["control"]:  # same recipe, steps and seeded depth draws as the recurrent run: the same FLOPs
        control = _train_run(recipe, _overrides(out, out / f"model-{CONTROL}", CONTROL, s["steps"]),
                             out / "runs" / CONTROL)
        summary[CONTROL] = {k: control[k] for k in keys}
        summary["line"] += (f"; {CONTROL} recurrent {control['step']} steps, {control['flops']:.3e} FLOPs, loss "
                            f"{control['loss']:.3f}")
    return summary


def stage_eval(s, out, device, draft_steps=None):
    from .eval.run import evaluate, write
    from .loading import load, offline_folder

    data = str(out / "data" / "math")
    common = dict(data=data, seq_len=256, max_tokens=s["eval_tokens"], limit=s["gsm8k"] or None,
                  max_new_tokens=s["max_new_tokens"])

    def run(folder, steps, tasks, dest, draft_steps=None):
        pair = load(folder, device=device)
        return evaluate(pair, loops=steps, tasks=tasks, out=dest, draft_loops=draft_steps, **common)

    found = {}
    names = ("recurrent",) + ((DISTILLED,) if s.get("distill") else ()) + ("plain",)
    for name in names + ((CONTROL,) if s["control"] else ()):
        folder, dest = out / "runs" / name / "final", out / "runs" / name / "eval"
        res = run(folder, s["eval_steps"], ["loss"], dest)
        rows = res["rows"]
        if s["gsm8k"]:  # generation is the slow part: fewer r than the loss
            speculate = name != "plain" and 0 < (draft_steps or 0) < max(s["gsm8k_steps"])
            gsm = run(folder, s["gsm8k_steps"], ["gsm8k_1shot"], dest / "gsm8k", draft_steps if speculate else None)
            rows = rows + gsm["rows"]
            res = dict(res, rows=rows, tasks=res["tasks"] + gsm["tasks"], seconds=res["seconds"] + gsm["seconds"])
            write(res, [], dest)  # one results.json with both tasks, for `loopfit compare`
        found[name] = _by_metric(rows)
    # before training: the base model, and the converted model at its default r (passthrough: the same at every r)
    base = run(offline_folder(s["model"]), [1], ["loss"], out / "base-eval")
    conv = run(out / "model", [1, 4], ["loss"], out / "model" / "eval")
    found["base"], found["converted"] = _by_metric(base["rows"]), _by_metric(conv["rows"])
    if s["control"]:
        untrained = run(out / f"model-{CONTROL}", [1], ["loss"], out / f"model-{CONTROL}" / "eval")
        found[f"{CONTROL}-untrained"] = _by_metric(untrained["rows"])
    rec_loss = found["recurrent"]["loss"]
    best = min(rec_loss, key=rec_loss.get)
    line = ("held-out math loss: recurrent " + ", ".join(f"r={r} {v:.3f}" for r, v in sorted(rec_loss.items()))
            + f"; plain {found['plain']['loss'][min(found['plain']['loss'])]:.3f}; base before training "
            f"{found['base']['loss'][1]:.3f}")
    if s.get("distill"):
        line += f"; {DISTILLED} best {min(found[DISTILLED]['loss'].values()):.3f}"
    if s["control"]:
        line += f"; {CONTROL} recurrent best {min(found[CONTROL]['loss'].values()):.3f}"
    if s["gsm8k"]:
        acc = found["recurrent"]["accuracy_flexible"]
        line += (f"; GSM8K ({s['gsm8k']} items) flexible: recurrent "
                 + ", ".join(f"r={r} {v:.0%}" for r, v in sorted(acc.items()))
                 + f", plain {next(iter(found['plain']['accuracy_flexible'].values())):.0%}")
    return {"metrics": {k: {m: {str(r): v for r, v in d.items()} for m, d in by.items()} for k, by in found.items()},
            "best_r": best, "line": line}


def _by_metric(rows):
    """{metric: {r: value}} (perplexity left out: it is exp(loss))."""
    out = {}
    for row in rows:
        if row["metric"] != "perplexity":
            out.setdefault(row["metric"], {})[row["loops"]] = row["value"]
    return out


# ------------------------------------------------------------------------------------------------ report


def recipe_summary(path):
    """What the training recipe does, in a phrase for the report (read from the recipe, not assumed)."""
    from .train.config import load_recipe

    cfg = load_recipe(path)
    rc = cfg.recurrence
    depth = f"exactly {rc.mean} loops" if rc.mode == "fixed" else "Poisson-lognormal depth"
    if rc.curriculum != "none":
        depth += f", {rc.curriculum} curriculum of the mean to {rc.mean}"
    elif rc.mode != "fixed":
        depth += f" of mean {rc.mean}"
    optim = "Muon + AdamW" if cfg.optim.name == "muon" else "AdamW"
    schedule = "continued-pretraining schedule" if cfg.schedule.name == "cpt" else f"`{cfg.schedule.name}` schedule"
    phases = cfg.data.phases or [{"weights": cfg.data.weights or {}}]
    blend = ", then ".join(
        (f"`{p['name']}` " if p.get("name") else "")
        + "(" + ", ".join(f"{w / sum(p['weights'].values()):.0%} `{k}`" for k, w in p["weights"].items()) + ")"
        for p in phases)
    name = "quickstart" if Path(path).resolve() == RECIPE.resolve() else str(path)
    return (f"`{name}` (recurrence: {depth}, backprop through the last {rc.backprop} loops; {optim}; {schedule}; "
            f"data: {blend})")


def report_text(s, state, device, seconds, recipe):
    conv, prep, tr, ev = (state["stages"][k] for k in ("convert", "prepare", "train", "eval"))
    m = ev["metrics"]
    rec, plain = m["recurrent"], m["plain"]
    gsm = bool(s["gsm8k"])
    steps = sorted({int(r) for r in rec["loss"]} | ({int(r) for r in rec.get("accuracy_flexible", {})}))

    def cell(metric_map, r, pct=False):
        v = (metric_map or {}).get(str(r))
        return "" if v is None else (f"{v:.0%}" if pct else f"{v:.4f}")

    plain_r = next(iter(plain["loss"]))
    head = "| model | test r | training compute (FLOPs) | training tokens | held-out math loss |"
    sep = "|---|---:|---:|---:|---:|"
    if gsm:
        head += " GSM8K strict | GSM8K flexible |"
        sep += "---:|---:|"
    rows = []
    looped = [("recurrent", f"recurrent {tuple(conv['layers'])}, cross-entropy")]
    if DISTILLED in m:
        looped.append((DISTILLED, f"recurrent {tuple(conv['layers'])}, distilled from the base"))
    if CONTROL in m:
        looped.append((CONTROL, f"recurrent {tuple(conv['layers'])}, random init"))
    for run, label in looped:
        for r in steps:
            compute = tr[run]["flops"] + tr[run].get("flops_teacher", 0.0)
            row = f"| {label} | {r} | {compute:.3e} | {tr[run]['tokens']:,} | {cell(m[run]['loss'], r)} |"
            if gsm:
                row += (f" {cell(m[run].get('accuracy_strict'), r, True)} |"
                        f" {cell(m[run].get('accuracy_flexible'), r, True)} |")
            rows.append(row)
    row = (f"| plain {s['model']} (all layers) | - | {tr['plain']['flops']:.3e} | {tr['plain']['tokens']:,} | "
           f"{cell(plain['loss'], plain_r)} |")
    if gsm:
        row += (f" {cell(plain.get('accuracy_strict'), plain_r, True)} |"
                f" {cell(plain.get('accuracy_flexible'), plain_r, True)} |")
    rows.append(row)
    before = [f"| base {s['model']}, untrained | - | 0 | 0 | {cell(m['base']['loss'], 1)} |",
              f"| recurrent, just converted | 1 / 4 | 0 | 0 | {cell(m['converted']['loss'], 1)} / "
              f"{cell(m['converted']['loss'], 4)} |"]
    if CONTROL in m:
        untrained = m[f"{CONTROL}-untrained"]["loss"]
        before.append(f"| recurrent, random init, untrained | 1 | 0 | 0 | {cell(untrained, 1)} |")
    if gsm:
        before = [b + " | |" for b in before]

    rl = {int(r): v for r, v in rec["loss"].items()}
    r_lo, r_hi, best = min(rl), max(rl), int(ev["best_r"])
    plain_loss = plain["loss"][plain_r]
    gain = rl[r_lo] - rl[best]
    with_r = (f"The recurrent model's held-out loss is lowest at r = {best} ({rl[best]:.4f}); going from r = {r_lo} "
              f"to r = {best} lowers it by {gain:.4f}" if best != r_lo else
              f"The recurrent model's held-out loss does not improve beyond r = {r_lo} ({rl[r_lo]:.4f})")
    with_r += f", and at r = {r_hi} it is {rl[r_hi]:.4f}." if r_hi != best else "."
    versus = "below" if rl[best] < plain_loss else "above"
    leader = ("so the plain model leads here, and the gap says nothing about the method at scale"
              if versus == "above" else "so the recurrent model's lead here is a small-budget result, not evidence "
              "about the method at scale")
    control_text, control_train, control_convert = "", "", ""
    if CONTROL in m:
        cl = {int(r): v for r, v in m[CONTROL]["loss"].items()}
        c_best = min(cl, key=cl.get)
        lead = cl[c_best] - rl[best]
        same = (f"the same recurrent shape and config from random weights, trained with the same recipe for the same "
                f"{tr[CONTROL]['step']} steps ({tr[CONTROL]['flops']:.3e} FLOPs), reaches {cl[c_best]:.4f} at best "
                f"(r = {c_best}; {m[f'{CONTROL}-untrained']['loss']['1']:.4f} before training)")
        control_text = (
            (f"Reusing the pretrained layers is worth {lead:.4f} of held-out loss here: {same}, against the converted "
             f"model's {rl[best]:.4f}. " if lead > 0 else
             f"Reusing the pretrained layers bought nothing here: {same}, {-lead:.4f} below the converted model's "
             f"{rl[best]:.4f}. ")
            + "This is the retrofitting paper's control; at this budget it measures how much of the base model's "
            "knowledge the converted model keeps, not how far a randomly initialised model gets with the paper's "
            "billions of tokens.")
        control_train = (f" The control, the same recurrent shape from random weights, trained the same "
                         f"{tr[CONTROL]['step']} steps with the same recipe and depth draws: "
                         f"{tr[CONTROL]['flops']:.3e} FLOPs.")
        control_convert = (f" For the control run, `loopfit convert --init random` wrote the same shape and config "
                           f"with every weight drawn afresh (sample-text loss {conv['random_init_loss']:.3f}, chance "
                           "level).")
    distill_train, distill_text = "", ""
    if DISTILLED in m:
        kd = tr[DISTILLED]
        dl = {int(r): v for r, v in m[DISTILLED]["loss"].items()}
        d_best = min(dl, key=dl.get)
        kd_total = kd["flops"] + kd["flops_teacher"]
        distill_train = (
            f" The distilled run healed the same conversion from its base model (`distill.teacher: base`, loss = "
            f"{s['distill']['alpha']:g} x cross-entropy + {1 - s['distill']['alpha']:g} x T^2 x KL(base || recurrent), "
            f"T = {s['distill']['temperature']:g}) for {kd['step']} steps, the number that gives it the cross-entropy "
            f"run's total compute with the teacher's forward counted (2 x the base's non-embedding parameters x "
            f"tokens): {kd['flops']:.3e} + {kd['flops_teacher']:.3e} = {kd_total:.3e} FLOPs "
            f"({(kd_total - tr['recurrent']['flops']) / tr['recurrent']['flops']:+.1%}).")
        better = dl[d_best] < rl[best]
        gap = (kd_total - tr["recurrent"]["flops"]) / tr["recurrent"]["flops"]
        distill_text = (
            f"Distillation from the base {'heals further' if better else 'does not help'} here: held-out "
            f"{dl[d_best]:.4f} at best (r = {d_best}) against {rl[best]:.4f} with cross-entropy alone, in "
            f"{kd['step']} steps against {tr['recurrent']['step']} and {gap:+.1%} of its compute"
            + (" (a run this short cannot match the compute closer than one distilled step)."
               if abs(gap) > 0.05 else "."))
        if dl[d_best] < rl[best]:
            rl_best_run, best_loss = "distilled", dl[d_best]
        else:
            rl_best_run, best_loss = "cross-entropy", rl[best]
    else:
        rl_best_run, best_loss = "cross-entropy", rl[best]
    conv_loss, base_loss = m["converted"]["loss"]["1"], m["base"]["loss"]["1"]
    cost = (f"Against the plain model the best recurrent run ({rl_best_run}) still costs "
            f"{best_loss - plain_loss:+.4f} of held-out loss at about the same compute, and the gap comes from the "
            f"conversion, not from training: dropping layers {conv['dropped']} raised the held-out loss from the "
            f"base's {base_loss:.4f} to {conv_loss:.4f} before any step, {tr['recurrent']['tokens']:,} tokens of "
            "healing win back only part of that, while the plain model starts from the intact base.")
    total = sum(seconds.values())
    timing = ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
    parts = [
        f"# loopfit quickstart: {s['model']}", "",
        f"Run on {device} in {total / 60:.1f} minutes ({timing}; "
        "a re-run reuses finished stages and counts their first time).", "",
        "## What was done", "",
        f"1. **Convert** `{s['model']}` into a recurrent model: {conv['plan']}. The layers follow the paper's "
        "TinyLlama (4,8,4)-of-22 shape scaled to this model's depth (`loopfit convert`'s default); `loopfit analyze` "
        "ranks layers by the loss of removing each, but costs about a third of this CPU budget. "
        f"The adapter starts as `{s['adapter_init']}`"
        + (" ([0|I]: it hands the prelude's output to the core and ignores the recurrent state, so the model starts "
           "as the base with the dropped layers removed, at every r). The paper's random adapter starts far worse "
           "(loss ~13-16 against ~7 here) and needs far more than minutes of CPU to heal; training then teaches the "
           "adapter to use the state." if s["adapter_init"] == "passthrough" else ".")
        + f" Sample-text loss right after conversion: base {conv['base_loss']:.3f}, "
          f"converted {conv['converted_loss']:.3f}." + control_convert,
        f"2. **Prepare** the built-in corpora: {prep['line']}.",
        f"3. **Train** {'the models' if control_train else 'both models'} with {recipe_summary(recipe)}. "
        "The recurrent model trained "
        f"{tr['recurrent']['step']} steps; the plain model (every layer of the base, no recurrence) trained "
        f"{tr['plain']['step']} steps, the number that gives it the same training FLOPs by the paper's count "
        f"(6 x non-embedding parameters x tokens; loops counted for the recurrent model): "
        f"{tr['recurrent']['flops']:.3e} vs {tr['plain']['flops']:.3e} ({tr['flops_gap']:+.1%}; equal within half a "
        f"plain step, {tr['plain_flops_per_step'] / 2:.2e} FLOPs)." + distill_train + control_train,
        f"4. **Evaluate** held-out loss on {s['eval_tokens']:,} tokens of the `math` corpus' held-out split at "
        f"r = {', '.join(map(str, s['eval_steps']))}"
        + (f", and GSM8K accuracy on a fixed subset of {s['gsm8k']} test items (1-shot prompt, greedy, at most "
           f"{s['max_new_tokens']} new tokens) at r = {', '.join(map(str, s['gsm8k_steps']))}." if gsm else "."), "",
        "## At equal training FLOPs", "",
        "Training compute is the student's FLOPs by the paper's count plus, for the distilled run, the teacher's "
        "forward.", "", head, sep, *rows, *before, "",
        "![loss vs training FLOPs](compare/flops.png)", "",
        "![metric vs test-time loops r](compare/loops.png)", "",
        "![recurrent model: metric vs test-time r](runs/recurrent/eval/sweep.png)", "",
        "More detail (loss at matched FLOPs, every metric at every r): [compare/report.md](compare/report.md).", "",
        "## What this shows, and what it does not", "",
        with_r + f" Its best loss is {versus} the plain model's ({plain_loss:.4f}) at the same training FLOPs.", "",
        *([distill_text, ""] if distill_text else []),
        cost, "",
        *([control_text, ""] if control_text else []),
        f"This is a budget of {tr['recurrent']['tokens']:,} training tokens on a CPU; the paper trains for billions. "
        "What it shows: the path works end to end on a real pretrained model — conversion, data, recurrent "
        "training with curriculum and truncated backprop, a plain baseline held to the same FLOPs, and a sweep "
        "over test-time depth — and how each number moves in a few minutes. What it does not show: whether "
        "recurrence beats the plain model. Converting drops "
        f"layers {conv['dropped']} of the base "
        f"(sample-text loss {conv['base_loss']:.2f} -> {conv['converted_loss']:.2f}), "
        "more than these minutes can heal, while the plain model starts from the intact base; "
        f"{leader}. "
        "A gain (or not) from larger r at this budget is small and noisy: held-out loss is measured on "
        f"{s['eval_tokens']:,} tokens"
        + (f", and GSM8K on {s['gsm8k']} items, where models of this size score near 0% anyway: its accuracies "
           "here cannot separate the models." if gsm else "."), "",
        "## Going further", "",
        "```",
        "loopfit quickstart --minutes 30 --out quickstart-30     # train longer on the CPU",
        "loopfit quickstart --device cuda --steps 2000 --out qs-gpu   # on a GPU",
        "loopfit analyze smollm2-135m                            # rank layers before choosing them",
        "loopfit train quickstart --help                         # every recipe key",
        "```", "",
    ]
    return "\n".join(parts)


def stage_report(s, out, state, device, seconds, recipe):
    from .eval.compare import compare
    from .io import atomic_file

    runs = ["recurrent"] + ([DISTILLED] if s.get("distill") else []) + ["plain"] + ([CONTROL] if s["control"] else [])
    compare([out / "runs" / run for run in runs], out / "compare")
    text = report_text(s, state.data, device, seconds, recipe)
    with atomic_file(out / "REPORT.md", "w") as f:
        f.write(text)
    return {"line": f"wrote {out / 'REPORT.md'} (table at equal FLOPs, plots in {out / 'compare'})"}


# ------------------------------------------------------------------------------------------------ the run


def quickstart(model="smollm2-135m", out="quickstart", minutes=DEFAULT_MINUTES, steps=None, layers=None,
               adapter_init="passthrough", limit=2000, eval_loops=(1, 2, 4, 8, 16), eval_tokens=2048, gsm8k=8,
               gsm8k_loops=(1, 2, 4, 8), max_new_tokens=64, draft_loops=2, device="auto", recipe="quickstart",
               control=True, distill=True, force=False):
    """Run (or finish) the quickstart; returns the state dict (settings and each stage's summary). The arguments
    are `loopfit quickstart`'s options (see its --help); lists of r may be given as '1,2,4' or (1, 2, 4)."""
    args = SimpleNamespace(**locals())
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch first looks for a GPU (the trainer would take it)
    s = _settings(args)
    device = _device(args.device)
    out = Path(args.out)
    check_writable(out)
    state = State(out, s, args.force)
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for i, stage in enumerate(STAGES, 1):
        prefix = f"[{i}/{len(STAGES)}] {stage}"
        if stage != "report" and state.done(stage):
            _say(f"{prefix}: done earlier: {state.done(stage)['line']}")
            seconds[stage] = state.done(stage)["seconds"]
            continue
        _say(f"{prefix} ...")
        t0 = time.time()
        if stage == "convert":
            summary = stage_convert(s, out, args.recipe)
        elif stage == "prepare":
            summary = stage_prepare(s, out)
        elif stage == "train":
            summary = stage_train(s, out, args.recipe)
        elif stage == "eval":
            draft = getattr(args, "draft_loops", None)
            summary = stage_eval(s, out, device, draft or 0)
        else:
            seconds[stage] = 0.0
            summary = stage_report(s, out, state, device, seconds, args.recipe)
        seconds[stage] = time.time() - t0
        summary["seconds"] = round(seconds[stage], 1)
        state.finish(stage, summary)
        _say(f"{prefix}: {summary['line']} ({seconds[stage]:.0f} s)")
    return state.data


def run(args):
    quickstart(**vars(args))
    return 0
