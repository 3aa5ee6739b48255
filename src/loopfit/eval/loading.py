"""How many loops an evaluation runs: `--steps` parsed, and the keyword that asks a model for r loops.

Models and tokenizers are loaded by `loopfit.loading` (`load`), the one way in."""

from .. import LoopfitError
from ..loading import is_recurrent


def steps_kwargs(model, num_steps):
    """Keyword arguments that make `model(...)` / `model.generate(...)` run `num_steps` loops ({} for a plain model)."""
    return {"num_steps": int(num_steps)} if is_recurrent(model) and num_steps is not None else {}


def parse_steps(text, flag="--steps"):
    """'1,2,4,8' -> [1, 2, 4, 8]; rejects an empty list and non-positive or non-integer values, naming `flag`."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise LoopfitError(f"{flag} is empty: give test-time recurrences like {flag} 1,2,4,8")
    try:
        steps = [int(p) for p in parts]
    except ValueError:
        raise LoopfitError(f"{flag} must be positive integers like 1,2,4,8, got '{text}'") from None
    if any(s < 1 for s in steps):
        raise LoopfitError(f"{flag} must be positive integers like 1,2,4,8, got '{text}'")
    return sorted(set(steps))
