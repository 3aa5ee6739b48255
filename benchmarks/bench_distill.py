"""Healing a converted model from its base: distillation vs cross-entropy alone (CPU, fp32). One JSON line per part.

(heal) On the quickstart's conversion (SmolLM2-135M -> (5,10,5), passthrough adapter) and data (the built-in
    `general` and `math` corpora, 2000 documents each, 2% held out), with the shipped `quickstart` recipe: a
    cross-entropy run of --steps steps and a distillation run (teacher: base) of the same length, held-out math
    loss every --eval-every steps. Figures: the steps distillation needs to reach the cross-entropy run's final
    held-out loss, over --steps (goal <= 0.5); and, at equal total compute (the teacher's forward counted), the
    held-out loss of the cross-entropy run against a distillation run shortened to the same compute (its own
    full schedule, as the quickstart runs it, with --full-schedule; else its held-out loss at the last step within
    that compute).
(memory) Peak resident memory (ru_maxrss) of a `loopfit train` process taking one step of --mem-batch x --mem-seq
    tokens (8 x 1024 by default, in micro-batches of --micro) at SmolLM2's 49k vocabulary on the same conversion
    at --loops r (1 by default: the loss and the teacher are what differ), with distillation (alpha 0.5) vs with
    cross-entropy alone, each in a fresh process; goal <= 1.3x. The step times come from the runs' metrics.
    The chunked losses hold one chunk of logits whatever the tokens, so fewer tokens (a 2-core CPU takes tens of
    minutes for 8 x 1024) leave the teacher's weights a larger share: the ratio there is an upper bound.

Usage: python benchmarks/bench_distill.py [--part heal,memory] [--steps 16] [--lr 0.002] [--alpha 0]
    [--work DIR (reuse conversion/data)]
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
    every = [f"--train.eval_every={args.eval_every}", f"--train.eval_batches={args.eval_batches}",
             "--checkpoint.every=0"]
    teacher = ["--distill.teacher=base", f"--distill.alpha={args.alpha}", f"--distill.temperature={args.temperature}"]
    lr = [f"--optim.lr={args.lr}"] if args.lr else []  # both runs: the two losses compared at one recipe
    tag = f"b{args.batch}" + (f"-lr{args.lr:g}" if args.lr else "")
    ce = train_run(work, f"ce-{args.steps}-{tag}", args.steps, args.batch, *every, *lr)
    kd = train_run(work, f"distill-{args.steps}-{tag}-a{args.alpha}-t{args.temperature}", args.steps, args.batch,
                   *every, *lr, *teacher)
    ce_evals = [(r["step"], r["eval_loss"], compute(r)) for r in ce if "eval_loss" in r]
    kd_evals = [(r["step"], r["eval_loss"], compute(r)) for r in kd if "eval_loss" in r]
    target = ce_evals[-1][1]
    reached = next((step for step, loss, _ in kd_evals if loss <= target), None)
    per_step_ce, per_step_kd = ce_evals[-1][2] / args.steps, kd_evals[-1][2] / args.steps
    # equal total compute: the distillation run's last held-out loss within the CE run's total compute (its
    # schedule not yet decayed there); with --full-schedule also a run of that many steps with its own schedule
    budget = ce_evals[-1][2]
    within = [e for e in kd_evals if e[2] <= budget * (1 + 1e-9)]
    equal = {"ce_steps": args.steps, "ce_compute": budget, "ce_eval_loss": round(target, 4),
             "distill_step": within[-1][0] if within else None, "distill_compute": within[-1][2] if within else None,
             "distill_eval_loss": round(within[-1][1], 4) if within else None}
    if args.full_schedule:
        eq_steps = max(1, round(args.steps * per_step_ce / per_step_kd))
        kd_eq = train_run(work, f"distill-{eq_steps}-{tag}-a{args.alpha}-t{args.temperature}", eq_steps, args.batch,
                          f"--train.eval_batches={args.eval_batches}", *lr, *teacher)
        kd_eq_final = [r for r in kd_eq if "eval_loss" in r][-1]
        equal["full_schedule"] = {"distill_steps": eq_steps, "distill_compute": compute(kd_eq_final),
                                  "distill_eval_loss": round(kd_eq_final["eval_loss"], 4)}
    emit("distill_heal", model="smollm2-135m (5,10,5) passthrough", recipe="quickstart", steps=args.steps,
         tokens_per_step=args.batch * 128, lr=args.lr or "recipe", alpha=args.alpha, temperature=args.temperature,
         ce_final_eval_loss=round(target, 4), distill_final_eval_loss=round(kd_evals[-1][1], 4),
         distill_steps_to_ce_final=reached,
         steps_ratio=None if reached is None else round(reached / args.steps, 3),
         ce_eval_curve=[[s, round(v, 4)] for s, v, _ in ce_evals],
         distill_eval_curve=[[s, round(v, 4)] for s, v, _ in kd_evals],
         teacher_share_of_compute=round(1 - per_step_ce / per_step_kd, 3),
         equal_compute=equal)


def memory_child(work, out, batch, seq, micro, loops, distill):
    """One `loopfit train` step in this fresh process; prints its peak RSS and step time."""
    import yaml

    from loopfit import recipes
    from loopfit.train.trainer import train

    recipe = yaml.safe_load(recipes.resolve("quickstart").read_text())
    recipe["data"] = {"synthetic": "random", "vocab_size": 49152, "seq_len": seq}
    extra = ["--distill.teacher=base", "--distill.alpha=0.5"] if distill else []
    train(recipe, [f"--model.init_from={work / 'model'}", f"--train.out_dir={out}", "--train.steps=1",
                   f"--train.batch_size={batch}", f"--train.micro_batch_size={micro}", "--train.eval_batches=1",
                   "--recurrence.mode=fixed", "--recurrence.curriculum=none", f"--recurrence.mean={loops}",
                   f"--recurrence.backprop={max(1, loops // 2)}", "--checkpoint.every=0", *QUIET, *extra])
    step = json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[0])
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "step_s": step["time"]}))


def memory(args, work):
    setup(work, args.limit)
    found = {}
    for kind in ("ce", "distill"):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--memory-child", str(work), os.path.join(tmp, "run"),
                   str(args.mem_batch), str(args.mem_seq), str(args.micro), str(args.loops), kind]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            found[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    gib = 2**30
    emit("distill_memory", model="smollm2-135m (5,10,5) + teacher smollm2-135m",
         tokens=f"{args.mem_batch} x {args.mem_seq}",
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
    ap.add_argument("--eval-every", type=int, default=1)
    ap.add_argument("--eval-batches", type=int, default=4, help="held-out batches (the quickstart recipe's: 4)")
    ap.add_argument("--full-schedule", action="store_true", help="also a distillation run shortened to the CE "
                    "run's total compute with its own full schedule")
    ap.add_argument("--lr", type=float, help="Muon's lr in both runs (default: the quickstart recipe's)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8, help="sequences of 128 tokens a step (the quickstart's: 8)")
    ap.add_argument("--mem-batch", type=int, default=8, help="sequences of the memory step")
    ap.add_argument("--mem-seq", type=int, default=1024, help="tokens a sequence in the memory step")
    ap.add_argument("--micro", type=int, default=8, help="micro-batch of the memory step")
    ap.add_argument("--loops", type=int, default=1, help="r of the memory step (the last r // 2 with gradients)")
    ap.add_argument("--work", help="folder for the conversion, data and runs (kept; default: a temporary one)")
    ap.add_argument("--memory-child", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        work, out, batch, seq, micro, loops, kind = args.memory_child
        return memory_child(Path(work), out, int(batch), int(seq), int(micro), int(loops), kind == "distill")
    parts = set(args.part.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        if "memory" in parts:
            memory(args, work)
        if "heal" in parts:
            heal(args, work)


if __name__ == "__main__":
    main()
