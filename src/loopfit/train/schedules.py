"""Learning-rate schedules as pure functions: lr_factor(step, total) -> multiplier of each group's base lr.

- `constant`: optional linear warmup, then 1.
- `cosine`:   linear warmup, then cosine from 1 to `floor`.
- `wsd`:      warmup-stable-decay: linear warmup, flat, then the last `decay` fraction of steps falls to `floor`
              with a `decay_shape` of linear, cosine or 1-sqrt (docs/papers.md §2: warmup 0.25-0.5%, decay 60-90%).
- `cpt`:      continued pretraining (docs/papers.md §5): start at the given lr with no warmup, cosine to `floor`
              (default 1/100 of the start). A data blend can switch when the factor falls to 1/5.

The multiplier is relative to the start/peak lr; `lr_fraction` is what the data blend reads (the same, but 1
during warmup, so a switch at lr_start / 5 means after the peak, never in the first steps of a warmup).
"""

import math


def _warmup_steps(warmup, total):
    """`warmup` < 1 is a fraction of training, otherwise a number of steps."""
    return int(round(warmup * total)) if 0 < warmup < 1 else int(warmup)


def _decay(x, shape):
    """1 -> 0 as x goes 0 -> 1."""
    x = min(max(x, 0.0), 1.0)
    if shape == "linear":
        return 1.0 - x
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * x))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(x)
    raise ValueError(f"unknown decay shape {shape!r}")


def lr_factor(step, total, name="wsd", warmup=0.0, decay=0.8, decay_shape="cosine", floor=0.001):
    """Multiplier of the base lr at 0-based `step` of `total`; the last step lands exactly on `floor`."""
    w = _warmup_steps(warmup, total)
    if name == "cpt":
        w, decay, decay_shape = 0, 1.0, "cosine"
    if step < w:
        return (step + 1) / w
    if name == "constant":
        return 1.0
    if name in ("cosine", "cpt"):
        start = w
    elif name == "wsd":
        start = max(w, total - int(round(decay * total)))
    else:
        raise ValueError(f"unknown schedule {name!r}")
    if step < start:
        return 1.0
    x = (step - start) / max(1, total - 1 - start)
    return floor + (1.0 - floor) * _decay(x, decay_shape)


def lr_fraction(step, total, name="wsd", warmup=0.0, decay=0.8, decay_shape="cosine", floor=0.001):
    """lr / lr_start for the data blend's lr-triggered switch: 1 during warmup, then `lr_factor`."""
    if name != "cpt" and step < _warmup_steps(warmup, total):
        return 1.0
    return lr_factor(step, total, name, warmup, decay, decay_shape, floor)
