"""Experiment trackers beside metrics.jsonl: Weights & Biases, MLflow and trackio, each an optional extra that is
imported only when `train.loggers` names it.

Each gets the run's config (the resolved recipe) once and the same records metrics.jsonl holds, at their step
(held-out loss included). No network is needed for the tests or for offline work: `WANDB_MODE=offline` writes
wandb's files under OUT/wandb; MLflow writes to MLFLOW_TRACKING_URI, else a file store in OUT/mlruns (experiment
MLFLOW_EXPERIMENT_NAME, else "loopfit"); trackio keeps its local database (TRACKIO_DIR). The project of wandb and
trackio is WANDB_PROJECT / TRACKIO_PROJECT, else "loopfit"; the run is named after train.out_dir. A resumed run
continues the same tracker run (its id is kept in OUT/trackers.json), and `loopfit eval --log-to OUT` adds an
r-sweep to it.
"""

import importlib.util
import json
import math
import os
import time
import uuid
from pathlib import Path

from .. import LoopfitError
from ..io import atomic_file

FILES = ("jsonl", "csv")  # always written: resume and `loopfit compare` read them
LOGGERS = ("jsonl", "csv", "tensorboard", "wandb", "mlflow", "trackio")
EXTRAS = {"wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
MODULES = {"wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}  # tensorboard: skipped with a note if absent
IDS = "trackers.json"


def check_loggers(loggers):
    """Refuse an unknown logger name, or a tracker whose package is not installed (without importing it)."""
    for name in loggers:
        if name not in LOGGERS:
            raise LoopfitError(f"train.loggers has an unknown logger {name!r}: choose from {', '.join(LOGGERS)} "
                               "(wandb, mlflow and trackio install as extras, e.g. pip install 'loopfit[wandb]')")
    for name in loggers:
        if name in MODULES and importlib.util.find_spec(MODULES[name]) is None:
            raise LoopfitError(f"train.loggers names {name}, which is not installed: pip install "
                               f"'loopfit[{EXTRAS[name]}]' (or drop {name} from train.loggers)")


def flat(config, prefix=""):
    """{'optim.lr': 0.001, ...} from the nested recipe (lists and mappings as JSON text)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and prefix == "":
            out.update(flat(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return out


def numbers(record):
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


def _ids(out):
    try:
        return json.loads((Path(out) / IDS).read_text())
    except (OSError, ValueError):
        return {}


def _save_id(out, name, run_id):
    ids = {**_ids(out), name: run_id}
    with atomic_file(Path(out) / IDS, "w") as f:
        json.dump(ids, f)


class Wandb:
    def __init__(self, out, config, resume):
        import wandb

        run_id = _ids(out).get("wandb") if resume else None
        run_id = run_id or uuid.uuid4().hex[:12]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "loopfit"), name=Path(out).name, id=run_id,
                              dir=str(out), config=config, resume="allow", reinit="create_new")
        _save_id(out, "wandb", run_id)

    def log(self, record):
        self.run.log(numbers(record), step=int(record["step"]))

    def log_sweep(self, by_r):
        self.run.define_metric("sweep/loops")
        self.run.define_metric("sweep/*", step_metric="sweep/loops")
        for r, values in sorted(by_r.items()):
            self.run.log({"sweep/loops": r, **values})

    def close(self):
        self.run.finish()


class Mlflow:
    def __init__(self, out, config, resume):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the run's own file store: no server, no database (MLflow asks to be told that is meant)
            uri = (Path(out).resolve() / "mlruns").as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "loopfit")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run_id = _ids(out).get("mlflow") if resume else None
        if run_id is None:
            run_id = self.client.create_run(experiment_id, run_name=Path(out).name).info.run_id
            from mlflow.entities import Param

            params = [Param(k, str(v)[:500]) for k, v in flat(config).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[i:i + 100])
            _save_id(out, "mlflow", run_id)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, record):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, int(record["step"])) for k, v in numbers(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_sweep(self, by_r):
        for r, values in sorted(by_r.items()):
            self.log({"step": r, **values})

    def close(self):
        self.client.set_terminated(self.run_id)


class Trackio:
    def __init__(self, out, config, resume):
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "loopfit"), name=Path(out).name, config=config,
                     resume="allow" if resume else "never")

    def log(self, record):
        self.trackio.log(numbers(record), step=int(record["step"]))

    def log_sweep(self, by_r):
        for r, values in sorted(by_r.items()):
            self.trackio.log({"sweep/loops": r, **values})

    def close(self):
        self.trackio.finish()


TRACKERS = {"wandb": Wandb, "mlflow": Mlflow, "trackio": Trackio}


def open_trackers(loggers, out, config, resume):
    """The tracker objects `loggers` names (JSONL, CSV and TensorBoard are metrics.py's own)."""
    check_loggers(loggers)
    return [TRACKERS[name](out, config, resume) for name in loggers if name in TRACKERS]


def run_loggers(run_dir):
    """(loggers, recipe) of a training run folder (its recipe.yaml), checked before an eval that logs to it."""
    import yaml

    run_dir = Path(run_dir)
    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        raise LoopfitError(f"--log-to {run_dir} is not a training run (no readable recipe.yaml): give the "
                           "train.out_dir of a `loopfit train` run") from None
    loggers = (recipe.get("train") or {}).get("loggers") or ["jsonl", "csv", "tensorboard"]
    check_loggers(loggers)
    return loggers, recipe


def log_sweep(run_dir, rows, loggers, recipe):
    """Add an eval r-sweep (results.json rows) to the training run in `run_dir`: OUT/sweep.jsonl (one line per
    row), TensorBoard's `sweep/TASK/METRIC` against r, and the run's trackers (`sweep/...` metrics with
    `sweep/loops` as their x-axis)."""
    run_dir = Path(run_dir)
    with open(run_dir / "sweep.jsonl", "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    by_r = {}
    for row in rows:
        if isinstance(row.get("value"), (int, float)):
            by_r.setdefault(row["loops"], {})[f"sweep/{row['task']}/{row['metric']}"] = row["value"]
    if "tensorboard" in loggers and (recipe.get("train") or {}).get("tensorboard", True):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            SummaryWriter = None
        if SummaryWriter is not None:
            tb = SummaryWriter(str(run_dir / "tb"))
            for r, values in sorted(by_r.items()):
                for key, value in values.items():
                    tb.add_scalar(key, value, r)
            tb.close()
    for tracker in open_trackers(loggers, run_dir, recipe, resume=True):
        tracker.log_sweep(by_r)
        tracker.close()
