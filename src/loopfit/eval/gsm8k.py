"""GSM8K accuracy as test-time recurrence grows: chain-of-thought prompt, greedy generation, strict and
flexible extraction (see `loopfit.eval.extract` and `loopfit.eval.prompts`)."""

from . import items as test_sets
from .extract import flexible_answer, strict_answer
from .generation import generate_at
from .prompts import GSM8K_STOP, gsm8k_prompt


def score(completion, reference):
    """{'strict': 0/1, 'flexible': 0/1} for one completion against the reference number."""
    return {
        "strict": float(strict_answer(completion) == reference),
        "flexible": float(flexible_answer(completion) == reference),
    }


def evaluate(model, tokenizer, steps, prompt="8shot", limit=None, seed=1234, max_new_tokens=256, batch_size=8,
             problems=None, exit_criterion=None, draft_steps=None, draft_tokens=None):
    """(rows, samples): one row per (r, metric) with the accuracy; samples hold every completion. With
    `exit_criterion` (adaptive exit, r the most loops a token may use) a 'mean_loops' row is added per r."""
    problems = test_sets.subset(problems or test_sets.gsm8k_test(), limit, seed)
    prompts = [gsm8k_prompt(p["question"], prompt) for p in problems]
    task = "gsm8k" if prompt == "8shot" else f"gsm8k_{prompt}"
    rows, samples = [], []
    for r in steps:
        completions, loop_rows = generate_at(model, tokenizer, prompts, r, task, max_new_tokens, GSM8K_STOP, batch_size,
                                             exit_criterion, draft_steps, draft_tokens)
        rows += loop_rows
        scores = [score(c, p["answer"]) for c, p in zip(completions, problems)]
        for metric in ("strict", "flexible"):
            value = sum(s[metric] for s in scores) / len(scores)
            rows.append({"task": task, "steps": r, "metric": f"accuracy_{metric}", "value": value, "n": len(scores)})
        samples += [
            {"task": task, "steps": r, "id": p["id"], "reference": p["answer"], "completion": c, **s}
            for p, c, s in zip(problems, completions, scores)
        ]
    return rows, samples
