"""Evaluation figures on converted SmolLM2-135M at r = 8. Prints one JSON line.

(a) GSM8K 1-shot prompts, batched greedy generation: tokens/s with the exact KV cache vs the bounded ring cache
    (config default: 2 slots per core layer), on the paper's (4,8,4) slice with its random adapter; the cache
    sizes and how many tokens the ring cache changes. End to end (prompt pass included, which dominates on a CPU)
    and decode only: (N-token run - 1-token run), the same prompts.
(b) KL adaptive exit on a fixed GSM8K subset (1-shot prompt, short budget): mean loops per real token against
    r = 8, and accuracy with and without the exit. Every layer is kept (prelude 0-23, core 24-25, coda 26-29) with
    the `mean` adapter and `embed` state init, so r = 1 is exactly SmolLM2 and loops iterate a working model.

Usage: python benchmarks/bench_eval.py [--items 16] [--new 48] [--exit kl:1e-3] [--threads 1]
"""

import argparse
import time

import torch
from _common import emit, interleaved

from loopfit.convert import LayerPlan, build_loopfit, plan_layers
from loopfit.eval import accuracy, items
from loopfit.eval.extract import flexible_answer
from loopfit.eval.prompts import gsm8k_prompt
from loopfit.loading import load_base


def cache_mb(cache):
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in cache.slots.values()) / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loops", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4, help="(a): prompts per generate call")
    ap.add_argument("--gen", type=int, default=32, help="(a): new tokens per prompt")
    ap.add_argument("--items", type=int, default=16, help="(b): GSM8K test items (fixed subset, seed 1234)")
    ap.add_argument("--new", type=int, default=48, help="(b): max new tokens per item")
    ap.add_argument("--exit", default="kl:1e-3", help="(b): adaptive exit rule")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared 2-core machine thrashes at 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, tok = load_base("smollm2-135m")
    tok.pad_token = tok.pad_token or tok.eos_token
    problems = items.subset(items.gsm8k_test(), args.items, seed=1234)

    # (a) exact vs ring cache, same weights: the policy is read from the config when generate makes its cache
    paper = build_loopfit(base, plan_layers(30, (4, 8, 4)), recurrence=args.loops)
    batch = tok([gsm8k_prompt(p["question"], "1shot") for p in problems[: args.batch]], return_tensors="pt",
                padding=True, padding_side="left")
    kw = dict(num_steps=args.loops, max_new_tokens=args.gen, min_new_tokens=args.gen, do_sample=False,
              pad_token_id=tok.pad_token_id)
    outs, sizes = {}, {}

    # the model is an argument, not read from main's scope: main deletes `paper` before (b) to free its memory
    def gen(sliced, policy, n):
        def call():
            sliced.config.cache_policy = policy
            cache = sliced.new_cache()
            out = sliced.generate(**batch, past_key_values=cache, **{**kw, "max_new_tokens": n, "min_new_tokens": n})
            outs[policy], sizes[policy] = out[:, -n:], cache_mb(cache)
        return call

    with torch.no_grad():
        calls = {f"{p}_{n}": gen(paper, p, n) for n in (1, args.gen) for p in ("exact", "ring")}
        t = interleaved(calls, repeats=2, warmup=0)
        del calls
    new_tokens = args.batch * args.gen
    decode = {p: args.batch * (args.gen - 1) / (t[f"{p}_{args.gen}"] - t[f"{p}_1"]) for p in ("exact", "ring")}

    # (b) KL exit on GSM8K
    model = build_loopfit(base, LayerPlan(list(range(24)), [24, 25], [26, 27, 28, 29], 30), adapter_init="mean",
                          state_init="embed", recurrence=args.loops)
    del base, paper
    runs = {}
    for name, rule in (("full", None), ("exit", args.exit)):
        t0 = time.perf_counter()
        rows, samples = accuracy.evaluate(model, tok, "gsm8k_1shot", [args.loops], limit=args.items, seed=1234,
                                          max_new_tokens=args.new, batch_size=8, exit_criterion=rule)
        runs[name] = {"seconds": time.perf_counter() - t0, "rows": {r["metric"]: r["value"] for r in rows},
                      "completions": [s["completion"] for s in samples]}
    full, ex = runs["full"], runs["exit"]
    same_answer = sum(flexible_answer(a) == flexible_answer(b) for a, b in zip(full["completions"], ex["completions"]))
    same_text = sum(a == b for a, b in zip(full["completions"], ex["completions"]))

    emit("eval", model="smollm2-135m", loops=args.loops,
         cache_model="(4,8,4) random adapter", cache_batch=args.batch, cache_prompt_tokens=batch.input_ids.shape[1],
         cache_new_tokens=args.gen,
         exact_cache_tokens_per_s=round(new_tokens / t[f"exact_{args.gen}"], 2),
         ring_cache_tokens_per_s=round(new_tokens / t[f"ring_{args.gen}"], 2),
         ring_vs_exact_speed=round(t[f"exact_{args.gen}"] / t[f"ring_{args.gen}"], 3),
         exact_decode_tokens_per_s=round(decode["exact"], 2), ring_decode_tokens_per_s=round(decode["ring"], 2),
         ring_vs_exact_decode_speed=round(decode["ring"] / decode["exact"], 3),
         exact_cache_mb=round(sizes["exact"], 1), ring_cache_mb=round(sizes["ring"], 1),
         ring_token_agreement=round((outs["ring"] == outs["exact"]).float().mean().item(), 3),
         exit_model="every layer kept: prelude 0-23, core 24-25, coda 26-29, mean adapter, embed state",
         exit_rule=args.exit, gsm8k_items=args.items, gsm8k_prompt="1shot", max_new_tokens=args.new,
         mean_loops_with_exit=round(ex["rows"]["mean_loops"], 3),
         loops_saved=round(1 - ex["rows"]["mean_loops"] / args.loops, 3),
         accuracy_strict_full=full["rows"]["accuracy_strict"], accuracy_strict_exit=ex["rows"]["accuracy_strict"],
         accuracy_flexible_full=full["rows"]["accuracy_flexible"],
         accuracy_flexible_exit=ex["rows"]["accuracy_flexible"],
         same_answer_items=same_answer, same_completion_items=same_text,
         seconds_full=round(full["seconds"], 1), seconds_exit=round(ex["seconds"], 1),
         exit_time_ratio=round(ex["seconds"] / full["seconds"], 3))


if __name__ == "__main__":
    main()
