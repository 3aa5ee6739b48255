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

(d) the same r = 1 step with loopfit's blocks compiled (train.compile) and its lean loss, vs transformers' eager
    step: target <= 0.75; and compiled vs eager loopfit (compilation itself excluded: warm-up steps).
(e) Muon's share of a quickstart-shaped step (SmolLM2 (5,10,5), 8 x 128 tokens in 2 micro-batches, r = 4, k = 2):
    Muon.step time over the whole step, batched Newton-Schulz vs one matrix at a time; target <= 25%.
(f) loss memory: peak RSS increment of next-token loss + backward over hidden [tokens, 576] and a head
    [vocab, 576], full fp32 logits vs loopfit's chunked loss, at vocab 49152 and 151936; target >= 4x less.
    --loss-tokens 8192,8192 is the goal's 8 x 1024 tokens at both (the full 152k logits then take ~14 GB).
(g) activation checkpointing of the core at (4,8,4), r = 32, k = 8, on --ckpt-batch x --ckpt-seq tokens (2 x 512:
    at 8 x 1024 the unchecked step's activations alone would need ~40 GB, and a step ~5 CPU minutes): peak memory
    and step time vs none, both of steady-state steps (one warm-up step first, so the optimizer state exists and
    the first-call costs are paid). Memory and time come from separate fresh processes: memory with glibc set to
    mmap blocks over 64 KiB (MEMORY_ENV), so a freed block leaves RSS and the measured step's peak RSS (reset
    after the warm-up) is its own: the step's increment (activations + gradients + optimizer temporaries) and the
    whole process's peak (weights and optimizer state included); time with the default allocator (mmap is
    slower). Targets <= 0.6x peak memory, <= 1.35x time.

Usage: python benchmarks/bench_train.py [--batch 4 --seq 256 --mem-batch 2 --mem-seq 128] [--only a,d,e,f,g]
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from _common import emit, interleaved

from loopfit.convert import LayerPlan, build_loopfit, convert
from loopfit.loading import load_base
from loopfit.train.config import OptimConfig
from loopfit.train.flops import measure_matmul_peak, param_counts, train_flops
from loopfit.train.optim import build_optimizers


def train_step(model, ids, lean=False, **kw):
    """One optimizer step the way the trainer takes it (loss on next tokens, clip 1.0, Muon + AdamW); `lean`: the
    loss of a loopfit model without the full logits, as the trainer computes it."""
    opts = build_optimizers(model, OptimConfig())

    def run():
        if lean:
            model(input_ids=ids, labels=ids, return_logits=False, use_cache=False, **kw).loss.backward()
        else:
            logits = model(input_ids=ids, use_cache=False, **kw).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return run


def rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def vm_kib(field):
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def reset_peak_rss():
    """Linux: set the process's peak RSS (VmHWM) back to its current RSS (proc(5), clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# glibc keeps freed blocks below its (growing) mmap threshold for reuse, so RSS would stay at an earlier step's
# peak: a fixed 64 KiB threshold mmaps every larger block and returns it to the system when freed.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def warm_memory_child(folder, n, k, batch, seq, checkpointing):
    """In a fresh process: a warm-up train step at num_steps=(n, k), then one measured step: its time, its peak RSS
    (VmHWM reset after the warm-up) and the RSS before it."""
    from transformers import AutoModelForCausalLM

    import loopfit  # noqa: F401
    from loopfit.train.performance import set_activation_checkpointing

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    set_activation_checkpointing(model, checkpointing)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    step = train_step(model, ids, lean=True, num_steps=(n, k))  # the trainer's loss, without the full logits
    step()
    before = vm_kib("VmRSS") * 1024
    reset_peak_rss()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    print(json.dumps({"peak_rss": vm_kib("VmHWM") * 1024, "rss_before_step": before, "step_s": seconds}))


def memory_child(folder, n, k, batch, seq, checkpointing="none"):
    """In a fresh process: load the slice, take one warm-up-free train step at num_steps=(n, k), report peak RSS."""
    from transformers import AutoModelForCausalLM

    import loopfit  # noqa: F401
    from loopfit.train.performance import set_activation_checkpointing

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    set_activation_checkpointing(model, checkpointing)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    step = train_step(model, ids, num_steps=(n, k))
    before = rss_bytes()
    t0 = time.perf_counter()
    step()
    dt = time.perf_counter() - t0
    flops = train_flops(batch * seq, param_counts(model), n, k)
    print(json.dumps({"peak_rss": rss_bytes(), "rss_before_step": before, "step_s": dt, "flops": flops}))


def measure_memory(folder, n, k, batch, seq, checkpointing="none", warm=False, env=None):
    cmd = [sys.executable, __file__, "--warm-child" if warm else "--child", folder, str(n), str(k), str(batch),
           str(seq), checkpointing]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800,
                         env=dict(os.environ, **(env or {}))).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mem-batch", type=int, default=2)
    ap.add_argument("--mem-seq", type=int, default=128)
    ap.add_argument("--loss-tokens", default="8192,2048", help="tokens of the loss-memory check at 49k, 152k "
                    "(8192,8192 is the goal's 8 x 1024; the full logits at 152k then take ~14 GB)")
    ap.add_argument("--ckpt-batch", type=int, default=2, help="batch of the activation checkpointing check (g)")
    ap.add_argument("--ckpt-seq", type=int, default=512, help="sequence length of the checkpointing check (g)")
    ap.add_argument("--only", default="a,d,e,f,g", help="which parts to run (a includes b and c)")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--warm-child", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--loss-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        folder, n, k, batch, seq, ckpt = args.child
        return memory_child(folder, int(n), int(k), int(batch), int(seq), ckpt)
    if args.warm_child:
        folder, n, k, batch, seq, ckpt = args.warm_child
        return warm_memory_child(folder, int(n), int(k), int(batch), int(seq), ckpt)
    if args.loss_child:
        return loss_memory_child(*map(int, args.loss_child[:2]), args.loss_child[2])
    only = set(args.only.split(","))
    for part, fn in (("d", bench_compiled), ("e", bench_muon_share), ("f", bench_loss_memory),
                     ("g", bench_checkpointing)):
        if part in only:
            fn(args)
    if "a" not in only:
        return

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


def r1_models():
    """transformers' SmolLM2-135M and its loopfit conversion keeping every layer, at r = 1 (equal FLOPs)."""
    torch.manual_seed(0)
    base, _ = load_base("smollm2-135m")
    n = base.config.num_hidden_layers
    every = LayerPlan([0, 1, 2, 3], list(range(4, n - 4)), list(range(n - 4, n)), n)
    loop = build_loopfit(base, every, adapter_init="passthrough", recurrence=1)
    for m in (base, loop):
        m.train()
    return base, loop


def bench_compiled(args):
    import copy

    from loopfit.train.performance import compile_blocks

    base, loop = r1_models()
    compiled = compile_blocks(copy.deepcopy(loop))
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq))
    t0 = time.perf_counter()
    step = train_step(compiled, ids, lean=True, num_steps=1)
    step()
    first = time.perf_counter() - t0
    t = interleaved({"hf": train_step(base, ids), "eager": train_step(loop, ids, lean=True, num_steps=1),
                     "compiled": step}, repeats=args.repeats, warmup=1)
    emit("train_step_compiled", batch=args.batch, seq=args.seq, model="SmolLM2-135M, every layer, r = 1",
         ratio_compiled_vs_transformers=round(t["compiled"] / t["hf"], 3),
         ratio_eager_vs_transformers=round(t["eager"] / t["hf"], 3),
         ratio_compiled_vs_eager=round(t["compiled"] / t["eager"], 3),
         transformers_step_s=round(t["hf"], 3), eager_step_s=round(t["eager"], 3),
         compiled_step_s=round(t["compiled"], 3), first_compiled_step_s=round(first, 1),
         note="loopfit steps use the lean loss (no full logits); transformers' its own full-logit loss")


def bench_muon_share(args):
    from loopfit.train import optim

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "smol-5105")
        convert("smollm2-135m", folder, layers=(5, 10, 5), parity=False, log=lambda *a: None)
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    opts = build_optimizers(model, OptimConfig(lr=1e-3, adamw_lr=1e-4))
    ids = torch.randint(0, model.config.vocab_size, (8, 128))

    def fwd_bwd():
        for rows in (slice(0, 4), slice(4, 8)):
            model(input_ids=ids[rows], labels=ids[rows], return_logits=False, num_steps=(2, 2)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

    fwd_bwd()
    muon, adamw = opts
    batched = optim._same_shape_batches
    one_at_a_time = lambda ts: [[i] for i in range(len(ts))]
    times = {"fwd_bwd": [], "muon_batched": [], "muon_per_matrix": [], "adamw": []}
    for _ in range(args.repeats + 1):
        t0 = time.perf_counter()
        fwd_bwd()
        times["fwd_bwd"].append(time.perf_counter() - t0)
        for name, fn in (("muon_per_matrix", one_at_a_time), ("muon_batched", batched)):
            optim._same_shape_batches = fn
            t0 = time.perf_counter()
            muon.step()
            times[name].append(time.perf_counter() - t0)
        optim._same_shape_batches = batched
        t0 = time.perf_counter()
        adamw.step()
        times["adamw"].append(time.perf_counter() - t0)
    med = {k: sorted(v[1:])[len(v[1:]) // 2] for k, v in times.items()}
    step = lambda m: med["fwd_bwd"] + m + med["adamw"]
    emit("muon_share", model="SmolLM2 (5,10,5)", tokens="2 micro-batches of 4 x 128", num_steps=(2, 2),
         share_batched=round(med["muon_batched"] / step(med["muon_batched"]), 3),
         share_per_matrix=round(med["muon_per_matrix"] / step(med["muon_per_matrix"]), 3),
         muon_batched_s=round(med["muon_batched"], 3), muon_per_matrix_s=round(med["muon_per_matrix"], 3),
         fwd_bwd_s=round(med["fwd_bwd"], 3), adamw_s=round(med["adamw"], 3))


def loss_memory_child(tokens, vocab, kind):
    from loopfit.model import causal_lm_loss, linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens + 1, 576, generator=g).requires_grad_()
    weight = (torch.randn(vocab, 576, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens + 1), generator=g)
    before = rss_bytes()
    if kind == "full":
        causal_lm_loss(hidden @ weight.T, labels).backward()
    else:
        linear_cross_entropy(hidden, weight, labels).backward()
    print(json.dumps({"increment": rss_bytes() - before}))


def bench_loss_memory(args):
    out = {}
    for vocab, tokens in zip((49152, 151936), map(int, args.loss_tokens.split(","))):
        inc = {}
        for kind in ("full", "chunked"):
            cmd = [sys.executable, __file__, "--loss-child", str(tokens), str(vocab), kind]
            inc[kind] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)["increment"]
        out[f"vocab_{vocab}"] = {"tokens": tokens, "full_gib": round(inc["full"] / 2**30, 3),
                                 "chunked_gib": round(inc["chunked"] / 2**30, 3),
                                 "ratio_full_vs_chunked": round(inc["full"] / inc["chunked"], 2)}
    emit("loss_memory", hidden=576, measure="peak RSS increment of loss + backward in a fresh process", **out)


def bench_checkpointing(args):
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "smol-484")
        convert("smollm2-135m", folder, layers=(4, 8, 4), parity=False, log=lambda *a: None)
        shape = (24, 8, args.ckpt_batch, args.ckpt_seq)
        res = {c: measure_memory(folder, *shape, c, warm=True, env=MEMORY_ENV) for c in ("none", "core")}
        timed = {c: measure_memory(folder, *shape, c, warm=True)["step_s"] for c in ("none", "core")}
    inc = {c: r["peak_rss"] - r["rss_before_step"] for c, r in res.items()}
    gib = 2**30
    emit("activation_checkpointing", slice="SmolLM2 (4,8,4)", num_steps=(24, 8), batch=args.ckpt_batch,
         seq=args.ckpt_seq, measure="train steps (fwd, bwd with the lean loss, clip, Muon + AdamW), fresh "
         "processes: 1 warm-up step, then 1 step's peak RSS (VmHWM reset; glibc mmaps blocks > 64 KiB) and, in "
         "another process, 1 step's time",
         step_increment_ratio_core_vs_none=round(inc["core"] / inc["none"], 3),
         peak_rss_ratio_core_vs_none=round(res["core"]["peak_rss"] / res["none"]["peak_rss"], 3),
         time_ratio_core_vs_none=round(timed["core"] / timed["none"], 3),
         step_increment_none_gib=round(inc["none"] / gib, 3), step_increment_core_gib=round(inc["core"] / gib, 3),
         peak_rss_none_gib=round(res["none"]["peak_rss"] / gib, 3),
         peak_rss_core_gib=round(res["core"]["peak_rss"] / gib, 3),
         step_s_none=round(timed["none"], 2), step_s_core=round(timed["core"], 2))


if __name__ == "__main__":
    main()
