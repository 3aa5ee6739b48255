"""The eval sweep over r, before and after: `loopfit eval --tasks gsm8k_1shot --loops 1,2,4,8 --limit 8` (the
quickstart's eval stage) and its held-out loss at r = 1, 2, 4, 8, 16. Prints one JSON line per part.

  before   one run per r, and a KV cache that copies itself at every token (loopfit before the sweep: the
           cache's update then was `torch.cat`, reproduced here as `copying_update`)
  per_r    one run per r, the in-place cache
  sweep    what `loopfit eval` does without --draft-loops: one run of the deepest r with the coda read at every r
           (`sweep`), the shared few-shot prefix cached once, the prompts' own tokens packed without padding,
           every (r, prompt) pair decoded in one batch (`row_steps`), the r's of a prompt that agree so far
           sharing one row's loops
  speculative  the same sweep with --draft-loops D (default 2): the r > D draft at D loops in the same batch and
           are verified --draft-tokens at a time, each pair keeping its own agreeing prefix
Completions and losses must agree across the four (asserted: identical completions, losses to 1e-4).

Model: SmolLM2-135M in the quickstart's shape (5,10,5) with the `mean` adapter and `embed` state, whose greedy
tokens change with r (the fraction of completions that differ between r = 1 and the deepest r is reported), or
--model FOLDER (e.g. a quickstart's trained model, `quickstart/runs/recurrent/final`).

Usage: cd benchmarks && OMP_NUM_THREADS=1 python bench_eval_sweep.py [--items 8] [--loops 1,2,4,8] [--new 64]
       [--draft-loops 2] [--draft-tokens 4] [--loss-loops 1,2,4,8,16] [--loss-tokens 2048] [--model FOLDER]
       [--parts gsm8k,loss] [--device cpu]
"""

import argparse
import time
from contextlib import contextmanager

import torch
from _common import emit, sync

from loopfit.convert import build_loopfit, plan_layers
from loopfit.eval import accuracy, items
from loopfit.eval.generation import generate_at
from loopfit.eval.loss import evaluate as loss_sweep
from loopfit.eval.loss import pack, read_texts
from loopfit.loading import load, load_base
from loopfit.model import DRAFT_TOKENS, LoopfitCache


def copying_update(self, key, k, v):
    """LoopfitCache.update before this change: every write copies the slot's whole history (torch.cat)."""
    start, old = self.start, self.slots.get(key)
    have = 0 if old is None else old[0].shape[2]
    if have < start:
        fk, fv = self._earlier(key, start)
        old = (fk[:, :, :start], fv[:, :, :start]) if old is None else (
            torch.cat([old[0], fk[:, :, have:start]], 2), torch.cat([old[1], fv[:, :, have:start]], 2))
    if old is None or start == 0:
        new = (k, v)
    else:
        new = (torch.cat([old[0][:, :, :start], k], 2), torch.cat([old[1][:, :, :start], v], 2))
    self.slots[key] = new
    return new


@contextmanager
def copying_cache():
    inplace = LoopfitCache.update
    LoopfitCache.update = copying_update
    try:
        yield
    finally:
        LoopfitCache.update = inplace


def ints(text):
    return [int(x) for x in text.split(",") if x]


def gsm8k(model, tok, args):
    task = accuracy.TASKS["gsm8k_1shot"]
    prompts = [task.prompt(it["question"]) for it in items.subset(task.items(), args.items, seed=1234)]

    def per_r():
        return {r: generate_at(model, tok, prompts, r, "gsm8k_1shot", args.new, task.stop, 8)[0] for r in args.loops}

    def sweep(draft_loops=None):
        _, samples = accuracy.evaluate(model, tok, "gsm8k_1shot", args.loops, limit=args.items, seed=1234,
                                       max_new_tokens=args.new, batch_size=8, draft_loops=draft_loops,
                                       draft_tokens=args.draft_tokens)
        return {r: [s["completion"] for s in samples if s["loops"] == r] for r in args.loops}

    def speculative():
        return sweep(args.draft_loops)

    seconds, outs = {}, {}
    for name, run in (("before", per_r), ("per_r", per_r), ("sweep", sweep), ("speculative", speculative)):
        sync(args.device)
        t0 = time.perf_counter()
        if name == "before":
            with copying_cache():
                outs[name] = run()
        else:
            outs[name] = run()
        sync(args.device)
        seconds[name] = time.perf_counter() - t0
        print(name, round(seconds[name], 1), "s", flush=True)
    same = [a == b == c == e for r in args.loops
            for a, b, c, e in zip(outs["before"][r], outs["per_r"][r], outs["sweep"][r], outs["speculative"][r])]
    # on the CPU every row's arithmetic is the same in any batch; a GPU's kernels may reduce in another order for
    # another batch shape, and an fp32 rounding difference can flip a near-tie: there the agreement is reported
    assert all(same) or args.device != "cpu", "the sweep changed a completion"
    low, high = min(args.loops), max(args.loops)
    emit("eval_sweep_gsm8k", model=args.model_name, items=args.items, loops=args.loops, max_new_tokens=args.new,
         before_seconds=round(seconds["before"], 1), per_r_seconds=round(seconds["per_r"], 1),
         sweep_seconds=round(seconds["sweep"], 1), speedup_vs_before=round(seconds["before"] / seconds["sweep"], 2),
         speedup_vs_per_r=round(seconds["per_r"] / seconds["sweep"], 2), draft_loops=args.draft_loops,
         draft_tokens=args.draft_tokens, speculative_seconds=round(seconds["speculative"], 1),
         speculative_speedup_vs_before=round(seconds["before"] / seconds["speculative"], 2),
         speculative_speedup_vs_sweep=round(seconds["sweep"] / seconds["speculative"], 2),
         identical_completions=sum(same) / len(same),
         differ_low_vs_high_r=sum(a != b for a, b in zip(outs["sweep"][low], outs["sweep"][high])) / args.items)


def loss(model, tok, args):
    rows = pack(tok, read_texts(), seq_len=256, max_tokens=args.loss_tokens).to(args.device)

    def per_r():
        with torch.no_grad():
            return [sum(model(input_ids=rows[i:i + 4], labels=rows[i:i + 4], num_steps=r).loss.item()
                        * (rows[i:i + 4].numel() - len(rows[i:i + 4])) for i in range(0, len(rows), 4))
                    / (rows.numel() - len(rows)) for r in args.loss_loops]

    def sweep():
        return [row["value"] for row in loss_sweep(model, rows, args.loss_loops) if row["metric"] == "loss"]

    seconds, outs = {}, {}
    for name, run in (("per_r", per_r), ("sweep", sweep)):
        t0 = time.perf_counter()
        outs[name] = run()
        seconds[name] = time.perf_counter() - t0
    assert max(abs(a - b) for a, b in zip(outs["per_r"], outs["sweep"])) < 1e-4
    emit("eval_sweep_loss", model=args.model_name, loops=args.loss_loops, tokens=int(rows.numel()),
         per_r_seconds=round(seconds["per_r"], 1), sweep_seconds=round(seconds["sweep"], 1),
         speedup=round(seconds["per_r"] / seconds["sweep"], 2), losses=[round(x, 4) for x in outs["sweep"]])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--loops", type=ints, default=[1, 2, 4, 8])
    ap.add_argument("--new", type=int, default=64, help="new tokens at most (the quickstart's default)")
    ap.add_argument("--draft-loops", type=int, default=2, help="D of the speculative sweep")
    ap.add_argument("--draft-tokens", type=int, default=DRAFT_TOKENS, help="tokens a speculative round drafts, at most")
    ap.add_argument("--loss-loops", type=ints, default=[1, 2, 4, 8, 16])
    ap.add_argument("--loss-tokens", type=int, default=2048)
    ap.add_argument("--model", help="a loopfit folder instead of the untrained (5,10,5) SmolLM2")
    ap.add_argument("--parts", default="gsm8k,loss")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fp32)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        model, tok = load(args.model)
        args.model_name = args.model
    else:
        base, tok = load_base("smollm2-135m")
        model = build_loopfit(base, plan_layers(30, (5, 10, 5)), adapter_init="mean", state_init="embed",
                              recurrence=4)
        args.model_name = "smollm2-135m (5,10,5) mean adapter, untrained"
    model.eval().to(args.device)
    tok.pad_token = tok.pad_token or tok.eos_token
    if "gsm8k" in args.parts:
        gsm8k(model, tok, args)
    if "loss" in args.parts:
        loss(model, tok, args)


if __name__ == "__main__":
    main()
