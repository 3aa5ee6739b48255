"""`loopfit prepare` throughput on the built-in `general` corpus with SmolLM2's tokenizer.

Reference (same run): the bare tokenizer encoding the same documents in one process, no writing.
Prints one JSON line: prepare tokens/s with 1 and 2 workers (reading the corpus, tokenising, writing shards),
the reference's tokens/s, their ratios, and the time spent only reading the corpus. On a machine other jobs share,
wall-clock ratios swing with the load; the CPU-time ratios (CPU seconds of the reference over those of prepare,
its worker processes included) tell how much work prepare adds to tokenising, whatever the load.
"""

import json
import os
import resource
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from loopfit.data import prepare, read_documents  # noqa: E402
from loopfit.loading import load_tokenizer  # noqa: E402


def cpu_seconds():
    """CPU time (user + system) of this process and of its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main():
    tok = load_tokenizer("smollm2-135m")
    t0 = time.perf_counter()
    docs = list(read_documents("general"))
    read_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), cpu_seconds()
    ref_tokens = 0
    for i in range(0, len(docs), 256):
        ref_tokens += sum(len(x) + 1 for x in tok(docs[i : i + 256], add_special_tokens=False)["input_ids"])
    ref_s, ref_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    prep_s, prep_cpu = {}, {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            t0, c0 = time.perf_counter(), cpu_seconds()
            [(_, manifest, _)] = prepare(["general"], tok, out, workers=workers, progress=False)
            prep_s[workers], prep_cpu[workers] = time.perf_counter() - t0, cpu_seconds() - c0
    tokens = manifest["splits"]["train"]["tokens"]
    print(json.dumps({
        "bench": "prepare", "corpus": "general", "tokenizer": "SmolLM2-135M", "documents": len(docs),
        "tokens": tokens, "cpus": os.cpu_count(), "read_documents_s": round(read_s, 2),
        "prepare_s": {f"workers={w}": round(t, 2) for w, t in prep_s.items()},
        "prepare_tokens_per_s": {f"workers={w}": round(tokens / t) for w, t in prep_s.items()},
        "reference": "bare tokenizer, 1 process, same documents, no reading or writing",
        "reference_s": round(ref_s, 2), "reference_tokens_per_s": round(ref_tokens / ref_s),
        "ratio_vs_reference": {f"workers={w}": round((tokens / t) / (ref_tokens / ref_s), 3)
                               for w, t in prep_s.items()},
        "cpu_s": {"reference": round(ref_cpu, 2), **{f"workers={w}": round(c, 2) for w, c in prep_cpu.items()}},
        "cpu_ratio_vs_reference": {f"workers={w}": round((ref_cpu / ref_tokens) / (c / tokens), 3)
                                   for w, c in prep_cpu.items()},
        "load_average": round(os.getloadavg()[0], 1),
    }))


if __name__ == "__main__":
    main()
