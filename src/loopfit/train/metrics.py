"""Metrics sinks on rank 0: OUT/metrics.jsonl (every record as logged), OUT/metrics.csv (one row per step, every
key of the JSONL as a column: a step's training record and its held-out loss share the row), OUT/tb
(TensorBoard), and the trackers `train.loggers` names (loopfit.train.trackers: wandb, mlflow, trackio).

The files read as one run whatever the moment a run was killed. On resume the records past the checkpoint's
step (written by the killed run after its last checkpoint) are dropped, a last line torn by a kill in the
middle of an append is dropped with a note, and metrics.csv is rewritten from the kept metrics.jsonl records
(it may miss the row a kill interrupted). `last(key)` and `logged(step, key)` let the trainer pick up what the
killed run already logged (its last loss, its end-of-run held-out loss) instead of logging it twice.
"""

import csv
import io
import json
import math
from pathlib import Path

from .. import LoopfitError
from ..io import atomic_file

CSV_COLUMNS = ("step", "loss", "eval_loss", "lr", "lr_adamw", "grad_norm", "n", "k", "rbar", "tokens", "flops",
               "flops_full", "tokens_per_s", "mfu", "mfu_full", "time", "skipped", "peak_memory_gib")


def read_records(path):
    """(records, notes) of a metrics.jsonl file: a torn last line (a crash mid-append) is dropped with a note;
    an unreadable line elsewhere is a LoopfitError naming it."""
    path = Path(path)
    if not path.exists():
        return [], []
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    records, notes = [], []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            if i == last:
                notes.append(f"{path}: dropped a torn last line (line {i + 1}, cut by a crash mid-write)")
                continue
            raise LoopfitError(f"{path} line {i + 1} is not a JSON record: delete or fix that line") from None
        records.append(record)
    return records, notes


def csv_rows(records):
    """(columns, rows): the records merged by step (a later record's keys fill in its step's row), the known
    columns first, then any other key in order of appearance."""
    rows = {}
    for record in records:
        rows.setdefault(record.get("step"), {}).update({k: v for k, v in record.items() if v is not None})
    extra = [k for r in records for k in r if k not in CSV_COLUMNS]
    columns = list(CSV_COLUMNS) + list(dict.fromkeys(extra))
    return columns, list(rows.values())


def _csv_text(records):
    columns, rows = csv_rows(records)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    return buf.getvalue()


def _csv_row(record):
    return ["" if record.get(c) is None else record.get(c) for c in CSV_COLUMNS]


class Metrics:
    def __init__(self, out_dir, resume_step=None, tensorboard=True, enabled=True, trackers=()):
        self.enabled, self.trackers = enabled, list(trackers)
        self.out = Path(out_dir)
        self.jsonl = self.out / "metrics.jsonl"
        self.csv = self.out / "metrics.csv"
        self.tb = None
        self.records, self.notes = [], []  # on resume: what the run logged up to the checkpoint's step
        if resume_step is not None:
            # every rank reads (the trainer's decisions must agree); rank 0 then rewrites the files atomically
            records, self.notes = read_records(self.jsonl)
            self.records = [r for r in records if r.get("step", 0) <= resume_step]
        self.written = list(self.records)  # what metrics.csv is rewritten from at close
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            for p in (self.jsonl, self.csv):
                p.unlink(missing_ok=True)
        else:
            with atomic_file(self.jsonl, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
            with atomic_file(self.csv, "w") as f:
                f.write(_csv_text(self.records))
        if not self.csv.exists():
            with open(self.csv, "w", newline="") as f:
                csv.writer(f).writerow(CSV_COLUMNS)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tb"),
                                        purge_step=None if resume_step is None else resume_step + 1)
            except ImportError:  # tensorboard not installed: JSONL and CSV still work
                self.tb = None
                self.notes.append("tensorboard is not installed: no TensorBoard logs in out_dir/tb "
                                  "(pip install 'loopfit[tensorboard]', or drop tensorboard from train.loggers)")

    def last(self, key, default=None):
        """The last logged value of `key` (from the resumed run's records), else `default`."""
        return next((r[key] for r in reversed(self.records) if r.get(key) is not None), default)

    def logged(self, step, key):
        """The value of `key` logged at exactly `step` by the resumed run, else None."""
        return next((r[key] for r in reversed(self.records) if r.get("step") == step and r.get(key) is not None), None)

    def log(self, record):
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        with open(self.csv, "a", newline="") as f:  # until close() merges each step into one row
            csv.writer(f).writerow(_csv_row(record))
        self.written.append(record)
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
        for tracker in self.trackers:
            tracker.log(record)

    def close(self):
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.enabled and self.written:
            with atomic_file(self.csv, "w") as f:
                f.write(_csv_text(self.written))
            self.written = []
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
