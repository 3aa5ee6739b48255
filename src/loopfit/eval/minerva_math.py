"""MATH accuracy as test-time recurrence grows: Minerva 4-shot prompt, greedy generation, the last boxed
answer compared with the reference by math-verify. (Named after the protocol: `math.py` would shadow the
standard library module for anyone running files from this folder.)"""

from . import items as test_sets
from .extract import math_answer, math_equal
from .generation import generate_at
from .prompts import MATH_STOP, math_prompt


def evaluate(model, tokenizer, steps, subset="all", limit=None, seed=1234, max_new_tokens=512, batch_size=8,
             problems=None, exit_criterion=None, draft_steps=None, draft_tokens=None):
    """(rows, samples): one row per r with math-verify accuracy; samples hold every completion. With
    `exit_criterion` (adaptive exit) a 'mean_loops' row is added per r."""
    problems = test_sets.subset(problems or test_sets.math_test(subset), limit, seed)
    prompts = [math_prompt(p["question"]) for p in problems]
    task = "math" if subset == "all" else f"math{subset}"
    rows, samples = [], []
    for r in steps:
        completions, loop_rows = generate_at(model, tokenizer, prompts, r, task, max_new_tokens, MATH_STOP, batch_size,
                                             exit_criterion, draft_steps, draft_tokens)
        rows += loop_rows
        answers = [math_answer(c) for c in completions]
        correct = [float(math_equal(a, p["answer"])) for a, p in zip(answers, problems)]
        rows.append({"task": task, "steps": r, "metric": "accuracy_math_verify", "value": sum(correct) / len(correct),
                     "n": len(correct)})
        samples += [
            {"task": task, "steps": r, "id": p["id"], "reference": p["answer"], "answer": a, "completion": c,
             "correct": ok}
            for p, a, c, ok in zip(problems, answers, completions, correct)
        ]
    return rows, samples
