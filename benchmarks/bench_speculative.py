"""Deep thinking at shallow speed: tokens/s of exact self-speculative decoding and of the adaptive exit against
today's exact cached decoding, and against the plain base model. Prints one JSON line per (r, batch).

Model: SmolLM2-135M with every layer kept (prelude 0-23, core 24-25 looped, coda 26-29), `mean` adapter, `embed`
state: r = 1 is SmolLM2 exactly, and its greedy tokens change with r (the fraction differing between r = d and
the largest r is reported), so drafts are really checked. Prompts: GSM8K test questions (seed 1234), greedy,
`--new` tokens each (EOS suppressed so every configuration decodes the same number). Speculative output is
asserted identical to cached decoding; the exit's token agreement with it is reported.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_speculative.py [--loops 8,32] [--batch 1,8] [--new 128]
       [--drafts 1,2,4] [--tokens 4,8] [--exit latent:0.005:1] [--model FOLDER] [--device cuda]
       [--interleaved N --prompts N | --gsm8k N]
"""

import argparse
import time

import torch
from _common import emit, sync

from loopfit.convert import LayerPlan, build_loopfit, plan_layers
from loopfit.eval import items
from loopfit.loading import load_base


def ints(text):
    return [int(x) for x in text.split(",") if x]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loops", type=ints, default=[8, 32])
    ap.add_argument("--batch", type=ints, default=[1, 8])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--drafts", type=ints, default=[1, 2, 4])
    ap.add_argument("--tokens", type=ints, default=[4, 8])
    ap.add_argument("--batch8-grid", default="2:4,4:4", help="(d:k) pairs run at batch > 1 (the full grid at 1)")
    ap.add_argument("--exit", dest="exit_rule", default="latent:0.03")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fp32 on both, so cached and speculative decoding "
                    "can agree token for token)")
    ap.add_argument("--model", help="a trained loopfit folder (e.g. quickstart/runs/recurrent/final) instead of "
                    "the untrained SmolLM2 conversion; the plain base model stays SmolLM2-135M")
    ap.add_argument("--layers", default="all", help="all: every layer, core 24-25 (default); or P,K,C such as "
                    "4,8,4: the paper's slice, whose core is most of a token's cost")
    ap.add_argument("--gsm8k", type=int, default=0, help="instead: GSM8K 1-shot eval of this many items at r = "
                    "--gsm8k-loops, plain vs --draft-loops (the quickstart's eval stage)")
    ap.add_argument("--gsm8k-loops", type=ints, default=[1, 2, 4, 8])
    ap.add_argument("--draft-loops", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=1, help="--interleaved: this many prompts, each decoded alone")
    ap.add_argument("--interleaved", type=int, default=0, help="instead: this many alternating repeats of cached "
                    "vs speculative (--draft-loops, first --tokens) vs exit at the first --loops and --batch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = load_base("smollm2-135m") if not args.model or not (args.interleaved or args.gsm8k) else (None, None)
    if args.model:  # a trained loopfit folder (e.g. the quickstart's), its tokenizer SmolLM2's
        from loopfit.loading import load

        model, tok = load(args.model)
        model.eval()
    else:
        plan = LayerPlan(list(range(24)), [24, 25], [26, 27, 28, 29], 30) if args.layers == "all" else \
            plan_layers(30, tuple(ints(args.layers)))
        model = build_loopfit(base, plan, adapter_init="mean", state_init="embed", recurrence=8).eval()
        args.model = f"smollm2-135m {'all layers (24,2,4)' if args.layers == 'all' else f'({args.layers})'} " \
            "mean adapter"
    model.to(args.device)
    if base is not None:
        base.eval().to(args.device)
    tok.pad_token = tok.pad_token or tok.eos_token
    if args.gsm8k:
        return gsm8k_sweep(model, tok, args)
    if args.interleaved:
        return interleaved_check(model, tok, args)
    questions = [p["question"] for p in items.subset(items.gsm8k_test(), max(args.batch), seed=1234)]

    def timed(fn, **kwargs):
        sync(args.device)
        t0 = time.perf_counter()
        out = fn(**kwargs)
        sync(args.device)
        return out, time.perf_counter() - t0

    warm = tok(questions[:1], return_tensors="pt").to(args.device)
    with torch.no_grad():  # first calls pay one-off costs: keep them out of the first reference timing
        model.generate(**warm, num_steps=2, max_new_tokens=4, pad_token_id=tok.pad_token_id)
        model.generate(**warm, num_steps=2, draft_steps=1, max_new_tokens=4, pad_token_id=tok.pad_token_id)
        base.generate(**warm, max_new_tokens=4, pad_token_id=tok.pad_token_id)
    for r in args.loops:
        for b in args.batch:
            batch = tok(questions[:b], return_tensors="pt", padding=True, padding_side="left").to(args.device)
            n = batch.input_ids.shape[1]
            kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=tok.pad_token_id)
            with torch.no_grad():
                ref, t_ref = timed(model.generate, **batch, num_steps=r, **kw)
                _, t_base = timed(base.generate, **batch, **kw)
                cache = model.new_cache()
                early, t_exit = timed(model.generate, **batch, num_steps=r, exit_criterion=args.exit_rule,
                                      cache=cache, **kw)
                loops = torch.stack(cache.loops_used).float().mean().item()
                grid = [(d, k) for d in args.drafts for k in args.tokens] if b == 1 else \
                    [tuple(int(x) for x in pair.split(":")) for pair in args.batch8_grid.split(",")]
                spec, differ = {}, {}
                for d, k in grid:
                    if d >= r:
                        continue
                    cache = model.new_cache()
                    out, t = timed(model.generate, **batch, num_steps=r, draft_steps=d, draft_tokens=k,
                                   cache=cache, **kw)
                    assert torch.equal(out, ref), (r, b, d, k)
                    drafted = sum(q for q, _, _ in cache.drafts)
                    spec[f"d{d}_k{k}"] = {
                        "tokens_per_s": round(b * args.new / t, 2), "speedup": round(t_ref / t, 2),
                        "acceptance": round(sum(kept for _, _, kept in cache.drafts) / drafted, 3),
                        "tokens_per_round": round(sum(s for _, s, _ in cache.drafts) / len(cache.drafts), 2)}
                    if b == 1 and d not in differ:
                        shallow = model.generate(**batch, num_steps=d, **kw)
                        differ[d] = round((shallow[:, n:] != ref[:, n:]).float().mean().item(), 3)
            best = max(spec, key=lambda key: spec[key]["speedup"]) if spec else None
            emit("speculative_decoding", model=args.model, loops=r, batch=b,
                 prompt_tokens=n, new_tokens=args.new,
                 cached_tokens_per_s=round(b * args.new / t_ref, 2),
                 base_model_tokens_per_s=round(b * args.new / t_base, 2),
                 speculative=spec, best=best, best_speedup=spec[best]["speedup"] if best else None,
                 identical_output=True, fraction_differing_r_d_vs_r=differ or None,
                 exit={"rule": args.exit_rule, "time_ratio": round(t_exit / t_ref, 3), "mean_loops": round(loops, 2),
                       "token_agreement": round((early[:, n:] == ref[:, n:]).float().mean().item(), 3)})


def interleaved_check(model, tok, args):
    """Median of alternating repeats: robust to load that changes during a run (the shared machine). With
    --prompts N, each of N prompts decodes on its own in batches of --batch (agreement over more tokens)."""
    from _common import interleaved

    r, b, d, k = args.loops[0], args.batch[0], args.draft_loops, args.tokens[0]
    questions = [p["question"] for p in items.subset(items.gsm8k_test(), max(b, args.prompts), seed=1234)]
    batches = [tok(questions[i:i + b], return_tensors="pt", padding=True, padding_side="left").to(args.device)
               for i in range(0, len(questions), b)]
    kw = dict(num_steps=r, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
              pad_token_id=tok.pad_token_id)
    outs = {}

    def run(name, **extra):
        def go():
            outs[name] = [model.generate(**batch, **kw, **extra) for batch in batches]
            sync(args.device)
        return go

    with torch.no_grad():
        t = interleaved({"cached": run("cached"), "speculative": run("spec", draft_steps=d, draft_tokens=k),
                         "exit": run("exit", exit_criterion=args.exit_rule)}, repeats=args.interleaved, warmup=0)
    assert all(torch.equal(a, b) for a, b in zip(outs["cached"], outs["spec"]))
    with torch.no_grad():  # how much depth past d changes the tokens (0 would make drafts trivially right)
        shallow = [model.generate(**batch, **{**kw, "num_steps": d}) for batch in batches]
    differ = torch.cat([(s[:, batch.input_ids.shape[1]:] != c[:, batch.input_ids.shape[1]:]).float().flatten()
                        for s, c, batch in zip(shallow, outs["cached"], batches)]).mean().item()
    agree = [(e[:, batch.input_ids.shape[1]:] == c[:, batch.input_ids.shape[1]:]).float()
             for e, c, batch in zip(outs["exit"], outs["cached"], batches)]
    emit("speculative_decoding_interleaved", model=args.model, loops=r, batch=b, prompts=len(questions),
         new_tokens=args.new, draft_loops=d, draft_tokens=k, repeats=args.interleaved, cached_s=round(t["cached"], 1),
         speculative_s=round(t["speculative"], 1),
         speedup=round(t["cached"] / t["speculative"], 2), identical_output=True,
         fraction_differing_r_d_vs_r=round(differ, 3), exit_rule=args.exit_rule,
         exit_time_ratio=round(t["exit"] / t["cached"], 3),
         exit_token_agreement=round(torch.cat([a.flatten() for a in agree]).mean().item(), 3))


def gsm8k_sweep(model, tok, args):
    from loopfit.eval import accuracy

    runs = {}
    for name, draft in (("plain", None), ("speculative", args.draft_loops)):
        t0 = time.perf_counter()
        rows, samples = accuracy.evaluate(model, tok, "gsm8k_1shot", args.gsm8k_loops, limit=args.gsm8k, seed=1234,
                                       max_new_tokens=args.max_new_tokens, batch_size=8, draft_loops=draft)
        runs[name] = (time.perf_counter() - t0, [s["completion"] for s in samples], rows)
    assert runs["plain"][1] == runs["speculative"][1] and runs["plain"][2] == runs["speculative"][2]
    emit("gsm8k_eval_speculative", model=args.model, items=args.gsm8k,
         loops=args.gsm8k_loops, max_new_tokens=args.max_new_tokens, draft_loops=args.draft_loops,
         plain_seconds=round(runs["plain"][0], 1), speculative_seconds=round(runs["speculative"][0], 1),
         speedup=round(runs["plain"][0] / runs["speculative"][0], 2), identical_completions=True)


if __name__ == "__main__":
    main()
