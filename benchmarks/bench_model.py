"""Forward+backward of the converted SmolLM2-135M vs transformers' own model on the same batch.

Prints one JSON line: ratio loopfit / transformers at r = 1 with every layer kept (target <= 1.0), and the cost
of r = 4 vs r = 1 for the paper-style (4,8,4) model.  Usage: python benchmarks/bench_model.py [--seq 256]
"""

import argparse

import torch
from _common import emit, interleaved

from loopfit.convert import LayerPlan, build_loopfit, plan_layers
from loopfit.loading import load_base


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    base, _ = load_base("smollm2-135m")
    n = base.config.num_hidden_layers
    identity = build_loopfit(base, LayerPlan([0, 1, 2, 3], list(range(4, n - 4)), list(range(n - 4, n)), n),
                             adapter_init="passthrough", recurrence=1)
    paper = build_loopfit(base, plan_layers(n, (4, 8, 4)), recurrence=4)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq))
    for m in (base, identity, paper):
        m.train()

    def step(model, **kw):
        def run():
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids, **kw).loss.backward()
        return run

    t = interleaved({"hf": step(base), "loopfit_r1": step(identity, num_steps=1),
                     "paper_r1": step(paper, num_steps=1), "paper_r4": step(paper, num_steps=4)},
                    repeats=args.repeats)
    tokens = args.batch * args.seq
    emit("model_fwd_bwd", batch=args.batch, seq=args.seq,
         ratio_loopfit_vs_transformers=round(t["loopfit_r1"] / t["hf"], 3),
         transformers_s=round(t["hf"], 3), loopfit_r1_s=round(t["loopfit_r1"], 3),
         loopfit_tokens_per_s=round(tokens / t["loopfit_r1"], 1),
         ratio_r4_vs_r1_484=round(t["paper_r4"] / t["paper_r1"], 3),
         r1_484_s=round(t["paper_r1"], 3), r4_484_s=round(t["paper_r4"], 3))


if __name__ == "__main__":
    main()
