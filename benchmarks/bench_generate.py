"""Greedy generation tokens/s of a converted SmolLM2 (4,8,4) at r = 4: exact KV cache vs no cache, and the
bounded ring cache. Prints one JSON line.  Usage: python benchmarks/bench_generate.py [--new 32]"""

import argparse

import torch
from _common import emit, interleaved

from loopfit.convert import build_loopfit, plan_layers
from loopfit.loading import load_base


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--loops", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    base, _ = load_base("smollm2-135m")
    model = build_loopfit(base, plan_layers(base.config.num_hidden_layers, (4, 8, 4)), recurrence=args.loops)
    ring = build_loopfit(base, plan_layers(base.config.num_hidden_layers, (4, 8, 4)), recurrence=args.loops,
                         cache_policy="ring", cache_ring_size=1)
    del base
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt))
    kw = dict(num_steps=args.loops, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)

    def gen(m, use_cache):
        return lambda: m.generate(ids, use_cache=use_cache, **kw)

    with torch.no_grad():
        same = torch.equal(gen(model, True)(), gen(model, False)())
        t = interleaved({"exact": gen(model, True), "none": gen(model, False), "ring": gen(ring, True)},
                        repeats=2, warmup=0)
    emit("generate_cache", loops=args.loops, prompt=args.prompt, new_tokens=args.new,
         exact_cache_tokens_per_s=round(args.new / t["exact"], 2), no_cache_tokens_per_s=round(args.new / t["none"], 2),
         ring1_cache_tokens_per_s=round(args.new / t["ring"], 2),
         speedup_exact_vs_no_cache=round(t["none"] / t["exact"], 2), cached_equals_uncached=same)


if __name__ == "__main__":
    main()
