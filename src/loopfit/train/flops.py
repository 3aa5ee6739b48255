"""Training FLOPs the way the paper counts them (docs/papers.md §2), and the hardware peak MFU is measured against.

Only non-embedding parameters count. The paper's count (logged as `flops`) uses P, R, C = the prelude, core and
coda blocks only, as the authors' parameter counter does: the adapter and the final norm are left out. The full
count (logged as `flops_full`) adds the adapter to R (it runs every loop) and the final norm to C.
A step over D tokens with n no-grad loops and k grad loops costs 6*D*(P + k*R + C) + 2*D*(n*R);
a plain (non-recurrent) model with N non-embedding parameters costs 6*N*D by either count. Attention's own
FLOPs are not counted (neither does the paper), so runs compare at equal compute by this measure.
"""

import time

import torch

from ..loading import is_recurrent

# Dense bf16 peak FLOP/s (no sparsity) of common accelerators, by a substring of torch.cuda.get_device_name().
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def param_counts(model):
    """Non-embedding parameters: {'prelude','core','coda','adapter','final_norm'} for a loopfit model, {'plain'}
    for any other causal LM."""
    if is_recurrent(model):
        return model.flop_groups()
    skip = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
            for p in m.parameters()}
    return {"plain": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in skip)}


def _prc(counts, full):
    p, r, c = counts["prelude"], counts["core"], counts["coda"]
    if full:
        r, c = r + counts.get("adapter", 0), c + counts.get("final_norm", 0)
    return p, r, c


def train_flops(tokens, counts, n=0, k=1, full=False):
    """FLOPs of one training step over `tokens` tokens with n no-grad and k grad loops (paper's count, or the
    full count with adapter and final norm when `full`)."""
    if "plain" in counts:
        return 6 * counts["plain"] * tokens
    p, r, c = _prc(counts, full)
    return 6 * tokens * (p + k * r + c) + 2 * tokens * (n * r)


def measure_matmul_peak(size=1024, dtype=torch.float32, device="cpu", seconds=0.5):
    """Measured FLOP/s of a square matmul: the achievable peak on a CPU (no datasheet number applies)."""
    g = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG alone (bit-exact resume)
    a = torch.randn(size, size, dtype=dtype, device=device, generator=g)
    b = torch.randn(size, size, dtype=dtype, device=device, generator=g)
    a @ b  # warm up
    n, t0 = 0, time.perf_counter()
    while True:
        a @ b
        n += 1
        if device != "cpu":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return 2 * size**3 * n / dt


def peak_flops(device, configured=0.0):
    """(FLOP/s, how it was obtained): the recipe's value, a datasheet bf16 peak for known GPUs, or a measurement."""
    if configured:
        return float(configured), "train.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value, f"{name} bf16 datasheet"
        return measure_matmul_peak(4096, torch.bfloat16, device), f"{name} measured bf16 matmul"
    return measure_matmul_peak(), "measured fp32 matmul on this CPU"
