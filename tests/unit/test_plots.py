"""Sweep plots: accuracy axes stay in [0, 1] (lm-eval's exact_match and acc included), lines carry n and error
bars where the rows have a stderr."""

from matplotlib.container import ErrorbarContainer

from loopfit.eval import plots


def test_sweep_plot_has_error_bars_n_and_an_accuracy_axis_in_0_1(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(plots, "save", lambda fig, path: saved.append(fig))
    rows = [{"task": "lm:my_qa", "loops": r, "metric": "exact_match_strict-match", "value": v, "n": 40,
             "stderr": 0.05} for r, v in ((1, 0.1), (2, 0.3))]
    rows += [{"task": "gsm8k", "loops": r, "metric": "accuracy_strict", "value": 0.02, "n": 40} for r in (1, 2)]
    rows += [{"task": "loss", "loops": r, "metric": "loss", "value": 3.0 - r} for r in (1, 2)]
    plots.plot_sweep(rows, tmp_path / "sweep.png")
    accuracy, loss = saved[0].axes
    assert accuracy.get_ylabel() == "accuracy" and accuracy.get_ylim() == (0, 1)
    labels = [t.get_text() for t in accuracy.get_legend().get_texts()]
    assert "lm:my_qa exact_match_strict-match (n=40)" in labels and "gsm8k strict (n=40)" in labels
    assert sum(isinstance(c, ErrorbarContainer) for c in accuracy.containers) == 1  # only the row with a stderr
    assert loss.get_ylabel() == "loss" and not loss.containers
