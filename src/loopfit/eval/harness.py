"""lm-evaluation-harness glue: a `loopfit` model type that takes the number of loops in `--model_args`.

    python -m loopfit.eval.harness --model loopfit \\
        --model_args pretrained=runs/smol-448,num_steps=8 --tasks gsm8k_loopfit --limit 20 --device cpu

`python -m loopfit.eval.harness` is lm-eval's own CLI with the `loopfit` model registered and loopfit's task
folder (`gsm8k_loopfit`, `gsm8k_loopfit_1shot`: offline GSM8K test) added to `--include_path`. The `loopfit`
model also runs plain transformers folders (num_steps is then ignored), so the baseline goes through the
same code. `draft_steps=D` (and `draft_tokens=K`) in `--model_args` decodes generations by exact
self-speculation, drafting at D loops (the same output as plain decoding at num_steps, faster; a plain model
refuses it). `loops=` and `draft_loops=` are accepted as other names of `num_steps=` and `draft_steps=` (the
model API keeps Huginn's names). From Python, `run_tasks(...)` evaluates an already-loaded model at several r.
"""

import sys
from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import loopfit  # noqa: F401  (registers model_type "loopfit" with AutoModelForCausalLM)

from .loading import steps_kwargs

TASKS_DIR = Path(__file__).parent / "tasks"


@register_model("loopfit")
class LoopfitLM(HFLM):
    """HFLM that runs a recurrent model with `num_steps` loops (default: the model's mean_recurrence)."""

    def __init__(self, pretrained, num_steps=None, draft_steps=None, draft_tokens=None, loops=None, draft_loops=None,
                 **kwargs):
        kwargs.setdefault("device", "cpu")
        super().__init__(pretrained=pretrained, **kwargs)
        self.num_steps = _one_of("num_steps", num_steps, "loops", loops)
        self.draft_steps = _one_of("draft_steps", draft_steps, "draft_loops", draft_loops)
        self.draft_tokens = int(draft_tokens) if draft_tokens not in (None, "") else None
        if self.draft_steps is not None:
            from ..loops import check_speculation
            from ..model import DRAFT_TOKENS

            r = self.num_steps or getattr(self.model.config, "mean_recurrence", None)
            check_speculation(self.model, r, self.draft_steps, self.draft_tokens or DRAFT_TOKENS)

    def _model_call(self, inps, attn_mask=None, labels=None):
        import torch

        with torch.no_grad():
            return self.model(inps, **steps_kwargs(self.model, self.num_steps)).logits

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        generation_kwargs.update(steps_kwargs(self.model, self.num_steps))
        r = self.num_steps or getattr(self.model.config, "mean_recurrence", 1)
        if self.draft_steps is not None and r > self.draft_steps:  # an r <= D in a sweep decodes plainly
            generation_kwargs.update(draft_steps=self.draft_steps)
            if self.draft_tokens:
                generation_kwargs["draft_tokens"] = self.draft_tokens
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


def _one_of(name, value, alias, alias_value):
    """The int a model_arg gives under its name or its alias (None if neither); both, disagreeing, is an error."""
    given = {int(v) for v in (value, alias_value) if v not in (None, "")}
    if len(given) > 1:
        raise ValueError(f"model_args {name}={value} and {alias}={alias_value} disagree: give one")
    return given.pop() if given else None


def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))


def run_tasks(model, tokenizer, tasks, loops, limit=None, batch_size=1, max_gen_toks=None, draft_loops=None,
              draft_tokens=None):
    """Run lm-eval `tasks` on a loaded model at each r in `loops`; (rows, raw results per r). `draft_loops` D
    decodes generations at each r > D by self-speculation."""
    import lm_eval

    lm = LoopfitLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    lm.draft_steps, lm.draft_tokens = draft_loops, draft_tokens
    rows, raw = [], {}
    gen_kwargs = f"max_gen_toks={max_gen_toks}" if max_gen_toks else None
    for r in loops:
        lm.num_steps = r
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=task_manager(),
                                      gen_kwargs=gen_kwargs, log_samples=False)
        raw[r] = out["results"]
        rows += metric_rows(out["results"], r, limit)
    return rows, raw


def metric_rows(results, r, n=None):
    """lm-eval results {task: {'exact_match,strict-match': x, ...}} -> loopfit rows (stderr and the sample count
    dropped)."""
    rows = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name.endswith("_stderr") or not isinstance(value, (int, float)) or name in ("alias", "sample_len"):
                continue
            metric = f"{name}_{filt}" if filt and filt != "none" else name
            rows.append({"task": f"lm:{task}", "loops": r, "metric": metric, "value": float(value), "n": n})
    return rows


def main(argv=None):
    """lm-eval's CLI with loopfit's model and tasks available."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in argv and argv[:1] not in (["ls"], ["validate"]):
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm-eval"] + argv
    cli_evaluate()


if __name__ == "__main__":
    main()
