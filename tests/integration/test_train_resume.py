"""Resume after `kill -9` (between checkpoints and in the middle of writing one) is bit-exact on CPU."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import tiny_models
import torch
import yaml
from safetensors.torch import load_file

STEPS = 24


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    tiny_models.recurrent().save_pretrained(root / "tiny")
    recipe = {
        "model": {"init_from": str(root / "tiny")},
        "data": {"synthetic": "pattern", "seq_len": 16},
        # sampled depth (state noise uses the RNG), Muon + AdamW, accumulation, warmup + decay: all must resume
        "recurrence": {"mean": 4, "backprop": 2, "curriculum": "1-sqrt", "curriculum_fraction": 0.5},
        "optim": {"lr": 0.02, "adamw_lr": 0.003},
        "schedule": {"name": "wsd", "warmup": 3, "decay": 0.5},
        "train": {"steps": STEPS, "batch_size": 4, "micro_batch_size": 2, "progress": False, "eval_every": 8,
                  "eval_batches": 1, "tensorboard": False},
        "checkpoint": {"every": 4, "keep": 2},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# `loopfit train` with a pause where a kill must land: after a checkpoint's files are written and before its
# manifest, and after final/ is written and before it is renamed into place (patched in here, not in loopfit).
SLOW_WRITER = """
import contextlib, runpy, sys, time
import loopfit.train.checkpoint as checkpoint, loopfit.train.trainer as trainer
pause = float(sys.argv.pop(1))
hash_file, atomic_dir, paused = checkpoint.sha256_file, trainer.atomic_dir, set()

def slow_hash(path):
    if path.parent not in paused:
        paused.add(path.parent)
        time.sleep(pause)
    return hash_file(path)

@contextlib.contextmanager
def slow_atomic_dir(*args, **kwargs):
    with atomic_dir(*args, **kwargs) as tmp:
        yield tmp
        time.sleep(pause)

checkpoint.sha256_file, trainer.atomic_dir = slow_hash, slow_atomic_dir
sys.argv[0] = "loopfit"
runpy.run_module("loopfit.cli", run_name="__main__")
"""


def launch(recipe_path, out, *extra, pause=0.0):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = [sys.executable, "-c", SLOW_WRITER, str(pause)] if pause else [sys.executable, "-m", "loopfit.cli"]
    cmd = [*start, "train", str(recipe_path), f"--train.out_dir={out}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc):
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


def kill_when(proc, ready, timeout=120):
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
        assert time.time() - t0 < timeout
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def reference(recipe_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    finish(launch(recipe_path, out))
    return load_file(out / "final/model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_kill_9_between_checkpoints_resumes_bit_exact(recipe_path, reference, tmp_path):
    out = tmp_path / "run"
    proc = launch(recipe_path, out)
    kill_when(proc, lambda: (out / "checkpoints/step-00000008/manifest.json").exists())
    assert not (out / "final").exists()
    err = finish(launch(recipe_path, out, "--resume"))
    assert "resumed from" in err
    assert_same_weights(load_file(out / "final/model.safetensors"), reference)
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == STEPS


def test_kill_9_while_writing_a_checkpoint_resumes_bit_exact(recipe_path, reference, tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    proc = launch(recipe_path, out, pause=1.0)  # the checkpoint writer sleeps before its manifest: kill it there
    kill_when(proc, lambda: ckpts.exists() and any(p.name.startswith(".step-00000008.tmp") for p in ckpts.iterdir()))
    assert not (ckpts / "step-00000008").exists() and (ckpts / "step-00000004/manifest.json").exists()
    err = finish(launch(recipe_path, out, "--resume"))
    assert "step-00000004 at step 4" in err
    assert_same_weights(load_file(out / "final/model.safetensors"), reference)
    assert not any(p.name.startswith(".step-") for p in ckpts.iterdir())  # the killed write left nothing behind


def jsonl_records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def csv_steps(out):
    with open(out / "metrics.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def test_torn_metrics_line_neither_stops_resume_nor_compare(recipe_path, tmp_path):
    """A kill in the middle of a metrics append leaves a torn last line: compare warns and reads the rest;
    --resume drops it (with a note) and the files read as one run, each step once, CSV matching JSONL."""
    out = tmp_path / "run"
    proc = launch(recipe_path, out)
    kill_when(proc, lambda: (out / "checkpoints/step-00000008/manifest.json").exists())
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "loss": 4.1')  # cut mid-append
    report = subprocess.run([sys.executable, "-m", "loopfit.cli", "compare", str(out), "--out", str(tmp_path / "cmp")],
                            capture_output=True, text=True)
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr[-2000:]
    assert "warning:" in report.stderr and "torn last line" in report.stderr
    err = finish(launch(recipe_path, out, "--resume"))
    assert "torn last line" in err
    records = jsonl_records(out)
    train_steps = [r["step"] for r in records if r.get("loss") is not None]
    assert train_steps == list(range(1, STEPS + 1))
    assert csv_steps(out) == [r["step"] for r in records]


def test_kill_9_while_exporting_final_then_resume_logs_the_end_once(recipe_path, tmp_path):
    """Killed while final/ is written (after the end-of-run held-out loss was logged): --resume exports final/,
    logs no second eval_loss row, and reports the run's last loss, not nan."""
    out = tmp_path / "run"
    # eval_every 0: the held-out loss is measured only at the end, in its own row, just before final/ is written
    proc = launch(recipe_path, out, "--train.eval_every=0", "--checkpoint.every=12", pause=1.0)
    kill_when(proc, lambda: out.exists() and any(p.name.startswith(".final.tmp") for p in out.iterdir()))
    assert not (out / "final").exists()
    evals = [r for r in jsonl_records(out) if r.get("eval_loss") is not None]
    assert len(evals) == 1 and evals[0]["step"] == STEPS  # the killed run had logged it
    err = finish(launch(recipe_path, out, "--resume", "--train.eval_every=0", "--checkpoint.every=12"))
    records = jsonl_records(out)
    assert [r for r in records if r.get("eval_loss") is not None] == evals
    assert csv_steps(out) == [r["step"] for r in records] and csv_steps(out).count(STEPS) == 2  # train row + eval row
    last_loss = [r["loss"] for r in records if r.get("loss") is not None][-1]
    done = next(line for line in err.splitlines() if "done:" in line)
    assert ("loss nan" not in done and f"loss {last_loss:.4f}" in done
            and f"held-out loss {evals[0]['eval_loss']:.4f}" in done)
    assert (out / "final/model.safetensors").exists()
    assert not any(p.name.startswith(".final.tmp") for p in out.iterdir())  # the killed export's leftovers are gone
