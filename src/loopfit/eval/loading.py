"""How many loops an evaluation runs: `--loops` parsed, and the keyword that asks a model for r loops.

Models and tokenizers are loaded by `loopfit.loading` (`load`), the one way in."""

from .. import LoopfitError
from ..loading import is_recurrent


def steps_kwargs(model, num_steps):
    """Keyword arguments that make `model(...)` / `model.generate(...)` run `num_steps` loops ({} for a plain model)."""
    return {"num_steps": int(num_steps)} if is_recurrent(model) and num_steps is not None else {}


def parse_loops(text, flag="--loops"):
    """'1,2,4,8' -> [1, 2, 4, 8]; rejects an empty list and non-positive or non-integer values, naming `flag`."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise LoopfitError(f"{flag} is empty: give test-time loops r like {flag} 1,2,4,8")
    try:
        loops = [int(p) for p in parts]
    except ValueError:
        raise LoopfitError(f"{flag} must be positive integers like 1,2,4,8, got '{text}'") from None
    if any(r < 1 for r in loops):
        raise LoopfitError(f"{flag} must be positive integers like 1,2,4,8, got '{text}'")
    return sorted(set(loops))


def normalise_rows(rows):
    """Results rows as read from a file, with r under "loops" (files written before the rename call it "steps")."""
    return [row if "loops" in row else {("loops" if k == "steps" else k): v for k, v in row.items()} for row in rows]
