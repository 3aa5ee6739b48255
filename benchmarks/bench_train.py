"""Training-step benchmarks on the real SmolLM2-135M (CPU, fp32). Prints one JSON line with:

(a) a full train step (forward, backward, grad clip, Muon + AdamW step) of the converted model with every layer kept
    at r = 1 vs transformers' LlamaForCausalLM on the same batch (equal FLOPs, bar the 2h x h adapter):
    ratio loopfit / transformers, target <= 1.0.
(b) peak memory of a train step at r = 32 vs r = 8 with backprop k = 8, num_steps = (24, 8) vs (0, 8), on a
    (4,8,4) SmolLM2 slice: each measured in a fresh subprocess as the process's peak resident set size
    (ru_maxrss, which also counts weights, grads and optimizer state), target <= 1.1: truncated backprop must
    not keep the activations of the no-grad loops. The step's own increment (peak - RSS before it) is given too.
(c) MFU on this CPU: train FLOPs/s by the paper's accounting (loopfit.train.flops: non-embedding params only,
    attention not counted) over a measured fp32 matmul peak (flops.measure_matmul_peak).

Usage: python benchmarks/bench_train.py [--batch 4 --seq 256 --mem-batch 2 --mem-seq 128]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from _common import emit, interleaved
from loopfit.convert import LayerPlan, build_loopfit, convert, load_base
from loopfit.train.config import OptimConfig
from loopfit.train.flops import measure_matmul_peak, param_counts, train_flops
from loopfit.train.optim import build_optimizers


def train_step(model, ids, **kw):
    """One optimizer step the way the trainer takes it (loss on next tokens, clip 1.0, Muon + AdamW)."""
    opts = build_optimizers(model, OptimConfig())

    def run():
        logits = model(input_ids=ids, use_cache=False, **kw).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return run


def rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_child(folder, n, k, batch, seq):
    """In a fresh process: load the slice, take one warm-up-free train step at num_steps=(n, k), report peak RSS."""
    from transformers import AutoModelForCausalLM

    import loopfit  # noqa: F401

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    step = train_step(model, ids, num_steps=(n, k))
    before = rss_bytes()
    t0 = time.perf_counter()
    step()
    dt = time.perf_counter() - t0
    flops = train_flops(batch * seq, param_counts(model), n, k)
    print(json.dumps({"peak_rss": rss_bytes(), "rss_before_step": before, "step_s": dt, "flops": flops}))


def measure_memory(folder, n, k, batch, seq):
    cmd = [sys.executable, __file__, "--child", folder, str(n), str(k), str(batch), str(seq)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1200).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mem-batch", type=int, default=2)
    ap.add_argument("--mem-seq", type=int, default=128)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        folder, n, k, batch, seq = args.child
        return memory_child(folder, int(n), int(k), int(batch), int(seq))

    # (b) first, in fresh processes, before this process holds two models
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "smol-484")
        convert("smollm2-135m", folder, layers=(4, 8, 4), parity=False, log=lambda *a: None)
        r8 = measure_memory(folder, 0, 8, args.mem_batch, args.mem_seq)
        r32 = measure_memory(folder, 24, 8, args.mem_batch, args.mem_seq)

    # (a) and (c)
    torch.manual_seed(0)
    base, _ = load_base("smollm2-135m")
    n = base.config.num_hidden_layers
    every = LayerPlan([0, 1, 2, 3], list(range(4, n - 4)), list(range(n - 4, n)), n)
    loop = build_loopfit(base, every, adapter_init="passthrough", recurrence=1)
    for m in (base, loop):
        m.train()
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq))
    t = interleaved({"hf": train_step(base, ids), "loopfit": train_step(loop, ids, num_steps=1)}, repeats=args.repeats)
    tokens = args.batch * args.seq
    flops_r1 = train_flops(tokens, param_counts(loop), 0, 1)
    peak = measure_matmul_peak(seconds=2.0)

    gib = 2**30
    emit("train_step", batch=args.batch, seq=args.seq,
         ratio_loopfit_vs_transformers=round(t["loopfit"] / t["hf"], 3),
         transformers_step_s=round(t["hf"], 3), loopfit_step_s=round(t["loopfit"], 3),
         loopfit_tokens_per_s=round(tokens / t["loopfit"], 1),
         memory_slice="SmolLM2 (4,8,4)", memory_batch=args.mem_batch, memory_seq=args.mem_seq,
         memory_measure="ru_maxrss of a fresh process: load + one train step (fwd, bwd, Muon+AdamW)",
         peak_rss_ratio_r32_vs_r8=round(r32["peak_rss"] / r8["peak_rss"], 3),
         peak_rss_r8_gib=round(r8["peak_rss"] / gib, 3), peak_rss_r32_gib=round(r32["peak_rss"] / gib, 3),
         step_increment_ratio_r32_vs_r8=round((r32["peak_rss"] - r32["rss_before_step"])
                                              / (r8["peak_rss"] - r8["rss_before_step"]), 3),
         step_increment_r8_gib=round((r8["peak_rss"] - r8["rss_before_step"]) / gib, 3),
         step_increment_r32_gib=round((r32["peak_rss"] - r32["rss_before_step"]) / gib, 3),
         step_s_r8=round(r8["step_s"], 2), step_s_r32=round(r32["step_s"], 2),
         peak_fp32_matmul_flops=round(peak / 1e9, 1) * 1e9,
         mfu_r1_every_layer=round(flops_r1 / t["loopfit"] / peak, 4),
         mfu_484_r8=round(r8["flops"] / r8["step_s"] / peak, 4),
         mfu_484_r32=round(r32["flops"] / r32["step_s"] / peak, 4),
         flops_accounting="paper's: 6D(P+kR+C) + 2D nR, non-embedding params, attention not counted")


if __name__ == "__main__":
    main()
