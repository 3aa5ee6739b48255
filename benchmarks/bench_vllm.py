"""Decoding tokens/s through vLLM vs loopfit's own `generate` (exact cache) on the same prompts: a converted
SmolLM2 (4,8,4), greedy, fixed-length outputs, for each r and batch (number of requests). Prints one JSON line.
Runs in .venv-vllm (`make test-vllm` builds it); elsewhere it prints a line saying so.

    .venv-vllm/bin/python benchmarks/bench_vllm.py --loops 4 32 --batches 1 8 64 --new 128

Both sides get the same number of torch threads (--threads); vLLM pins its CPU worker to that many cores."""

import argparse
import os
import tempfile
import time

import torch
from _common import emit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loops", type=int, nargs="+", default=[4, 32])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--new", type=int, default=128, help="new tokens per request")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    try:
        import vllm  # noqa: F401
    except ImportError:
        emit("vllm_decode", skipped="vLLM is not installed here: run it with .venv-vllm/bin/python")
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    torch.set_num_threads(args.threads)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from loopfit.convert import build_loopfit, plan_layers
    from loopfit.loading import load_base

    torch.manual_seed(0)
    base, tokenizer = load_base("smollm2-135m")
    model = build_loopfit(base, plan_layers(base.config.num_hidden_layers, (4, 8, 4))).eval()
    del base
    folder = tempfile.mkdtemp(prefix="bench-vllm-")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompts = torch.randint(0, model.config.vocab_size, (max(args.batches), args.prompt))
    params = SamplingParams(max_tokens=args.new, min_tokens=args.new, temperature=0, ignore_eos=True)
    rows = []
    for r in args.loops:
        llm = LLM(folder, dtype="float32", enforce_eager=True, hf_overrides={"mean_recurrence": r},
                  max_model_len=args.prompt + args.new, max_num_seqs=max(args.batches))
        for b in args.batches:
            requests = [TokensPrompt(prompt_token_ids=p.tolist()) for p in prompts[:b]]
            llm.generate(requests[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm up
            t0 = time.perf_counter()
            outs = llm.generate(requests, params, use_tqdm=False)
            t_vllm = time.perf_counter() - t0
            assert all(len(o.outputs[0].token_ids) == args.new for o in outs)
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(prompts[:b], num_steps=r, max_new_tokens=args.new, min_new_tokens=args.new,
                               do_sample=False)
            t_loopfit = time.perf_counter() - t0
            rows.append(dict(loops=r, batch=b, vllm_tokens_per_s=round(b * args.new / t_vllm, 1),
                             loopfit_tokens_per_s=round(b * args.new / t_loopfit, 1),
                             speedup=round(t_loopfit / t_vllm, 2)))
            print(rows[-1], flush=True)
        llm.llm_engine.engine_core.shutdown()
        del llm
    emit("vllm_decode", model="smollm2-135m (4,8,4)", prompt=args.prompt, new_tokens=args.new,
         vllm=vllm.__version__, threads_each=args.threads, grid=rows)


if __name__ == "__main__":
    main()
