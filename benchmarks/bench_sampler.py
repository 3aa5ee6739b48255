"""BlendSampler throughput against what a training step consumes (target: >= 100x on CPU).

Reference (same run): one forward + backward of the SmolLM2-135M architecture (random weights, fp32) on the
same global batch (4 x 256 tokens). Prints one JSON line: sampler batches/s for each packing mode, training
steps/s, and the ratios.
"""

import json
import os
import tempfile
import time

import torch

from loopfit.data import BlendSampler, load_blend, prepare
from loopfit.data.shards import load_tokenizer

SEQ, BATCH = 256, 4


def sampler_rate(sampler, start, n, lr=None):
    t0 = time.perf_counter()
    for step in range(start, start + n):
        sampler.batch(step, lr_fraction=None if lr is None else lr(step))
    return n / (time.perf_counter() - t0)


def train_step_rate():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, rope_theta=1e5, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 49152, (BATCH, SEQ))
    model(input_ids=ids, labels=ids).loss.backward()  # warm-up
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    return 1 / (time.perf_counter() - t0)


def main():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tok = load_tokenizer("smollm2-135m")
    with tempfile.TemporaryDirectory() as root:
        prepare(["general", "math"], tok, root, limit=3000, workers=2, progress=False)
        blend = load_blend({"phases": [{"weights": {"general": 1}, "until": {"lr_fraction": 0.2}},
                                       {"weights": {"general": 0.9, "math": 0.1}}]}, root)  # fmt: skip
        lr = lambda s: 1 - s / 20_000  # noqa: E731  (switch at step 16000)
        rates = {}
        for pack in ("concat", "docs"):
            s = BlendSampler(blend, SEQ, BATCH, total_steps=20_000, pack=pack, max_epochs=1e9, lr_fraction_at=lr)
            s.batch(15_990)  # first call computes the draw counts of the 15990 earlier steps
            rates[pack] = sampler_rate(s, 15_991, 300)
        t0 = time.perf_counter()
        BlendSampler(blend, SEQ, BATCH, total_steps=20_000, max_epochs=1e9, lr_fraction_at=lr).batch(19_999)
        cold_s = time.perf_counter() - t0
    train = train_step_rate()
    print(json.dumps({
        "bench": "sampler", "seq_len": SEQ, "global_batch": BATCH, "cpus": os.cpu_count(),
        "sampler_batches_per_s": {k: round(v, 1) for k, v in rates.items()},
        "cold_resume_at_step_19999_s": round(cold_s, 3),
        "reference": "SmolLM2-135M architecture fp32 forward+backward, same batch",
        "train_steps_per_s": round(train, 4),
        "ratio_vs_train_step": {k: round(v / train, 1) for k, v in rates.items()},
    }))


if __name__ == "__main__":
    main()
