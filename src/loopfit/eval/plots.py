"""PNG plots of results rows ({'task', 'loops', 'metric', 'value'}): one panel per kind of metric."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..io import atomic_file  # noqa: E402
from .loading import normalise_rows  # noqa: E402

ACCURACY_PREFIXES = ("accuracy", "acc", "exact_match")  # lm-eval's acc, acc_norm, exact_match_strict-match, ...


def panel_of(metric):
    """Which panel a metric goes in: accuracies share one axis in [0, 1], losses another, perplexity its own."""
    if metric.startswith(ACCURACY_PREFIXES):
        return "accuracy"
    return metric


def lines(rows, key=("task", "metric")):
    """{(task, metric): [(loops r, value), ...] sorted by r}."""
    out = {}
    for row in rows:
        out.setdefault(tuple(row[k] for k in key), []).append((row["loops"], row["value"]))
    return {k: sorted(v) for k, v in out.items()}


def draw(ax, rows, label, **style):
    """One line of (r, value) rows: with error bars where the rows carry a stderr, and n in the label."""
    rows = sorted(rows, key=lambda row: row["loops"])
    xs, ys = [row["loops"] for row in rows], [row["value"] for row in rows]
    counts = {row.get("n") for row in rows if row.get("n")}
    if len(counts) == 1:
        label = f"{label} (n={counts.pop()})"
    errors = [row.get("stderr") for row in rows]
    if any(e is not None for e in errors):
        ax.errorbar(xs, ys, yerr=[e or 0.0 for e in errors], capsize=3, label=label, **style)
    else:
        ax.plot(xs, ys, label=label, **style)


def save(fig, path):
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_sweep(rows, path, title="", train_mean=None):
    """Metric vs test-time loops r, one line per task and metric, log2 r axis; `train_mean`: the training mean r."""
    rows = [r for r in normalise_rows(rows) if r["metric"] != "perplexity"]  # exp(loss): shown by the loss panel
    panels = sorted({panel_of(r["metric"]) for r in rows}, key=lambda p: (p != "accuracy", p))
    ticks = sorted({r["loops"] for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        groups = {}
        for r in rows:
            if panel_of(r["metric"]) == panel:
                groups.setdefault((r["task"], r["metric"]), []).append(r)
        for (task, metric), group in groups.items():
            draw(ax, group, f"{task} {metric.removeprefix('accuracy_')}".strip(), marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("loops r (test time)")
        ax.set_ylabel(panel)
        if panel == "accuracy":
            ax.set_ylim(0, 1)
        if train_mean:
            ax.axvline(train_mean, color="grey", linestyle=":", label=f"train mean r = {train_mean}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    save(fig, path)
    return path
