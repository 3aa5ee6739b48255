"""Accuracy as test-time recurrence grows, for the generation tasks: a table of task specs (test items, prompt,
stop strings, scorer) and one runner (greedy batched generation at each r, then scoring).

  gsm8k        GSM8K test, 8-shot chain of thought; strict (`#### N` / `The answer is N`) and flexible (last
               number) extraction (`loopfit.eval.extract`); the lm-eval task `gsm8k_loopfit` uses the same scorer
  gsm8k_1shot  GSM8K test, 1-shot "Let's think step by step." (lm-eval: `gsm8k_loopfit_1shot`)
  math         MATH test (5000), Minerva 4-shot prompt, last \\boxed{} answer checked by math-verify
  math500      MATH-500, as `math`
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from ..loading import is_recurrent
from ..loops import DRAFT_TOKENS
from . import items as test_sets
from .extract import flexible_answer, math_answer, math_equal, strict_answer
from .prompts import GSM8K_STOP, MATH_STOP, gsm8k_messages, gsm8k_prompt, math_messages, math_prompt


def score_gsm8k(completion, reference):
    """{'strict': 0/1, 'flexible': 0/1} for one completion against the reference number."""
    return {
        "strict": float(strict_answer(completion) == reference),
        "flexible": float(flexible_answer(completion) == reference),
    }


def score_math(completion, reference):
    """{'answer': the extracted answer, 'correct': 0/1 by math-verify} for one completion."""
    answer = math_answer(completion)
    return {"answer": answer, "correct": float(math_equal(answer, reference))}


@dataclass(frozen=True)
class GenerationTask:
    items: Callable[[], list]  # () -> test items {'id', 'question', 'answer', ...}
    prompt: Callable[[str], str]  # question -> prompt
    stop: list
    max_new_tokens: int
    score: Callable[[str, str], dict]  # (completion, reference) -> sample fields, the metrics' among them
    metrics: dict  # result metric -> the sample field it averages
    messages: Callable[[str], list] | None = None  # question -> the prompt as a conversation (--chat)


_GSM8K_METRICS = {"accuracy_strict": "strict", "accuracy_flexible": "flexible"}
TASKS = {
    "gsm8k": GenerationTask(test_sets.gsm8k_test, partial(gsm8k_prompt, style="8shot"), GSM8K_STOP, 256,
                            score_gsm8k, _GSM8K_METRICS, partial(gsm8k_messages, style="8shot")),
    "gsm8k_1shot": GenerationTask(test_sets.gsm8k_test, partial(gsm8k_prompt, style="1shot"), GSM8K_STOP, 256,
                                  score_gsm8k, _GSM8K_METRICS, partial(gsm8k_messages, style="1shot")),
    "math": GenerationTask(partial(test_sets.math_test, "all"), math_prompt, MATH_STOP, 512, score_math,
                           {"accuracy_math_verify": "correct"}, math_messages),
    "math500": GenerationTask(partial(test_sets.math_test, "500"), math_prompt, MATH_STOP, 512, score_math,
                              {"accuracy_math_verify": "correct"}, math_messages),
}


def score(task, r, items, completions):
    """(rows, samples) of one task at r: one row per metric (the mean over items), one sample per completion."""
    spec = TASKS[task]
    samples = [{"task": task, "loops": r, "id": it["id"], "reference": it["answer"], "completion": c,
                **spec.score(c, it["answer"])} for it, c in zip(items, completions)]
    rows = [{"task": task, "loops": r, "metric": metric, "value": sum(s[field] for s in samples) / len(samples),
             "n": len(samples)} for metric, field in spec.metrics.items()]
    return rows, samples


def chat_prompts(tokenizer, task, questions):
    """The task's prompts rendered as conversations with the tokenizer's chat template, ready for the assistant's
    turn (a BOS the template writes is left to the tokenizer, which adds its own), and the stop strings to use:
    the task's, less the blank line a chat answer may hold."""
    from ..data.chat import render, resolve_template

    template = resolve_template(tokenizer, None, "--chat")
    prompts = [render(tokenizer, TASKS[task].messages(q), template, add_generation_prompt=True) for q in questions]
    bos = tokenizer.bos_token
    if bos and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        prompts = [p.removeprefix(bos) for p in prompts]
    return prompts, [s for s in TASKS[task].stop if s != "\n\n"]


def evaluate(model, tokenizer, task, loops, limit=None, seed=1234, max_new_tokens=None, batch_size=8, items=None,
             exit_criterion=None, draft_loops=None, draft_tokens=None, chat=False):
    """(rows, samples) of a task of TASKS at each r in `loops`: one row per (r, metric), every completion in
    samples. `items` replaces the task's test set; `limit` takes a fixed random subset (`seed`). With
    `exit_criterion` (adaptive exit, r the most loops a token may use) a 'mean_loops' row is added per r.
    `draft_loops` D decodes each r > D by exact self-speculation (the same completions): inside the sweep, or
    for each r on its own where there is no sweep. `chat` renders the prompts with the tokenizer's chat template
    (the exemplars as earlier turns); answers are scored the same way."""
    from .generation import generate_at, generate_sweep

    spec = TASKS[task]
    items = test_sets.subset(items or spec.items(), limit, seed)
    prompts, stop = [spec.prompt(it["question"]) for it in items], spec.stop
    if chat:
        prompts, stop = chat_prompts(tokenizer, task, [it["question"] for it in items])
        spec = dataclasses.replace(spec, stop=stop)
    max_new_tokens = max_new_tokens or spec.max_new_tokens
    swept = None
    if is_recurrent(model) and exit_criterion is None \
            and model.config.cache_policy == "exact":  # every r in one pass (the same completions, far faster)
        swept = generate_sweep(model, tokenizer, prompts, loops, max_new_tokens, spec.stop, batch_size,
                               f"{task} r={','.join(map(str, loops))}", draft_loops,
                               draft_tokens or DRAFT_TOKENS)
    rows, samples = [], []
    for r in loops:
        completions, loop_rows = (swept[int(r)], []) if swept else generate_at(
            model, tokenizer, prompts, r, task, max_new_tokens, spec.stop, batch_size, exit_criterion, draft_loops,
            draft_tokens)
        task_rows, task_samples = score(task, r, items, completions)
        rows += loop_rows + task_rows
        samples += task_samples
    return rows, samples
