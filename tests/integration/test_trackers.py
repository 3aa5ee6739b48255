"""train.loggers: JSONL + CSV + TensorBoard by default; Weights & Biases (WANDB_MODE=offline) and MLflow (a file
store in the run folder) when named, with the resolved recipe as their config and the JSONL's records; and
`loopfit eval --log-to RUN` adding the r-sweep to the run. The trackers run only where their extras are
installed; the refusals run everywhere."""

import csv
import json
import os
import subprocess
import sys

import pytest
import tiny_models
import torch

from loopfit import LoopfitError
from loopfit.train import trackers, train
from loopfit.train.config import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_unknown_or_missing_loggers_and_a_tracker_flag_are_refused_with_the_fix(monkeypatch):
    with pytest.raises(LoopfitError, match="unknown logger 'wandbb': choose from jsonl, csv, tensorboard, wandb, "
                                           r"mlflow, trackio .*pip install 'loopfit\[wandb\]'"):
        load_recipe(None, ["--train.loggers=[jsonl,wandbb]"])
    with pytest.raises(LoopfitError, match=r"unknown recipe key 'train.wandb': trackers are listed in train.loggers, "
                                           r"e.g. --train.loggers=\[jsonl,csv,tensorboard,wandb\]"):
        load_recipe(None, ["--train.wandb=true"])
    monkeypatch.setitem(trackers.MODULES, "mlflow", "loopfit_not_installed_module")
    with pytest.raises(LoopfitError, match=r"names mlflow, which is not installed: pip install 'loopfit\[mlflow\]'"):
        load_recipe(None, ["--train.loggers=jsonl,csv,mlflow"])
    assert load_recipe(None).train.loggers == ["jsonl", "csv", "tensorboard"]


def test_metrics_csv_has_one_row_per_step_and_every_jsonl_key(tmp_path):
    torch.manual_seed(0)
    tiny_models.recurrent().save_pretrained(tmp_path / "tiny")
    r = {"model": {"init_from": str(tmp_path / "tiny")}, "data": {"synthetic": "pattern", "seq_len": 16},
         "recurrence": {"mode": "fixed", "mean": 2, "backprop": 1, "curriculum": "none"},
         "train": {"out_dir": str(tmp_path / "run"), "steps": 4, "batch_size": 2, "micro_batch_size": 2,
                   "progress": False, "tensorboard": False, "eval_every": 2, "eval_batches": 1},
         "checkpoint": {"every": 0}}
    train(r)
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    with open(tmp_path / "run/metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4]  # the end-of-run held-out loss joins step 4's row
    keys = {k for record in records for k in record}
    assert "lr_adamw" in keys and keys <= set(rows[0])
    for record in records:
        row = rows[record["step"] - 1]
        for k, v in record.items():
            assert float(row[k]) == pytest.approx(v), k


def wandb_records(path):
    """The protobuf records of an offline .wandb file (a LevelDB-style log: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_and_mlflow_file_store_get_the_recipe_and_the_records_and_eval_adds_the_sweep(tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    torch.manual_seed(0)
    tiny_models.recurrent().save_pretrained(tmp_path / "tiny")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"<eos>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(30)}},
                                     unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="[UNK]").save_pretrained(
        tmp_path / "tiny")
    out = tmp_path / "run"
    r = {"model": {"init_from": str(tmp_path / "tiny")}, "data": {"synthetic": "pattern", "seq_len": 16},
         "recurrence": {"mode": "fixed", "mean": 2, "backprop": 1, "curriculum": "none"},
         "train": {"out_dir": str(out), "steps": 3, "batch_size": 2, "micro_batch_size": 2, "progress": False,
                   "eval_every": 0, "eval_batches": 1, "loggers": ["jsonl", "csv", "tensorboard", "wandb", "mlflow"]},
         "checkpoint": {"every": 0}}
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    try:
        result = train(r)
    finally:
        del os.environ["WANDB_MODE"], os.environ["WANDB_SILENT"]
    (log,) = out.glob("wandb/offline-run-*/*.wandb")
    records = wandb_records(log)
    (config,) = [json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "run"
                 for i in r.run.config.update if i.key == "optim"]
    assert config["lr"] == 0.001  # the resolved recipe
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] == pytest.approx(result["loss"])
    assert history[-1]["eval_loss"] == pytest.approx(result["eval_loss"])
    ids = json.loads((out / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    run = client.get_run(ids["mlflow"])
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["train.steps"] == "3"
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "loss")] == [1, 2, 3]
    assert client.get_metric_history(ids["mlflow"], "eval_loss")[0].value == pytest.approx(result["eval_loss"])

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 30}" for i in range(300)))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "loopfit.cli", "eval", str(out / "final"), "--loops", "1,2",
                           "--tasks", "loss", "--data", str(text), "--seq-len", "16", "--max-tokens", "64",
                           "--out", str(tmp_path / "ev"), "--log-to", str(out)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert {row["loops"] for row in sweep} == {1, 2}
    history = client.get_metric_history(ids["mlflow"], "sweep/loss/loss")
    by_r = {row["loops"]: row["value"] for row in sweep if row["metric"] == "loss"}
    assert {m.step: m.value for m in history} == pytest.approx(by_r)
