"""Metrics sinks on rank 0: OUT/metrics.jsonl (every key), OUT/metrics.csv (fixed columns), OUT/tb (TensorBoard).

On resume the lines past the checkpoint's step (written by the killed run after its last checkpoint) are
dropped, so the files read as one uninterrupted run.
"""

import csv
import json
import math
from pathlib import Path

CSV_COLUMNS = ("step", "loss", "eval_loss", "lr", "grad_norm", "n", "k", "rbar", "tokens", "flops", "flops_full", "tokens_per_s",
               "mfu", "mfu_full", "time")


def _truncate_jsonl(path, step):
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _truncate_csv(path, step):
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= step]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(keep)


class Metrics:
    def __init__(self, out_dir, resume_step=None, tensorboard=True, enabled=True):
        self.enabled = enabled
        self.out = Path(out_dir)
        self.jsonl = self.out / "metrics.jsonl"
        self.csv = self.out / "metrics.csv"
        self.tb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            for p in (self.jsonl, self.csv):
                p.unlink(missing_ok=True)
        else:
            _truncate_jsonl(self.jsonl, resume_step)
            _truncate_csv(self.csv, resume_step)
        if not self.csv.exists():
            with open(self.csv, "w", newline="") as f:
                csv.writer(f).writerow(CSV_COLUMNS)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tb"), purge_step=None if resume_step is None else resume_step + 1)
            except ImportError:  # tensorboard not installed: JSONL and CSV still work
                self.tb = None

    def log(self, record):
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerow(["" if record.get(c) is None else record.get(c) for c in CSV_COLUMNS])
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()
