"""Measure what test-time recurrence buys: loss and accuracy for each number of loops r.

  loopfit eval runs/smol-448 --loops 1,2,4,8,16,32 --tasks loss,gsm8k --limit 100

tasks (comma-separated):
  loss          held-out loss and perplexity (--data: a prepared folder's 'val' split, or any source `loopfit
                prepare` reads, e.g. notes.txt, qa.csv.gz:answer, saved@test:text, chats.jsonl (assistant tokens
                only); default held-out LAMBADA passages, which `loopfit prepare general` leaves out)
  gsm8k         GSM8K test, standard 8-shot chain-of-thought prompt, strict (`#### N` / `The (final) answer is N`)
                and flexible (last number) extraction
  gsm8k_1shot   GSM8K test, 1-shot "Let's think step by step." prompt (the retrofitted-recurrence paper's)
  math          MATH test (5000), Minerva 4-shot prompt, last \\boxed{} answer checked by math-verify
  math500       MATH-500, as `math`
  lm:TASK       any lm-evaluation-harness task, run through the `loopfit` lm-eval model at each r
                (offline: lm:gsm8k_loopfit, lm:gsm8k_loopfit_1shot)

A plain transformers model (the baseline) runs once and its figures are repeated at every r.
--exit kl:5e-4 lets each generated token stop looping early (r is then the most loops a token may use) and adds
a `mean_loops` row per generation task and r.
A recurrent model's sweep costs about its deepest r alone: each prompt runs once at the deepest r with the output
read at every r, the shared few-shot prefix once, and every (r, prompt) pair decodes in one batch (the same
completions as one run per r).
--draft-loops D adds exact self-speculation (the same completions): in the GSM8K / MATH sweep, every r > D drafts
at D loops in the same batch and is verified --draft-tokens at a time, so its deep loops read their weights once
for several tokens (try D = 2; the README's Benchmarks give the speed-up); lm: generations decode each r > D on
its own (worth it for one deep r at batch 1). r <= D decode plainly.
Writes OUT/results.json (one row per task, metric and r), OUT/samples.jsonl (every completion) and
OUT/sweep.png (metric vs r); OUT defaults to MODEL/eval. Generation is greedy, batched, with the KV cache;
--limit takes the same fixed random subset (--seed) for every r and every model.
--steps and --draft-steps are the deprecated names of --loops and --draft-loops (removed in the next release).
"""

import json
import time
from pathlib import Path

from .. import LoopfitError, __version__
from ..data.shards import tokenizer_fingerprint
from ..io import atomic_file, check_empty_or_force, check_writable
from ..loading import is_recurrent, load
from ..loops import DRAFT_TOKENS, check_speculation, parse_loops
from . import accuracy, loss

TASKS = ("loss", *accuracy.TASKS)
RENAMED_FLAGS = {"--steps": "--loops", "--draft-steps": "--draft-loops"}  # old names, accepted for one release


def parse_tasks(text):
    """'loss,gsm8k,lm:hellaswag' -> ['loss', 'gsm8k', 'lm:hellaswag']; unknown names are a LoopfitError."""
    tasks = [t.strip() for t in str(text).split(",") if t.strip()]
    if not tasks:
        raise LoopfitError(f"--tasks is empty: choose from {', '.join(TASKS)} or lm:TASK")
    for t in tasks:
        if t not in TASKS and not (t.startswith("lm:") and len(t) > 3):
            raise LoopfitError(f"unknown task '{t}': choose from {', '.join(TASKS)}, or lm:TASK for an lm-eval task")
    return tasks


def require_extras(tasks):
    """The optional packages the tasks need ('loopfit[eval]'), checked before the model loads."""
    from ..extras import require

    for task in tasks:
        if task.startswith("lm:"):
            require("lm_eval", f"--tasks {task}")
        elif task.startswith("math"):
            require("math_verify", f"--tasks {task}")


def run_task(task, model, tok, loops, opts):
    """(rows, samples) of one task at every r."""
    gen = {"limit": opts["limit"], "seed": opts["seed"], "batch_size": opts["batch_size"],
           "exit_criterion": opts.get("exit_criterion"), "draft_loops": opts.get("draft_loops"),
           "draft_tokens": opts.get("draft_tokens"), "chat": opts.get("chat", False)}
    if opts.get("max_new_tokens"):
        gen["max_new_tokens"] = opts["max_new_tokens"]
    if task == "loss":
        data = opts.get("data")
        if data and loss.is_prepared(data):
            rows, labels = loss.prepared_rows(data, tok, opts["seq_len"], opts["max_tokens"])
        else:
            rows, labels = loss.pack_documents(tok, loss.loss_documents(data), opts["seq_len"], opts["max_tokens"])
        return loss.evaluate(model, rows, loops, opts["batch_size"], labels), []
    if task in accuracy.TASKS:
        return accuracy.evaluate(model, tok, task, loops, **gen)
    from .harness import run_tasks

    samples = []
    rows, _ = run_tasks(model, tok, [task[3:]], loops, limit=opts["limit"], max_gen_toks=opts.get("max_new_tokens"),
                        draft_loops=opts.get("draft_loops"), draft_tokens=opts.get("draft_tokens"),
                        include_path=opts.get("include_path"), samples=samples)
    return rows, samples


def evaluate(model, loops=(1, 2, 4, 8), tasks=("loss",), out=None, limit=None, seed=1234, batch_size=8,
             max_new_tokens=None, data=None, seq_len=512, max_tokens=16384, plot=True, exit_criterion=None,
             draft_loops=None, draft_tokens=DRAFT_TOKENS, include_path=None, chat=False):
    """Run `tasks` at each r in `loops` on a model folder / name (or a loaded (model, tokenizer) pair).
    `exit_criterion` ('kl:5e-4') lets generated tokens stop looping early (recurrent models); `draft_loops` D
    decodes generations at every r > D by exact self-speculation (`draft_tokens` a round). `chat` renders the
    GSM8K / MATH prompts with the model's chat template (the exemplars as earlier turns), for a chat-finetuned model.
    `include_path`: folders of your own lm-eval task YAMLs for `lm:` tasks.
    Returns the results dict and, when `out` is given, writes results.json, samples.jsonl and sweep.png there."""
    loops = parse_loops(loops)
    tasks = parse_tasks(",".join(tasks) if not isinstance(tasks, str) else tasks)
    name = str(model) if not isinstance(model, tuple) else getattr(model[0].config, "_name_or_path", "model")
    lm_tasks = [t[3:] for t in tasks if t.startswith("lm:")]
    if lm_tasks:  # unknown names are refused before the model loads
        from .harness import check_tasks

        check_tasks(lm_tasks, include_path)
    model, tok = model if isinstance(model, tuple) else load(model)
    recurrent = is_recurrent(model)
    if exit_criterion:
        check_exit(exit_criterion, recurrent)
    check_speculation(model, loops, draft_loops, draft_tokens or DRAFT_TOKENS, exit_criterion)
    run_loops = loops if recurrent else loops[:1]  # a plain model ignores r: run once
    opts = dict(limit=limit, seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens, data=data,
                seq_len=seq_len, max_tokens=max_tokens, exit_criterion=exit_criterion, draft_loops=draft_loops,
                draft_tokens=draft_tokens, include_path=include_path, chat=chat)
    if chat:
        from ..data.chat import resolve_template

        resolve_template(tok, None, "--chat")  # a tokenizer without a chat template is refused before any work
    rows, samples, started = [], [], time.time()
    for task in tasks:
        task_rows, task_samples = run_task(task, model, tok, run_loops, opts)
        rows += task_rows if recurrent else [dict(row, loops=r) for row in task_rows for r in loops]
        samples += task_samples
    results = {
        "model": name,
        "recurrent": recurrent,
        "train_mean_recurrence": getattr(model.config, "mean_recurrence", None) if recurrent else None,
        "tokenizer": tokenizer_fingerprint(tok),
        "loops": loops,
        "tasks": tasks,
        "settings": {k: v for k, v in opts.items()},
        "rows": rows,
        "seconds": round(time.time() - started, 1),
        "loopfit_version": __version__,
    }
    if out is not None:
        write(results, samples, out, plot)
    return results


def check_exit(spec, recurrent):
    """Refuse an adaptive-exit rule that is malformed or given for a plain model, before any work is done."""
    from ..model import exit_rule

    if not recurrent:
        raise LoopfitError("--exit needs a loopfit (recurrent) model; this one is plain: drop --exit")
    try:
        exit_rule(spec)
    except ValueError as e:
        raise LoopfitError(str(e)) from None


def write(results, samples, out, plot=True):
    out = Path(out)
    with atomic_file(out / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    with atomic_file(out / "samples.jsonl", "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    if plot and results["rows"]:
        from .plots import plot_sweep

        title = f"{Path(results['model']).name} ({'recurrent' if results['recurrent'] else 'plain: r ignored'})"
        plot_sweep(results["rows"], out / "sweep.png", title, results.get("train_mean_recurrence"))


def table(rows):
    """Markdown table: one line per (task, metric), one column per r."""
    loops = sorted({row["loops"] for row in rows})
    cells = {}
    for row in rows:
        cells.setdefault((row["task"], row["metric"]), {})[row["loops"]] = row["value"]
    lines = ["| task | metric | " + " | ".join(f"r={r}" for r in loops) + " |",
             "|---|---|" + "---:|" * len(loops)]
    for (task, metric), by_r in cells.items():
        vals = [f"{by_r[r]:.4g}" if r in by_r else "" for r in loops]
        lines.append(f"| {task} | {metric} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("model", metavar="MODEL",
                        help="loopfit or plain transformers folder, .gguf file, or short name")
    from ..cli import options_of

    option = options_of(parser, evaluate)
    option("--loops", metavar="R,...", help="test-time loops r, comma-separated (default %(default)s)")
    option("--tasks", help=f"comma-separated: {', '.join(TASKS)}, lm:TASK (default %(default)s)")
    option("--limit", type=int, help="evaluate a fixed random subset of this many examples per task")
    option("--seed", type=int, help="seed of the --limit subset (default %(default)s)")
    option("--max-new-tokens", type=int, help="generation budget (default 256 GSM8K, 512 MATH)")
    option("--batch-size", type=int, help="prompts (or loss rows) per batch (default %(default)s)")
    option("--data", metavar="SOURCE", help="loss text: a prepared folder, or a source as `loopfit prepare` takes "
           "it (FILE[:FIELD], SAVED[@SPLIT][:FIELD], GLOB, built-in name)")
    option("--seq-len", type=int, help="loss sequence length (default %(default)s)")
    parser.add_argument("--chat", action="store_true", help="render the GSM8K / MATH prompts with the model's chat "
                        "template, the exemplars as earlier turns (for a model finetuned on conversations, e.g. by "
                        "the sft recipe); answers are scored the same way")
    option("--max-tokens", type=int, help="loss tokens in all (default %(default)s)")
    parser.add_argument("--exit", dest="exit_criterion", metavar="RULE",
                        help="adaptive exit while generating, e.g. latent:0.005:1 (the rule that saves time; see "
                        "`loopfit generate --help`) or kl:5e-4; adds a mean_loops row per r")
    parser.add_argument("--draft-loops", type=int, metavar="D", help="decode generations at each r > D by exact "
                        "self-speculation, drafting at D loops: inside the GSM8K / MATH sweep, each r on its own "
                        "for lm: tasks (same completions; try 2)")
    option("--draft-tokens", type=int, metavar="K", help="tokens drafted per round with --draft-loops "
           "(default %(default)s)")
    parser.add_argument("--out", help="output folder (default MODEL/eval for a folder, else eval-NAME); must be "
                        "empty or new unless --force")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out (replacing results.json, "
                        "samples.jsonl, sweep.png)")
    parser.add_argument("--include-path", action="append", metavar="DIR", help="a folder of your own lm-eval task "
                        "YAMLs for --tasks lm:NAME (repeatable)")
    parser.add_argument("--log-to", metavar="RUN_DIR", help="also add the r-sweep to the training run in RUN_DIR "
                        "(its train.out_dir): RUN_DIR/sweep.jsonl, its TensorBoard and the trackers of its "
                        "train.loggers (wandb, mlflow, trackio)")


def run(args):
    if args.limit is not None and args.limit < 1:
        raise LoopfitError(f"--limit must be a positive number of examples, got {args.limit}")
    for flag in ("seq_len", "max_tokens", "batch_size", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise LoopfitError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    loops, tasks = parse_loops(args.loops), parse_tasks(args.tasks)  # refused before the model loads
    require_extras(tasks)
    if args.exit_criterion:
        check_exit(args.exit_criterion, recurrent=True)  # the rule's syntax; plain models are refused once loaded
    if args.data and not loss.is_prepared(args.data):
        try:  # a missing file or a bad record is refused before the model loads
            next(iter(loss.loss_documents(args.data)), None)
        except LoopfitError as e:
            raise LoopfitError(f"--data: {e}") from None
    out = args.out or (Path(args.model) / "eval" if Path(args.model).is_dir()
                       else Path(f"eval-{Path(args.model).stem}"))
    check_writable(out)
    check_empty_or_force(out, args.force)
    if args.log_to:
        from ..train.trackers import run_loggers

        loggers, recipe = run_loggers(args.log_to)  # before the model loads
    results = evaluate(args.model, loops, tasks, out=out, limit=args.limit,
                       seed=args.seed, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                       data=args.data, seq_len=args.seq_len, max_tokens=args.max_tokens,
                       exit_criterion=args.exit_criterion, draft_loops=args.draft_loops,
                       draft_tokens=args.draft_tokens, include_path=args.include_path, chat=args.chat)
    if args.log_to:
        from ..train.trackers import log_sweep

        log_sweep(args.log_to, results["rows"], loggers, recipe)
    print(table(results["rows"]))
    print(f"wrote {out}/results.json, samples.jsonl, sweep.png ({results['seconds']} s)")
