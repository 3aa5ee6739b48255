"""Peak memory of `loopfit prepare` on a large JSONL file: streamed through `datasets` vs reading the file whole.

Writes a JSONL file of about --mb MB (records of ~10 KB), then measures the peak resident memory (ru_maxrss) of:
  streamed   `loopfit prepare big.jsonl --limit 10` (what loopfit does: `datasets` streams a block at a time)
  small      the same command on a 200 KB file of the same records (the process's own cost: torch, transformers)
  whole      the same process reading the whole file and splitting it into records before tokenising 10 of them
             (how loopfit read JSONL files before it streamed them), the reference
and, with --full, `loopfit prepare big.jsonl` over every record (2 workers). Prints one JSON line (MB).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WHOLE = """
import json, sys
from loopfit.loading import load_tokenizer
tok = load_tokenizer(sys.argv[2])
lines = open(sys.argv[1], "rb").read().decode("utf-8").splitlines()
docs = [json.loads(line)["text"] for line in lines[:10]]
tok(docs, add_special_tokens=False)
"""


def peak_mb(argv):
    """Peak RSS in MB of one command (its process tree's largest process), and its wall time."""
    code = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True); "
            "sys.stderr.write(p.stderr.decode()[-2000:] if p.returncode else ''); "
            "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, check=True)
    rc, mb = map(int, out.stdout.split())
    if rc:
        raise SystemExit(f"{argv} failed: {out.stderr}")
    return mb, round(time.perf_counter() - t0, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=300, help="size of the generated file (default %(default)s)")
    parser.add_argument("--tokenizer", default="smollm2-135m")
    parser.add_argument("--full", action="store_true", help="also prepare every record of the file")
    args = parser.parse_args()
    loopfit = [sys.executable, "-m", "loopfit.cli", "prepare"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        line = json.dumps({"text": "word " * 2000, "id": 1}) + "\n"
        big = tmp / "big.jsonl"
        with open(big, "w") as f:
            for _ in range(args.mb * 10**6 // len(line)):
                f.write(line)
        (tmp / "small.jsonl").write_text(line * 20)
        common = ["--limit", "10", "--workers", "1", "--tokenizer", args.tokenizer]
        small, _ = peak_mb([*loopfit, f"x={tmp / 'small.jsonl'}", *common, "--out", tmp / "a"])
        streamed, _ = peak_mb([*loopfit, f"x={big}", *common, "--out", tmp / "b"])
        whole, _ = peak_mb([sys.executable, "-c", WHOLE, big, args.tokenizer])
        result = {"bench": "prepare_memory", "file_mb": round(big.stat().st_size / 1e6), "documents": 10,
                  "peak_rss_mb": {"streamed": streamed, "small_file": small, "whole_file_reference": whole},
                  "streamed_minus_small_mb": streamed - small, "whole_minus_small_mb": whole - small,
                  "cpus": os.cpu_count()}
        if args.full:
            full, seconds = peak_mb([*loopfit, f"x={big}", "--workers", "2", "--tokenizer", args.tokenizer,
                                     "--out", tmp / "c"])
            manifest = json.loads((tmp / "c" / "x" / "manifest.json").read_text())
            result["full"] = {"peak_rss_mb_largest_process": full, "seconds": seconds,
                              "documents": manifest["splits"]["train"]["documents"],
                              "tokens": manifest["splits"]["train"]["tokens"]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
