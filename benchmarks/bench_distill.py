"""Healing a converted model from its base: distillation vs cross-entropy alone (CPU, fp32). One JSON line per part.

(heal) On the quickstart's conversion (SmolLM2-135M -> (5,10,5), passthrough adapter) and data (the built-in
    `general` and `math` corpora, 2000 documents each, 2% held out), with the shipped `quickstart` recipe: a
    cross-entropy run of --steps steps and a distillation run (teacher: base) of the same length, held-out math
    loss every --eval-every steps. Figures: the steps distillation needs to reach the cross-entropy run's final
    held-out loss, over --steps (goal <= 0.5); and, at equal total compute (the teacher's forward counted), the
    held-out loss of the cross-entropy run against a distillation run shortened to the same compute (its own
    full schedule, as the quickstart runs it).
(memory) Peak resident memory (ru_maxrss) of a `loopfit train` process taking one step of 8 x 1024 tokens (micro-
    batches of --micro) at SmolLM2's 49k vocabulary on the same conversion at --loops r (1 by default: the loss
    and the teacher are what differ; a 2-core CPU takes minutes a step at r = 4), with distillation (alpha 0.5)
    vs with cross-entropy alone, each in a fresh process; goal <= 1.3x. The step times come from the runs'
    metrics.

Usage: python benchmarks/bench_distill.py [--part heal,memory] [--steps 16] [--work DIR (reuse conversion/data)]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import emit

QUIET = ["--train.progress=false", "--train.tensorboard=false"]


def setup(work, limit):
    """The quickstart's conversion and data in WORK (made once)."""
    from loopfit.convert import convert
    from loopfit.data.prepare import prepare

    if not (work / "model" / "config.json").exists():
        convert("smollm2-135m", work / "model", layers=(5, 10, 5), adapter_init="passthrough", recurrence=4,
                parity=False, force=True, log=lambda *a: None)
    if not (work / "data" / "math").exists():
        prepare(["general", "math"], str(work / "model"), work / "data", holdout=0.02, limit=limit, force=True,
                progress=False)


def train_run(work, name, steps, batch, *extra):
    from loopfit.train.trainer import train

    out = work / "runs" / name
    if not (out / "final").exists():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        train("quickstart", [f"--model.init_from={work / 'model'}", f"--data.root={work / 'data'}",
                             f"--train.out_dir={out}", f"--train.steps={steps}", f"--train.batch_size={batch}",
                             *QUIET, *extra])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def compute(record):
    return record["flops"] + record.get("flops_teacher", 0.0)


def heal(args, work):
    setup(work, args.limit)
    every = [f"--train.eval_every={args.eval_every}", "--checkpoint.every=0"]
    teacher = ["--distill.teacher=base", f"--distill.alpha={args.alpha}", f"--distill.temperature={args.temperature}"]
    tag = f"b{args.batch}"
    ce = train_run(work, f"ce-{args.steps}-{tag}", args.steps, args.batch, *every)
    kd = train_run(work, f"distill-{args.steps}-{tag}-a{args.alpha}-t{args.temperature}", args.steps, args.batch,
                   *every, *teacher)
    ce_evals = [(r["step"], r["eval_loss"], compute(r)) for r in ce if "eval_loss" in r]
    kd_evals = [(r["step"], r["eval_loss"], compute(r)) for r in kd if "eval_loss" in r]
    target = ce_evals[-1][1]
    reached = next((step for step, loss, _ in kd_evals if loss <= target), None)
    # equal total compute: a distillation run with its own full schedule, as many steps as CE's compute buys
    per_step_ce, per_step_kd = ce_evals[-1][2] / args.steps, kd_evals[-1][2] / args.steps
    eq_steps = max(1, round(args.steps * per_step_ce / per_step_kd))
    kd_eq = train_run(work, f"distill-{eq_steps}-{tag}-a{args.alpha}-t{args.temperature}", eq_steps, args.batch,
                      *teacher)
    kd_eq_final = [r for r in kd_eq if "eval_loss" in r][-1]
    emit("distill_heal", model="smollm2-135m (5,10,5) passthrough", recipe="quickstart", steps=args.steps,
         tokens_per_step=args.batch * 128, alpha=args.alpha, temperature=args.temperature,
         ce_final_eval_loss=round(target, 4), distill_final_eval_loss=round(kd_evals[-1][1], 4),
         distill_steps_to_ce_final=reached,
         steps_ratio=None if reached is None else round(reached / args.steps, 3),
         ce_eval_curve=[[s, round(v, 4)] for s, v, _ in ce_evals],
         distill_eval_curve=[[s, round(v, 4)] for s, v, _ in kd_evals],
         teacher_share_of_compute=round(1 - per_step_ce / per_step_kd, 3),
         equal_compute={"ce_steps": args.steps, "ce_compute": ce_evals[-1][2], "ce_eval_loss": round(target, 4),
                        "distill_steps": eq_steps, "distill_compute": compute(kd_eq_final),
                        "distill_eval_loss": round(kd_eq_final["eval_loss"], 4)})


def memory_child(work, out, micro, loops, distill):
    """One `loopfit train` step in this fresh process; prints its peak RSS and step time."""
    import yaml

    from loopfit import recipes
    from loopfit.train.trainer import train

    recipe = yaml.safe_load(recipes.resolve("quickstart").read_text())
    recipe["data"] = {"synthetic": "random", "vocab_size": 49152, "seq_len": 1024}
    extra = ["--distill.teacher=base", "--distill.alpha=0.5"] if distill else []
    train(recipe, [f"--model.init_from={work / 'model'}", f"--train.out_dir={out}", "--train.steps=1",
                   "--train.batch_size=8", f"--train.micro_batch_size={micro}", "--train.eval_batches=1",
                   "--recurrence.mode=fixed", "--recurrence.curriculum=none", f"--recurrence.mean={loops}",
                   f"--recurrence.backprop={max(1, loops // 2)}", "--checkpoint.every=0", *QUIET, *extra])
    step = json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[0])
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "step_s": step["time"]}))


def memory(args, work):
    setup(work, args.limit)
    found = {}
    for kind in ("ce", "distill"):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--memory-child", str(work), os.path.join(tmp, "run"), str(args.micro),
                   str(args.loops), kind]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            found[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    gib = 2**30
    emit("distill_memory", model="smollm2-135m (5,10,5) + teacher smollm2-135m", tokens="8 x 1024",
         micro_batch=args.micro, vocab=49152, loops=args.loops, backprop=max(1, args.loops // 2),
         ratio_peak_distill_vs_ce=round(found["distill"]["peak_rss"] / found["ce"]["peak_rss"], 3),
         ce_peak_gib=round(found["ce"]["peak_rss"] / gib, 3),
         distill_peak_gib=round(found["distill"]["peak_rss"] / gib, 3),
         ce_step_s=round(found["ce"]["step_s"], 1), distill_step_s=round(found["distill"]["step_s"], 1),
         ratio_step_time=round(found["distill"]["step_s"] / found["ce"]["step_s"], 3))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="heal,memory")
    ap.add_argument("--steps", type=int, default=16, help="the cross-entropy run's steps (the quickstart's default)")
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8, help="sequences of 128 tokens a step (the quickstart's: 8)")
    ap.add_argument("--micro", type=int, default=1, help="micro-batch of the memory step (8 x 1024 in 8 / MICRO)")
    ap.add_argument("--loops", type=int, default=1, help="r of the memory step (the last r // 2 with gradients)")
    ap.add_argument("--work", help="folder for the conversion, data and runs (kept; default: a temporary one)")
    ap.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        work, out, micro, loops, kind = args.memory_child
        return memory_child(Path(work), out, int(micro), int(loops), kind == "distill")
    parts = set(args.part.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        if "memory" in parts:
            memory(args, work)
        if "heal" in parts:
            heal(args, work)


if __name__ == "__main__":
    main()
