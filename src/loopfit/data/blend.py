"""Phased data blends: which prepared datasets to train on, in what proportions, and when to switch.

A blend is a YAML file (or the same structure as a dict, e.g. a recipe's `data:` section):

    phases:
      - name: general               # optional
        weights: {general: 1.0}
        until: {lr_fraction: 0.2}   # this phase ends once lr <= 0.2 * lr_start (the paper's switch at lr_start/5)
      - name: qa
        weights: {general: 0.9, math: 0.1}
    datasets:                       # optional: NAME -> folder; by default NAME is the folder DATA_ROOT/NAME
      math: /data/shared/math

Weights are the fractions of the phase's training sequences (hence tokens) drawn from each dataset: they are
normalised to sum to 1, so {general: 9, math: 1} means 90% / 10% of what the model sees in that phase,
whatever the datasets' sizes. A phase ends at the first step where its `until` holds, one of:
    {step: N}           step >= N
    {fraction: F}       step >= round(F * total_steps)
    {lr_fraction: X}    the learning rate has decayed to X times its starting value (lr / lr_start <= X)
Every phase but the last needs `until`; the last runs to the end. A single-phase blend may be written as just
{weights: {...}}.
"""

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .. import LoopfitError
from .shards import MANIFEST, read_manifest

TRIGGERS = ("step", "fraction", "lr_fraction")


@dataclass(frozen=True)
class Phase:
    name: str
    weights: dict  # dataset name -> normalised weight (sums to 1; zero weights dropped)
    until: tuple | None = None  # (kind, value) with kind in TRIGGERS; None for the last phase


@dataclass(frozen=True)
class Blend:
    phases: tuple
    datasets: dict  # dataset name -> folder, for every dataset some phase uses
    fingerprint: str = field(default="")  # identifies phases + datasets (stored in sampler state)

    @property
    def dataset_names(self):
        return sorted(self.datasets)


def _load_mapping(path_or_dict):
    if isinstance(path_or_dict, dict):
        return path_or_dict, "blend"
    import yaml

    path = Path(path_or_dict)
    if not path.exists():
        raise LoopfitError(f"blend file {path} does not exist: check the path")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at_line = f" (line {line + 1})" if line is not None else ""
        raise LoopfitError(f"{path} is not valid YAML{at_line}: fix the file") from None
    if not isinstance(spec, dict):
        raise LoopfitError(f"{path} must be a mapping with 'phases' (or 'weights'): see loopfit.data.blend")
    return spec, str(path)


def _weights(raw, where):
    if not isinstance(raw, dict) or not raw:
        raise LoopfitError(f"{where}: 'weights' must map dataset names to numbers, e.g. {{general: 1.0}}")
    out = {}
    for name, w in raw.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise LoopfitError(f"{where}: weight of '{name}' is {w!r}, not a number")
        if w < 0:
            raise LoopfitError(f"{where}: weight of '{name}' is negative ({w}): weights must be >= 0")
        out[str(name)] = float(w)
    total = sum(out.values())
    if total <= 0:
        raise LoopfitError(f"{where}: all weights are zero: give at least one dataset a positive weight")
    return {name: w / total for name, w in sorted(out.items()) if w > 0}


def _until(raw, where):
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in TRIGGERS:
        raise LoopfitError(f"{where}: 'until' must be one of {{step: N}}, {{fraction: F}}, {{lr_fraction: X}}, "
                           f"got {raw!r}")
    kind, value = next(iter(raw.items()))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoopfitError(f"{where}: until {kind} must be a number, got {value!r}")
    if kind == "step" and (value != int(value) or value <= 0):
        raise LoopfitError(f"{where}: until step must be a positive integer, got {value}")
    if kind in ("fraction", "lr_fraction") and not 0 < value < 1:
        raise LoopfitError(f"{where}: until {kind} must be between 0 and 1 (exclusive), got {value}")
    return (kind, int(value) if kind == "step" else float(value))


def load_blend(path_or_dict, data_root=None):
    """Read and check a blend (YAML path or dict, format in the module docstring). Dataset names resolve to
    DATA_ROOT/NAME unless the blend's `datasets:` maps them elsewhere (relative folders: from DATA_ROOT).
    Raises LoopfitError on negative or all-zero weights, unknown datasets, misplaced `until`, or datasets
    tokenised with different tokenizers."""
    spec, src = _load_mapping(path_or_dict)
    root = Path(data_root) if data_root is not None else Path(".")
    unknown = set(spec) - {"phases", "weights", "datasets"}
    if unknown:
        raise LoopfitError(f"{src}: unknown key '{sorted(unknown)[0]}': "
                           "a blend has 'phases' (or 'weights') and 'datasets'")
    if ("phases" in spec) == ("weights" in spec):
        raise LoopfitError(f"{src}: give either 'phases: [...]' or a single phase's 'weights: {{...}}'")
    raw_phases = spec["phases"] if "phases" in spec else [{"weights": spec["weights"]}]
    if not isinstance(raw_phases, list) or not raw_phases:
        raise LoopfitError(f"{src}: 'phases' must be a non-empty list")

    phases = []
    for i, raw in enumerate(raw_phases):
        where = f"{src} phase {i + 1}"
        if not isinstance(raw, dict) or set(raw) - {"name", "weights", "until"} or "weights" not in raw:
            raise LoopfitError(f"{where}: a phase has 'weights' and optionally 'name' and 'until', got {raw!r}")
        last = i == len(raw_phases) - 1
        if last and "until" in raw:
            raise LoopfitError(f"{where}: the last phase runs to the end of training: remove its 'until'")
        if not last and "until" not in raw:
            raise LoopfitError(f"{where}: every phase but the last needs 'until' (step, fraction or lr_fraction)")
        until = _until(raw["until"], where) if "until" in raw else None
        phases.append(Phase(str(raw.get("name", f"phase{i + 1}")), _weights(raw["weights"], where), until))
    for kind in ("step", "fraction"):
        values = [p.until[1] for p in phases if p.until and p.until[0] == kind]
        if values != sorted(set(values)):
            raise LoopfitError(f"{src}: 'until {kind}' values must increase from phase to phase, got {values}")
    lr_values = [p.until[1] for p in phases if p.until and p.until[0] == "lr_fraction"]
    if lr_values != sorted(set(lr_values), reverse=True):
        raise LoopfitError(f"{src}: 'until lr_fraction' values must decrease from phase to phase, got {lr_values}")

    mapped = spec.get("datasets") or {}
    if not isinstance(mapped, dict):
        raise LoopfitError(f"{src}: 'datasets' must map names to folders")
    datasets = {}
    for phase in phases:
        for name in phase.weights:
            folder = Path(mapped[name]) if name in mapped else Path(name)
            folder = folder if folder.is_absolute() else root / folder
            if not (folder / MANIFEST).exists():
                there = sorted(p.name for p in root.iterdir() if (p / MANIFEST).exists()) if root.is_dir() else []
                raise LoopfitError(
                    f"{src} phase '{phase.name}' names dataset '{name}', which is not prepared at {folder} "
                    f"(prepared in {root}: {', '.join(there) or 'none'}): run `loopfit prepare` or fix the name"
                )
            datasets[name] = folder
    manifests = {name: read_manifest(folder) for name, folder in datasets.items()}
    tokenizers = {name: m["tokenizer"]["fingerprint"] for name, m in manifests.items()}
    if len(set(tokenizers.values())) > 1:
        raise LoopfitError(f"{src}: datasets were tokenised with different tokenizers ({tokenizers}): "
                           "prepare them all with the model's tokenizer")
    contents = sorted((n, m["tokenizer"]["fingerprint"], m["splits"]["train"]["tokens"]) for n, m in manifests.items())
    blob = json.dumps([[p.name, p.weights, p.until] for p in phases] + contents, sort_keys=True)
    return Blend(tuple(phases), datasets, "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:16])
