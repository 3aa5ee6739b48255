"""How many loops each optimizer step runs: Huginn's Poisson-lognormal sampler, its curriculum, a fixed mode.

Every function here is pure and seeded by (seed, step, micro-batch) only, so all ranks draw the same depth (FSDP
needs every rank to loop alike) and a resumed run draws exactly what the uninterrupted run drew. By default a
new depth is drawn for every micro-batch, as the paper authors' trainer does (`recurrence.depth_per: step` draws
one per optimizer step). The curriculum's ramp lasts ceil(curriculum_fraction * steps) steps, as theirs.

Sampling rule (docs/papers.md §2), with s = min(k_max, rbar) the backprop depth:
    t = max(rbar - s, 0);  mu = ln(t + s) - sigma^2 / 2;  lam ~ LogNormal(mu, sigma)
    p = Poisson(lam) + 1;  n = max(p - s, 0) loops without grad;  k = min(s, p) loops with grad
E[p] = rbar + 1 (the +1 guarantees at least one loop). For rbar >= k_max this is Huginn's rule exactly; for
rbar < k_max (early in a curriculum) Huginn's rule would keep the mean at k_max + 1 and ignore rbar, so the
backprop depth is capped at rbar there and the mean follows the curriculum.
"""

import math

import numpy as np

SIGMA = 0.5


def curriculum_fraction(x, shape):
    """Ramp shape f(x) on x in [0, 1]: 'linear' (x), '1-sqrt' (1 - sqrt(1 - x), stays low longer), 'none' (1)."""
    x = min(max(float(x), 0.0), 1.0)
    if shape == "linear":
        return x
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(1.0 - x)
    if shape == "none":
        return 1.0
    raise ValueError(f"unknown curriculum shape {shape!r}")


def curriculum_value(step, ramp_steps, max_value, shape):
    """max(1, ceil(max_value * f(step / ramp_steps))) while ramping, then max_value."""
    if shape == "none" or ramp_steps <= 0 or step >= ramp_steps:
        return int(max_value)
    return max(1, math.ceil(max_value * curriculum_fraction(step / ramp_steps, shape)))


def sample_depth(step, mean, backprop, seed=0, micro=None):
    """(n, k) for this step (and micro-batch `micro` of it): n loops under no_grad, then k loops with gradients."""
    s = max(1, min(int(backprop), int(mean)))
    t = max(mean - s, 0)
    key = [int(seed), int(step), 0x100F] if micro is None else [int(seed), int(step), int(micro), 0x100F]
    rng = np.random.default_rng(key)
    mu = math.log(t + s) - SIGMA**2 / 2
    lam = rng.lognormal(mu, SIGMA)
    p = int(rng.poisson(lam)) + 1
    return max(p - s, 0), min(s, p)


def fixed_depth(r, backprop):
    """(n, k) for exactly r loops of which the last min(r, backprop) get gradients."""
    k = min(int(r), int(backprop))
    return int(r) - k, k


def depth_for_step(step, total_steps, cfg, seed=0, micro=None):
    """(n, k, rbar, kmax) for one step (one micro-batch of it if `micro` is given) from the `recurrence` recipe
    section (see RecurrenceConfig)."""
    ramp = math.ceil(cfg.curriculum_fraction * total_steps - 1e-9)  # rounded up; 1e-9 absorbs 0.7 * 10 = 7.000...1
    rbar, kmax = int(cfg.mean), int(cfg.backprop)
    if cfg.curriculum_target in ("mean", "both"):
        rbar = curriculum_value(step, ramp, cfg.mean, cfg.curriculum)
    if cfg.curriculum_target in ("backprop", "both"):
        kmax = curriculum_value(step, ramp, cfg.backprop, cfg.curriculum)
    if cfg.mode == "fixed":
        n, k = fixed_depth(rbar, kmax)
    else:
        n, k = sample_depth(step, rbar, kmax, seed, micro)
    return n, k, rbar, kmax
