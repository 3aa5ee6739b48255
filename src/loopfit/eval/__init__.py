"""Evaluation: what extra test-time recurrence buys.

- `loopfit eval` (`loopfit.eval.run.evaluate`): held-out loss, GSM8K and MATH accuracy for each r.
- `loopfit compare` (`loopfit.eval.compare.compare`): equal-training-FLOPs report of several runs.
- `python -m loopfit.eval.harness`: lm-evaluation-harness with a `loopfit` model type (`num_steps=` in model_args).
"""
