"""Try bad inputs on every `loopfit` verb, as a new user would, and classify what each one gets back.

  PYTHONPATH=src python tools/bad_input_sweep.py [--work DIR] [--json results.json] [-k SUBSTRING]

Each case runs `python -m loopfit.cli VERB ...` in a subprocess against small fixtures (tiny random models with
SmolLM2's real tokenizer, a truncated GGUF, non-UTF-8 text, a finished tiny training run, ...) built once in
--work. A case's result is one of:

  one-line      exit code 2, no traceback, the last stderr line names the problem (it holds the expected words)
  traceback     a raw Python traceback
  wrong         exit code 2 (or 1) without a traceback, but the message blames something else
  accepted      exit code 0: the bad input was not refused
  late          the right message, but only after more than LATE_S seconds of work

and, separately, `half-written` when the command left its output path (or a temporary folder) behind.
Prints a markdown table and the counts. Needs the offline SmolLM2 package (its tokenizer and GGUF).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LATE_S = 40.0  # every refusal here should come before heavy work: CLI start-up plus a tiny model is 5-15 s


def build_fixtures(w):
    """Tiny models, corrupt files and a finished tiny run in folder `w` (reused if already there)."""
    w.mkdir(parents=True, exist_ok=True)
    if (w / "READY").exists():
        return
    import torch
    import yaml
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from loopfit.assets import offline_gguf
    from loopfit.model import LoopfitConfig, LoopfitForCausalLM

    gguf = offline_gguf("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    sizes = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4)
    LoopfitForCausalLM(LoopfitConfig(**sizes, num_prelude_layers=1, num_core_layers=1, num_coda_layers=1,
                                     mean_recurrence=2, adapter_init="mean")).save_pretrained(w / "loop")
    LlamaForCausalLM(LlamaConfig(**sizes, num_hidden_layers=4)).save_pretrained(w / "plain")
    for d in ("loop", "plain"):
        tok.save_pretrained(w / d)
    for d in ("loop", "plain"):  # the same folders with their weights cut in half
        shutil.copytree(w / d, w / f"{d}-truncated")
        st = w / f"{d}-truncated" / "model.safetensors"
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    shutil.copytree(w / "loop", w / "loop-newer")  # a folder written by a loopfit from the future
    cfg = json.loads((w / "loop-newer/config.json").read_text())
    cfg["loopfit_version"] = "99.0.0"
    (w / "loop-newer/config.json").write_text(json.dumps(cfg))
    data = gguf.read_bytes()
    (w / "head.gguf").write_bytes(data[: 1 << 16])  # cut inside the metadata
    (w / "half.gguf").write_bytes(data[: len(data) // 2])  # cut inside the tensor data
    (w / "not-a-model.gguf").write_text("hello, I am text\n")
    (w / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me, na\xefve fa\xe7ade.\n\n".encode("latin-1") * 200)
    (w / "empty.txt").write_text("")
    (w / "docs.txt").write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog {i} "
                                            "times while the old lighthouse keeper counts the steps."
                                            for i in range(300)))
    (w / "texts.jsonl").write_text("".join(json.dumps({"text": f"Document {i}: the quick brown fox jumps over "
                                                              "the lazy dog."}) + "\n" for i in range(300)))
    (w / "docs.jsonl").write_text("".join(json.dumps({"body": f"text {i}"}) + "\n" for i in range(20)))
    (w / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "torn\n')
    (w / "prompts-latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (w / "not-yaml.yaml").write_text("model: [unclosed\n  - x: {\n")
    (w / "nonempty").mkdir()
    (w / "nonempty/keep.txt").write_text("user's file\n")
    (w / "a-file").write_text("a file, not a folder\n")
    recipe = {"model": {"init_from": str(w / "loop")}, "data": {"synthetic": "pattern", "seq_len": 16},
              "recurrence": {"mean": 2, "backprop": 1},
              "train": {"steps": 2, "batch_size": 2, "micro_batch_size": 2, "progress": False, "tensorboard": False,
                        "eval_batches": 1, "out_dir": str(w / "run")},
              "checkpoint": {"every": 0}}
    (w / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "loopfit.cli", "train", str(w / "recipe.yaml")], check=True, env=env,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "loopfit.cli", "prepare", str(w / "texts.jsonl"), "--tokenizer",
                    str(w / "loop"), "--out", str(w / "data"), "--holdout", "0.1", "--workers", "1"],
                   check=True, env=env, capture_output=True)
    shutil.copytree(w / "run", w / "run-torn")
    with open(w / "run-torn/metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.1')  # a crash in the middle of an append
    (w / "eval-broken").mkdir()
    (w / "eval-broken/results.json").write_text('{"model": "x", "rows": [')
    (w / "READY").write_text("")


def cases(w):
    """(name, argv after `loopfit`, words the refusal must contain, output path that must not appear)."""
    loop, plain, tl, tp = str(w / "loop"), str(w / "plain"), str(w / "loop-truncated"), str(w / "plain-truncated")
    new = lambda name: str(w / "out" / name)  # noqa: E731  a fresh output path per case
    rec = str(w / "recipe.yaml")
    C = []

    def add(name, argv, expect, out=None):
        C.append((name, argv, expect if isinstance(expect, (list, tuple)) else [expect], out))

    # analyze
    add("analyze: missing model", ["analyze", str(w / "nope"), "--out", new("a1")], "does not exist", new("a1"))
    add("analyze: truncated GGUF (metadata)", ["analyze", str(w / "head.gguf"), "--out", new("a2")],
        ["head.gguf"], new("a2"))
    add("analyze: truncated GGUF (tensors)", ["analyze", str(w / "half.gguf"), "--out", new("a3")],
        ["half.gguf"], new("a3"))
    add("analyze: text file named .gguf", ["analyze", str(w / "not-a-model.gguf"), "--out", new("a4")],
        "not a GGUF", new("a4"))
    add("analyze: --layers 2,0,2 (empty core)", ["analyze", plain, "--layers", "2,0,2", "--out", new("a5")],
        "core", new("a5"))
    add("analyze: --layers 2,0,2 (SmolLM2)", ["analyze", "smollm2-135m", "--layers", "2,0,2", "--out", new("a5b")],
        "core", new("a5b"))
    add("analyze: --layers 1,2 (two counts)", ["analyze", plain, "--layers", "1,2", "--out", new("a6")],
        "three counts", new("a6"))
    add("analyze: --layers 3,3,3 > layers", ["analyze", plain, "--layers", "3,3,3", "--out", new("a7")],
        "has 4", new("a7"))
    add("analyze: --out /proc/x", ["analyze", plain, "--out", "/proc/x"], "/proc/x")
    add("analyze: --out under a file", ["analyze", plain, "--out", str(w / "a-file/sub")], "a-file")
    add("analyze: --text missing", ["analyze", plain, "--text", str(w / "nope.txt"), "--out", new("a8")],
        "nope.txt", new("a8"))
    add("analyze: --text non-UTF-8", ["analyze", plain, "--text", str(w / "latin1.txt"), "--out", new("a9")],
        "UTF-8", new("a9"))
    add("analyze: --samples 0", ["analyze", plain, "--samples", "0", "--out", new("a10")], "--samples", new("a10"))
    add("analyze: --seq-len -1", ["analyze", plain, "--seq-len", "-1", "--out", new("a11")], "--seq-len", new("a11"))
    add("analyze: a loopfit model", ["analyze", loop, "--out", new("a12")], "plain", new("a12"))
    add("analyze: truncated safetensors", ["analyze", tp, "--out", new("a13")], "safetensors", new("a13"))
    # convert
    add("convert: missing model", ["convert", str(w / "nope"), "--out", new("c1")], "does not exist", new("c1"))
    add("convert: truncated GGUF (metadata)", ["convert", str(w / "head.gguf"), "--out", new("c2")],
        "head.gguf", new("c2"))
    add("convert: truncated GGUF (tensors)", ["convert", str(w / "half.gguf"), "--out", new("c3")],
        "half.gguf", new("c3"))
    add("convert: --layers=-1,2,2", ["convert", plain, "--layers=-1,2,2", "--out", new("c4")], ">= 0", new("c4"))
    add("convert: --layers 1,0,1", ["convert", plain, "--layers", "1,0,1", "--out", new("c5")],
        "core is empty", new("c5"))
    add("convert: --layers 3,3,3 > layers", ["convert", plain, "--layers", "3,3,3", "--out", new("c6")],
        "has 4", new("c6"))
    add("convert: --layers a,b,c", ["convert", plain, "--layers", "a,b,c", "--out", new("c7")],
        "three counts", new("c7"))
    add("convert: --out exists", ["convert", plain, "--layers", "1,2,1", "--out", str(w / "nonempty")],
        "already exists")
    add("convert: --out /proc/x", ["convert", plain, "--layers", "1,2,1", "--out", "/proc/x"], "/proc/x")
    add("convert: --out under a file", ["convert", plain, "--layers", "1,2,1", "--out", str(w / "a-file/sub")],
        "a-file")
    add("convert: --recurrence 0", ["convert", plain, "--recurrence", "0", "--out", new("c8")],
        "--recurrence", new("c8"))
    add("convert: --core 3-1", ["convert", plain, "--core", "3-1", "--out", new("c9")], "lower layer first", new("c9"))
    add("convert: overlapping ranges", ["convert", plain, "--prelude", "0-1", "--core", "1-2", "--out", new("c10")],
        "overlap", new("c10"))
    add("convert: --core 0-9 beyond", ["convert", plain, "--core", "0-9", "--out", new("c11")],
        "layers 0-3", new("c11"))
    add("convert: --layers and --core", ["convert", plain, "--layers", "1,2,1", "--core", "1-2", "--out", new("c12")],
        "not both", new("c12"))
    add("convert: folder without config", ["convert", str(w / "nonempty"), "--out", new("c13")],
        "config.json", new("c13"))
    add("convert: truncated safetensors", ["convert", tp, "--layers", "1,2,1", "--out", new("c14")],
        "safetensors", new("c14"))
    add("convert: a loopfit model", ["convert", loop, "--out", new("c15")], "already a loopfit model", new("c15"))
    add("convert: text file named .gguf", ["convert", str(w / "not-a-model.gguf"), "--out", new("c16")],
        "not a GGUF", new("c16"))
    # prepare
    P = ["--tokenizer", loop, "--workers", "1"]
    add("prepare: missing file", ["prepare", str(w / "nope.txt"), *P, "--out", new("p1")], "nope.txt", new("p1"))
    add("prepare: --limit -5", ["prepare", str(w / "docs.txt"), *P, "--limit", "-5", "--out", new("p2")],
        "--limit", new("p2"))
    add("prepare: --limit 0", ["prepare", str(w / "docs.txt"), *P, "--limit", "0", "--out", new("p3")],
        "--limit", new("p3"))
    add("prepare: --holdout 1.5", ["prepare", str(w / "docs.txt"), *P, "--holdout", "1.5", "--out", new("p4")],
        "--holdout", new("p4"))
    add("prepare: missing tokenizer", ["prepare", str(w / "docs.txt"), "--tokenizer", str(w / "nope"), "--out",
                                       new("p5")], "does not exist", new("p5"))
    add("prepare: --out /proc/x", ["prepare", str(w / "docs.txt"), *P, "--out", "/proc/x"], "/proc/x")
    add("prepare: --out under a file", ["prepare", str(w / "docs.txt"), *P, "--out", str(w / "a-file/sub")], "a-file")
    add("prepare: non-UTF-8 text", ["prepare", str(w / "latin1.txt"), *P, "--out", new("p6")], "UTF-8", new("p6"))
    add("prepare: empty file", ["prepare", str(w / "empty.txt"), *P, "--out", new("p7")], "no documents", new("p7"))
    add("prepare: --shard-tokens 0", ["prepare", str(w / "docs.txt"), *P, "--shard-tokens", "0", "--out", new("p8")],
        "--shard-tokens", new("p8"))
    add("prepare: wrong --text-field", ["prepare", str(w / "docs.jsonl"), *P, "--out", new("p9")], "text", new("p9"))
    add("prepare: unknown generator", ["prepare", "rg:no_such_task", *P, "--out", new("p10")],
        "no_such_task", new("p10"))
    add("prepare: template names a missing field", ["prepare", str(w / "docs.jsonl"), *P, "--template", "{nope}",
                                                    "--out", new("p11")], "nope", new("p11"))
    add("prepare: corrupt JSONL line", ["prepare", str(w / "broken.jsonl"), *P, "--out", new("p12")],
        "broken.jsonl", new("p12"))
    add("prepare: duplicate names", ["prepare", str(w / "docs.txt"), f"docs={w / 'docs.txt'}", *P, "--out", new("p13")],
        "both", new("p13"))
    # train
    T = lambda name: f"--train.out_dir={new(name)}"  # noqa: E731
    add("train: missing recipe", ["train", str(w / "nope.yaml")], "not found")
    add("train: invalid YAML", ["train", str(w / "not-yaml.yaml")], "not valid YAML")
    add("train: unknown key", ["train", rec, "--train.stepz=3", T("t1")], "did you mean", new("t1"))
    add("train: --train.steps=0", ["train", rec, "--train.steps=0", T("t2")], "train.steps", new("t2"))
    add("train: old and new eval-loops keys disagree",
        ["train", rec, "--recurrence.eval_steps=1", "--recurrence.eval_loops=2", T("t2b")], "eval_loops", new("t2b"))
    add("train: --train.steps=abc", ["train", rec, "--train.steps=abc", T("t3")], "expects int", new("t3"))
    add("train: out_dir /proc/x", ["train", rec, "--train.out_dir=/proc/x"], "/proc/x")
    add("train: out_dir under a file", ["train", rec, f"--train.out_dir={w / 'a-file/sub'}"], "a-file")
    add("train: init_from missing", ["train", rec, f"--model.init_from={w / 'nope'}", T("t4")], "init_from", new("t4"))
    add("train: init_from truncated safetensors", ["train", rec, f"--model.init_from={tl}", T("t5")],
        "safetensors", new("t5"))
    add("train: batch not divisible", ["train", rec, "--train.batch_size=3", T("t6")], "divisible", new("t6"))
    add("train: --resume with nothing", ["train", rec, "--resume", T("t7")], "nothing to resume", new("t7"))
    add("train: data.root missing", ["train", rec, "--data.synthetic=", f"--data.root={w / 'nope'}", T("t8")],
        "data", new("t8"))
    add("train: init_from newer loopfit", ["train", rec, f"--model.init_from={w / 'loop-newer'}", T("t9")],
        "newer", new("t9"))
    # eval
    add("eval: missing model", ["eval", str(w / "nope"), "--out", new("e1")], "does not exist", new("e1"))
    add("eval: --loops 0", ["eval", loop, "--loops", "0", "--out", new("e2")], "--loops", new("e2"))
    add("eval: --loops a", ["eval", loop, "--loops", "a", "--out", new("e3")], "--loops", new("e3"))
    add("eval: old --steps disagrees with --loops", ["eval", loop, "--steps", "1", "--loops", "2", "--out", new("e3b")],
        "disagree", new("e3b"))
    add("eval: unknown task", ["eval", loop, "--tasks", "nope", "--out", new("e4")], "unknown task", new("e4"))
    add("eval: --out /proc/x", ["eval", loop, "--data", str(w / "docs.txt"), "--seq-len", "16", "--out", "/proc/x"],
        "/proc/x")
    add("eval: --out under a file", ["eval", loop, "--out", str(w / "a-file/sub")], "a-file")
    add("eval: --out non-empty", ["eval", loop, "--data", str(w / "docs.txt"), "--seq-len", "16", "--out",
                                  str(w / "nonempty")], "--force")
    add("eval: --data non-UTF-8", ["eval", loop, "--data", str(w / "latin1.txt"), "--seq-len", "16", "--out",
                                   new("e5")], "UTF-8", new("e5"))
    add("eval: --data missing", ["eval", loop, "--data", str(w / "nope.txt"), "--out", new("e6")],
        "nope.txt", new("e6"))
    add("eval: truncated GGUF", ["eval", str(w / "head.gguf"), "--out", new("e7")], "head.gguf", new("e7"))
    add("eval: truncated safetensors", ["eval", tl, "--out", new("e8")], "safetensors", new("e8"))
    add("eval: --limit 0", ["eval", loop, "--limit", "0", "--out", new("e9")], "--limit", new("e9"))
    add("eval: --exit foo:1", ["eval", loop, "--tasks", "gsm8k", "--exit", "foo:1", "--out", new("e10")],
        "exit", new("e10"))
    add("eval: --exit on a plain model", ["eval", plain, "--tasks", "gsm8k", "--exit", "kl:1e-3", "--out", new("e11")],
        "plain", new("e11"))
    add("eval: --seq-len 0", ["eval", loop, "--data", str(w / "docs.txt"), "--seq-len", "0", "--out", new("e12")],
        "--seq-len", new("e12"))
    add("eval: --batch-size 0", ["eval", loop, "--data", str(w / "docs.txt"), "--batch-size", "0", "--out", new("e13")],
        "--batch-size", new("e13"))
    add("eval: newer loopfit folder", ["eval", str(w / "loop-newer"), "--out", new("e14")], "newer", new("e14"))
    # compare
    add("compare: missing run", ["compare", str(w / "nope"), "--out", new("m1")], "does not exist", new("m1"))
    add("compare: folder without runs", ["compare", str(w / "nonempty"), "--out", new("m2")], "neither", new("m2"))
    add("compare: --out /proc/x", ["compare", str(w / "run"), "--out", "/proc/x"], "/proc/x")
    add("compare: --out non-empty", ["compare", str(w / "run"), "--out", str(w / "nonempty")], "--force")
    add("compare: torn metrics.jsonl (must work)", ["compare", str(w / "run-torn"), "--out", new("m3")], "", None)
    add("compare: broken results.json", ["compare", str(w / "eval-broken"), "--out", new("m4")],
        "results.json", new("m4"))
    # generate
    G = ["--max-new-tokens", "2"]
    add("generate: --max-new-tokens -3", ["generate", loop, "--prompt", "hi", "--max-new-tokens", "-3"],
        "--max-new-tokens")
    add("generate: empty prompt (loopfit)", ["generate", loop, "--prompt", "", *G], "prompt")
    add("generate: empty prompt (plain)", ["generate", plain, "--prompt", "", *G], "prompt")
    add("generate: --loops 0", ["generate", loop, "--prompt", "hi", "--loops", "0", *G], "--loops")
    add("generate: --exit kl:abc", ["generate", loop, "--prompt", "hi", "--exit", "kl:abc", *G], "exit")
    add("generate: --exit foo:1", ["generate", loop, "--prompt", "hi", "--exit", "foo:1", *G], "exit")
    add("generate: --exit kl:1e-3:2 (a margin on kl)", ["generate", loop, "--prompt", "hi", "--exit", "kl:1e-3:2", *G],
        "margin")
    add("generate: --exit latent:0.01:x", ["generate", loop, "--prompt", "hi", "--exit", "latent:0.01:x", *G], "exit")
    add("generate: --exit on plain", ["generate", plain, "--prompt", "hi", "--exit", "kl:1e-3", *G], "plain")
    add("generate: missing model", ["generate", str(w / "nope"), "--prompt", "hi"], "does not exist")
    add("generate: --prompt-file missing", ["generate", loop, "--prompt-file", str(w / "nope.txt")], "nope.txt")
    add("generate: --prompt-file non-UTF-8", ["generate", loop, "--prompt-file", str(w / "prompts-latin1.txt")],
        "UTF-8")
    add("generate: --temperature -1", ["generate", loop, "--prompt", "hi", "--temperature", "-1", *G], "--temperature")
    add("generate: --top-p 0", ["generate", loop, "--prompt", "hi", "--temperature", "0.7", "--top-p", "0", *G],
        "--top-p")
    add("generate: truncated safetensors", ["generate", tl, "--prompt", "hi", *G], "safetensors")
    add("generate: truncated GGUF", ["generate", str(w / "head.gguf"), "--prompt", "hi", *G], "head.gguf")
    # quickstart (all refused before any work)
    add("quickstart: unknown model", ["quickstart", "--model", "gpt5", "--out", new("q1")], "gpt5", new("q1"))
    add("quickstart: --steps 0", ["quickstart", "--steps", "0", "--out", new("q2")], "--steps", new("q2"))
    add("quickstart: --out non-empty", ["quickstart", "--out", str(w / "nonempty")], "--force")
    add("quickstart: --out /proc/x", ["quickstart", "--out", "/proc/x"], "/proc/x")
    add("quickstart: --layers 1,2", ["quickstart", "--layers", "1,2", "--out", new("q3")], "three counts", new("q3"))
    add("quickstart: --eval-loops 0", ["quickstart", "--eval-loops", "0", "--out", new("q4")], "--eval-loops",
        new("q4"))
    add("quickstart: --recipe missing", ["quickstart", "--recipe", str(w / "nope.yaml"), "--out", new("q5")],
        "nope.yaml", new("q5"))
    return C


def leftovers(w):
    """Temporary folders/files that atomic writes left in the fixture tree (a half-written output)."""
    return sorted(str(p.relative_to(w)) for p in w.rglob(".*tmp-*"))


def snapshot(path):
    p = Path(path)
    return sorted(str(q.relative_to(p)) for q in p.rglob("*")) if p.is_dir() else None


def run_case(w, name, argv, expect, out, timeout):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    watched = [w / "nonempty"]
    before = [snapshot(p) for p in watched]
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "loopfit.cli", *argv], capture_output=True, text=True,
                              env=env, timeout=timeout, cwd=w)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = "timeout", ((e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes)
                              else (e.stderr or ""))
    seconds = time.time() - t0
    lines = [line for line in err.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if rc == "timeout":
        kind = "late"
        last = f"(no answer after {timeout:.0f} s) " + last
    elif "Traceback (most recent call last)" in err:
        kind = "traceback"
        last = next((line for line in reversed(lines) if not line.startswith(" ")), last)
    elif rc == 0:
        kind = "accepted" if expect != [""] else "one-line"  # a case that must simply work
    elif rc == 2 and all(x.lower() in last.lower() for x in expect) and "error" in last:
        kind = "late" if seconds > LATE_S else "one-line"
    else:
        kind = "wrong"
    half = []
    if out is not None and Path(out).exists():
        half.append(str(Path(out).relative_to(w)) if str(out).startswith(str(w)) else str(out))
    half += [str(p.relative_to(w)) for p, b in zip(watched, before) if snapshot(p) != b]
    half += leftovers(w)
    for h in leftovers(w):  # clean up so the next case starts clean
        shutil.rmtree(w / h, ignore_errors=True) if (w / h).is_dir() else (w / h).unlink(missing_ok=True)
    if out is not None and Path(out).exists():
        shutil.rmtree(out, ignore_errors=True)
    return {"case": name, "rc": rc, "kind": kind, "half_written": half, "seconds": round(seconds, 1),
            "message": last[:220]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", help="fixture folder (default: a fresh temporary one)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("-k", default="", help="only cases whose name contains this")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--summarize", metavar="JSON", help="only print the table of an earlier --json")
    args = ap.parse_args()
    if args.summarize:
        return summarize(json.loads(Path(args.summarize).read_text())["results"])
    w = Path(args.work or tempfile.mkdtemp(prefix="loopfit-sweep-")).resolve()
    build_fixtures(w)
    results = []
    selected = [c for c in cases(w) if args.k in c[0]]
    for i, (name, argv, expect, out) in enumerate(selected, 1):
        r = run_case(w, name, argv, expect, out, args.timeout)
        results.append(r)
        print(f"[{i}/{len(selected)}] {r['kind']:<9} {'HALF ' if r['half_written'] else ''}{r['seconds']:>5}s "
              f"{name}: {r['message'][:150]}", file=sys.stderr, flush=True)
    summarize(results, args.json)


def summarize(results, json_path=None):
    """Markdown table and counts. On a loaded machine the CLI's start-up alone can pass LATE_S: a refusal is
    late only if it also took over three times the median case (the work it should have skipped)."""
    import statistics

    median = statistics.median(r["seconds"] for r in results)
    for r in results:
        if r["rc"] == "timeout":
            r["kind"] = "late"
        elif r["kind"] == "late" and r["seconds"] <= 3 * median:
            r["kind"] = "one-line"
    print(f"(median case {median:.1f} s; late = the right message after more than {max(LATE_S, 3 * median):.0f} s)\n")
    print("| case | result | half-written | s | message (last stderr line) |")
    print("|---|---|---|---:|---|")
    for r in results:
        msg = r["message"].replace("|", "\\|")
        print(f"| {r['case']} | {r['kind']} | {', '.join(r['half_written'])} | {r['seconds']} | {msg} |")
    counts = {k: sum(r["kind"] == k for r in results) for k in ("one-line", "traceback", "wrong", "late", "accepted")}
    counts["half-written"] = sum(bool(r["half_written"]) for r in results)
    print(f"\n{len(results)} cases: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if json_path:
        Path(json_path).write_text(json.dumps({"counts": counts, "results": results}, indent=1))


if __name__ == "__main__":
    main()
