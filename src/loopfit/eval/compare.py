"""Compare runs at equal training compute: the recurrent model against the plain one trained on the same FLOPs.

  loopfit compare runs/smol-448 runs/smol-plain --out reports/smol

Each RUN is a `loopfit train` output folder (RUN/metrics.jsonl: lines with step, tokens, flops = cumulative
training FLOPs by the paper's count, flops_teacher = a distillation teacher's forward FLOPs, loss, eval_loss)
and/or a `loopfit eval` output (results.json, looked for in RUN, RUN/eval and RUN/final/eval).
Writes OUT/report.md with:
  - the runs (recurrent or plain, tokens, training FLOPs, tokenizer),
  - loss at matched FLOPs: each run's last logged loss at or below the largest FLOPs all runs reached,
  - eval metrics at every test r, with each run's training FLOPs named,
and OUT/flops.png (loss vs training FLOPs, one line per run) and OUT/loops.png (eval metric vs test-time loops r).
Results files written before the loops rename (rows with "steps" for r) are read as well.
Runs of different tokenizers are compared with a warning: their losses are not on the same scale.
"Training FLOPs" is a run's total compute: the student's FLOPs plus, for a distilled run, its teacher's forward.
"""

import json
import sys
import warnings
from pathlib import Path

from .. import LoopfitError
from ..io import atomic_file, check_empty_or_force, check_writable
from ..loading import is_recurrent
from .loading import normalise_rows
from .plots import draw, panel_of, save

RESULTS_PLACES = ("results.json", "eval/results.json", "final/eval/results.json")


# ------------------------------------------------------------------------------------------------ reading


def read_metrics(run):
    """Training records of a run (list of dicts, in step order); [] if the run has no metrics.jsonl."""
    from ..train.metrics import read_records

    records, notes = read_records(Path(run) / "metrics.jsonl")
    for note in notes:  # a run killed in the middle of an append: the rest of it still compares
        warnings.warn(note, stacklevel=2)
    return records


def read_results(run):
    """The `loopfit eval` results of a run (dict) or None."""
    run = Path(run)
    for place in ((run,) if run.is_file() else [run / p for p in RESULTS_PLACES]):
        if place.is_file():
            try:
                results = json.loads(place.read_text())
            except (ValueError, UnicodeDecodeError):
                raise LoopfitError(f"{place} is not valid JSON (truncated?): run `loopfit eval` again to rewrite "
                                   "it") from None
            return dict(results, rows=normalise_rows(results.get("rows", [])))
    return None


def read_run(path):
    """{'name', 'path', 'metrics', 'results', 'recurrent', 'tokenizer', 'flops', 'tokens'} of one run."""
    path = Path(path)
    if not path.exists():
        raise LoopfitError(f"run {path} does not exist: pass `loopfit train` output folders or eval results.json files")
    metrics, results = read_metrics(path), read_results(path)
    if not metrics and results is None:
        raise LoopfitError(f"{path} has neither metrics.jsonl nor eval results: pass a `loopfit train` out_dir "
                           f"or run `loopfit eval` on it first")
    recurrent = results["recurrent"] if results else is_recurrent(path / "final")
    with_flops = [m for m in metrics if compute(m) is not None]
    return {
        "name": path.stem if path.is_file() else path.name,
        "path": str(path),
        "metrics": metrics,
        "results": results,
        "recurrent": bool(recurrent),
        "tokenizer": (results or {}).get("tokenizer") or _folder_fingerprint(path / "final"),
        "flops": compute(with_flops[-1]) if with_flops else None,
        "tokens": with_flops[-1].get("tokens") if with_flops else None,
    }


def _folder_fingerprint(folder):
    if not (folder / "tokenizer_config.json").exists() and not (folder / "tokenizer.json").exists():
        return None
    from ..data.shards import tokenizer_fingerprint

    try:
        return tokenizer_fingerprint(folder)
    except LoopfitError:
        return None


def tokenizer_warning(runs):
    """A warning line if the runs do not share one tokenizer, else None."""
    known = {r["tokenizer"] for r in runs if r["tokenizer"]}
    if len(known) > 1:
        names = ", ".join(f"{r['name']} ({r['tokenizer']})" for r in runs)
        return f"runs use different tokenizers, so their losses are not comparable: {names}"
    return None


# ------------------------------------------------------------------------------------------------ figures


def compute(record):
    """The training compute of a metrics record: the student's FLOPs plus a distillation teacher's (or None)."""
    if record.get("flops") is None:
        return None
    return record["flops"] + (record.get("flops_teacher") or 0.0)


def series(metrics, key):
    """[(training compute, value)] of the records that have both."""
    return [(compute(m), m[key]) for m in metrics if compute(m) is not None and m.get(key) is not None]


def at_flops(points, budget):
    """The last (flops, value) at or below `budget`, or None."""
    below = [p for p in points if p[0] <= budget * (1 + 1e-9)]
    return below[-1] if below else None


def matched_budget(runs):
    """The largest training FLOPs every run reached (None if some run has no FLOPs)."""
    totals = [r["flops"] for r in runs]
    return None if not totals or any(t is None for t in totals) else min(totals)


def kind(run):
    return "recurrent" if run["recurrent"] else "plain"


def fmt(x, spec=".4g"):
    return "" if x is None else format(x, spec)


def plot_flops(runs, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(runs):
        color = f"C{i}"
        name = run["name"] if run["name"] == kind(run) else f"{run['name']} ({kind(run)})"
        for key, style, what in (("loss", "-", "train loss"), ("eval_loss", "o--", "held-out loss")):
            pts = series(run["metrics"], key)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, color=color, alpha=0.9 if key == "eval_loss" else 0.6,
                        label=f"{name}: {what}")
    budget = matched_budget(runs)
    if budget:
        ax.axvline(budget, color="grey", linestyle=":", label=f"matched FLOPs {budget:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (paper's count: non-embedding parameters)")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, path)


def plot_loops(runs, path):
    import matplotlib.pyplot as plt

    rows = [dict(row, run=r["name"]) for r in runs if r["results"] for row in r["results"]["rows"]
            if row["metric"] != "perplexity"]
    recurrent = {r["name"]: r["recurrent"] for r in runs}
    panels = sorted({panel_of(r["metric"]) for r in rows}, key=lambda p: (p != "accuracy", p))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    ticks = sorted({r["loops"] for r in rows})
    for ax, panel in zip(axes[0], panels):
        lines = {}
        for r in rows:
            if panel_of(r["metric"]) == panel:
                lines.setdefault((r["run"], r["task"], r["metric"]), []).append(r)
        for (run, task, metric), group in lines.items():
            what = metric.removeprefix("accuracy_")
            label = f"{run}: {task}" if what == task else f"{run}: {task} {what}"
            if recurrent.get(run, True):
                draw(ax, group, label, marker="o")
            else:  # a plain model has no loops: r changes nothing, so draw it as a level
                draw(ax, group, f"{label} (no loops)", linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("loops r (test time)")
        ax.set_ylabel(panel)
        if panel == "accuracy":
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, path)


# ------------------------------------------------------------------------------------------------ report


def runs_table(runs):
    lines = ["| run | model | tokens | training FLOPs | final loss | held-out loss | tokenizer |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in runs:
        last_loss = next((m["loss"] for m in reversed(r["metrics"]) if m.get("loss") is not None), None)
        last_eval = next((m["eval_loss"] for m in reversed(r["metrics"]) if m.get("eval_loss") is not None), None)
        lines.append(f"| {r['name']} | {kind(r)} | {fmt(r['tokens'], ',')} | {fmt(r['flops'], '.3e')} | "
                     f"{fmt(last_loss)} | {fmt(last_eval)} | {r['tokenizer'] or '?'} |")
    return "\n".join(lines)


def matched_table(runs, budget):
    lines = [f"Matched training compute: **{budget:.3e} FLOPs** (the least any run reached). Each value is the "
             "run's last logged one at or below it, with the FLOPs where it was logged.", "",
             "| run | model | loss | at FLOPs | held-out loss | at FLOPs |", "|---|---|---:|---:|---:|---:|"]
    for r in runs:
        loss = at_flops(series(r["metrics"], "loss"), budget)
        ev = at_flops(series(r["metrics"], "eval_loss"), budget)
        lines.append(f"| {r['name']} | {kind(r)} | {fmt(loss and loss[1])} | {fmt(loss and loss[0], '.3e')} | "
                     f"{fmt(ev and ev[1])} | {fmt(ev and ev[0], '.3e')} |")
    return "\n".join(lines)


def eval_table(runs):
    rows = [(r, row) for r in runs if r["results"] for row in r["results"]["rows"]]
    if not rows:
        return "No eval results: run `loopfit eval RUN/final --loops ...` to add accuracy by loops r."
    loops = sorted({row["loops"] for _, row in rows})
    cells = {}
    for r, row in rows:
        cells.setdefault((row["task"], row["metric"], r["name"]), {})[row["loops"]] = row["value"]
    flops = {r["name"]: r["flops"] for r in runs}
    lines = ["| task | metric | run | training FLOPs | " + " | ".join(f"r={n}" for n in loops) + " |",
             "|---|---|---|---:|" + "---:|" * len(loops)]
    for (task, metric, name), by_r in sorted(cells.items()):
        vals = " | ".join(fmt(by_r.get(n)) for n in loops)
        lines.append(f"| {task} | {metric} | {name} | {fmt(flops[name], '.3e')} | {vals} |")
    return "\n".join(lines)


def report(runs, warning=None):
    budget = matched_budget(runs)
    parts = ["# loopfit comparison", ""]
    if warning:
        parts += [f"> **Warning:** {warning}", ""]
    parts += ["## Runs", "", runs_table(runs), ""]
    if budget:
        parts += ["## Loss at matched training FLOPs", "", matched_table(runs, budget), "",
                  "![loss vs training FLOPs](flops.png)", ""]
    parts += ["## Eval metrics by test-time loops r", "", eval_table(runs), ""]
    if any(r["results"] for r in runs):
        parts += ["![metric vs loops r](loops.png)", ""]
        totals = {r["flops"] for r in runs if r["results"]}
        if len(totals) > 1 and None not in totals and max(totals) > 1.05 * min(totals):
            parts += ["Eval results come from each run's final model; their training FLOPs differ by more than 5%, "
                      "so read them with the FLOPs column.", ""]
    return "\n".join(parts)


def compare(paths, out):
    """Read the runs, write OUT/report.md, flops.png and loops.png; returns the report text."""
    if len(paths) < 1:
        raise LoopfitError("compare needs at least one run: loopfit compare RUN_A RUN_B --out REPORT")
    runs = [read_run(p) for p in paths]
    names = [r["name"] for r in runs]
    for r in runs:  # same folder names (e.g. two .../final): disambiguate with the parent
        if names.count(r["name"]) > 1:
            r["name"] = f"{Path(r['path']).parent.name}/{r['name']}"
    warning = tokenizer_warning(runs)
    if warning:
        warnings.warn(warning, stacklevel=2)
    out = Path(out)
    if matched_budget(runs):
        plot_flops(runs, out / "flops.png")
    if any(r["results"] for r in runs):
        plot_loops(runs, out / "loops.png")
    text = report(runs, warning)
    with atomic_file(out / "report.md", "w") as f:
        f.write(text)
    return text


def add_arguments(parser):
    parser.add_argument("runs", nargs="+", metavar="RUN", help="`loopfit train` out_dirs and/or eval results.json")
    parser.add_argument("--out", required=True, help="report folder (report.md, flops.png, loops.png); must be "
                        "empty or new unless --force")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out (replacing the report)")


def run(args):
    check_writable(args.out)
    check_empty_or_force(args.out, args.force)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = compare(args.runs, args.out)
    for w in caught:
        print(f"loopfit compare: warning: {w.message}", file=sys.stderr)
    print(text)
    print(f"wrote {args.out}/report.md")
