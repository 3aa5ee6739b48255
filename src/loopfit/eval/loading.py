"""The keyword that asks a model for r loops, and results rows as read from a file (`--loops` is read by
`loopfit.loops`).

Models and tokenizers are loaded by `loopfit.loading` (`load`), the one way in."""

from ..loading import is_recurrent


def steps_kwargs(model, num_steps):
    """Keyword arguments that make `model(...)` / `model.generate(...)` run `num_steps` loops ({} for a plain model)."""
    return {"num_steps": int(num_steps)} if is_recurrent(model) and num_steps is not None else {}


def normalise_rows(rows):
    """Results rows as read from a file, with r under "loops" (files written before the rename call it "steps")."""
    return [row if "loops" in row else {("loops" if k == "steps" else k): v for k, v in row.items()} for row in rows]
