"""`make gpu-check`: on one GPU, check that training at scale works and how fast, in a few minutes.

Prints one JSON line per check:
  train_r32_k8      loopfit's trainer on a converted SmolLM2-135M (4,8,4) at r = 32 with k = 8 (fixed depth),
                    bf16 autocast, compiled blocks, activation checkpointing of the core, Muon + AdamW
  fsdp_one_rank     the same under FSDP2 (fully_shard per block) in a one-rank process group
  transformers_r1   transformers' original SmolLM2-135M, eager, bf16 autocast, same batch and optimizers
  loopfit_r1        the conversion keeping every layer (4,22,4) at r = 1, compiled: the same FLOPs as
                    transformers_r1 (bar the adapter), so tokens/s compare directly (issue target: a step
                    <= 0.75x transformers' eager step, i.e. tokens/s >= 1.33x)
  generation        greedy cached decoding of the converted model at r = 32, tokens per second
Each train line has tokens/s (median of the steps after the warm-up steps, which compile), MFU by the paper's
FLOP count and by the full count (loopfit.train.flops) against the GPU's bf16 datasheet peak, and peak memory.

  python benchmarks/gpu_check.py                      # on a CUDA GPU (refuses in one line without one)
  python benchmarks/gpu_check.py --device cpu --tiny  # smoke run of every code path on tiny random models
"""

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def say(record):
    print(json.dumps(record), flush=True)


def peak_memory_gib(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB on Linux)


def tiny_models(root):
    """A tiny random loopfit (1,2,1) model and a tiny Llama of the same width, saved as folders."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loopfit import LoopfitConfig, LoopfitForCausalLM

    sizes = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    LoopfitForCausalLM(LoopfitConfig(**sizes, num_prelude_layers=1, num_core_layers=2, num_coda_layers=1)
                       ).save_pretrained(root / "loopfit")
    LlamaForCausalLM(LlamaConfig(**sizes, num_hidden_layers=4)).save_pretrained(root / "plain")
    return root / "loopfit", root / "plain"


def real_models(root, layers):
    from loopfit.convert import convert
    from loopfit.loading import offline_folder

    convert("smollm2-135m", root / "loopfit", layers=layers, parity=False, log=lambda *a: None)
    return root / "loopfit", offline_folder("smollm2-135m")


def every_layer_model(root, tiny):
    """The conversion that keeps every layer (4, n - 8, 4), passthrough adapter: at r = 1 it is the original."""
    from loopfit.convert import build_loopfit, plan_layers
    from loopfit.loading import load_base

    if tiny:
        return root / "loopfit"
    base, tok = load_base("smollm2-135m")
    n = base.config.num_hidden_layers
    build_loopfit(base, plan_layers(n, (4, n - 8, 4)), adapter_init="passthrough", recurrence=1
                  ).save_pretrained(root / "every-layer")
    return root / "every-layer"


def train_check(name, folder, args, out, recurrent=True, compile_=True, fsdp=False, r=None, k=None):
    from torch._dynamo.utils import counters

    from loopfit.train.trainer import train

    compile_ = compile_ and not args.no_compile
    r, k = r or args.r, k or args.k
    torch._dynamo.reset()  # each check compiles afresh, as its own process would
    counters.clear()

    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    recipe = {
        "model": {"init_from": str(folder)},
        "data": {"synthetic": "random", "seq_len": args.seq, "vocab_size": vocab},
        "recurrence": {"mode": "fixed", "mean": r, "backprop": k, "curriculum": "none"},
        "schedule": {"name": "constant", "warmup": 0},
        "train": {"out_dir": str(out / name), "steps": args.warmup + args.steps, "batch_size": args.batch,
                  "micro_batch_size": args.batch, "precision": "bf16", "compile": str(compile_).lower(),
                  "activation_checkpointing": "core" if recurrent and r > k else "none", "progress": False,
                  "tensorboard": False, "eval_batches": 1},
        "checkpoint": {"every": 0},
        "distributed": {"strategy": "fsdp" if fsdp else "ddp"},
    }
    if args.device == "cpu":
        recipe["train"]["peak_flops"] = 1e11  # no datasheet on a CPU; the smoke run does not time anything
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train(recipe)
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "loss" in r and r["step"] > args.warmup]
    say({"check": name, "device": args.device_name, "r": r if recurrent else 1, "k": k if recurrent else 1,
         "batch": args.batch, "seq": args.seq, "compiled": compile_, "fsdp": fsdp,
         "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
         "mfu_paper": statistics.median(r["mfu"] for r in timed),
         "mfu_full": statistics.median(r["mfu_full"] for r in timed),
         "peak_memory_gib": round(peak_memory_gib(args.device), 3),
         "compiled_graphs": counters["stats"]["unique_graphs"], "recompiles": sum(counters["recompiles"].values()),
         "loss_finite": all(r["loss"] == r["loss"] for r in timed)})


def generation_check(folder, args):
    from transformers import AutoModelForCausalLM

    import loopfit  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(args.device).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, num_steps=args.r)
    model.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    if args.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, **kwargs)
    if args.device == "cuda":
        torch.cuda.synchronize()
    new = out.shape[1] - ids.shape[1]
    say({"check": "generation", "device": args.device_name, "r": args.r, "new_tokens": new,
         "tokens_per_s": new / (time.perf_counter() - t0), "dtype": "bf16"})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny random models (a smoke run of every code path)")
    ap.add_argument("--layers", default="4,8,4", help="prelude,core,coda layers of the converted SmolLM2-135M")
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=3, help="steps before timing (compilation happens here)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out (a quicker smoke run)")
    ap.add_argument("--skip", default="", help="comma-separated checks to leave out")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here: run it on a machine with one (or --device cpu --tiny for a smoke run)",
              file=sys.stderr)
        return 2
    args.device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recurrent, plain = (tiny_models(root) if args.tiny
                            else real_models(root, tuple(map(int, args.layers.split(",")))))
        if "train_r32_k8" not in skip:
            train_check("train_r32_k8", recurrent, args, root / "runs")
        if "fsdp_one_rank" not in skip:
            import torch.distributed as dist

            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29517"),
                              RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)
            try:
                train_check("fsdp_one_rank", recurrent, args, root / "runs", fsdp=True)
            finally:
                dist.destroy_process_group()
        if "transformers_r1" not in skip:
            train_check("transformers_r1", plain, args, root / "runs", recurrent=False, compile_=False)
        if "loopfit_r1" not in skip:
            train_check("loopfit_r1", every_layer_model(root, args.tiny), args, root / "runs", r=1, k=1)
        if "generation" not in skip:
            generation_check(recurrent, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
