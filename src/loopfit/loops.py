"""The loops r a command runs, read and checked once at the edge (the CLI or a public Python function), before any
model loads: `--loops` lists and the self-speculation settings (`--draft-loops`, `--draft-tokens`) that go with
them. `eval`, `generate`, `quickstart` and the lm-eval model type all check here."""

from . import LoopfitError

# tokens a speculative round drafts by default: the model's own default, written here too so that the CLI's parsers
# need not import the model (torch); keep equal to loopfit.model.DRAFT_TOKENS (a test checks)
DRAFT_TOKENS = 4


def parse_loops(value, flag="--loops"):
    """'1,2,4,8' (or an int, or a list of them) -> [1, 2, 4, 8], sorted and distinct; refuses an empty list and
    non-positive or non-integer values with one line naming `flag`."""
    text = value if isinstance(value, str) else ",".join(map(str, [value] if isinstance(value, int) else value))
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise LoopfitError(f"{flag} is empty: give test-time loops r like {flag} 1,2,4,8")
    try:
        loops = [int(p) for p in parts]
    except ValueError:
        raise LoopfitError(f"{flag} must be positive integers like 1,2,4,8, got '{text}'") from None
    if any(r < 1 for r in loops):
        raise LoopfitError(f"{flag} must be positive integers like 1,2,4,8, got '{text}'")
    return sorted(set(loops))


def check_speculation(model, loops, draft_loops, draft_tokens=DRAFT_TOKENS, exit_criterion=None, warm_start=False):
    """Refuse --draft-loops settings that cannot run, before any work, with the CLI's names. `loops` is one r or a
    list of r (an eval sweep: an r <= D decodes plainly there, so only the largest r must exceed D)."""
    if draft_loops is None:
        return
    from .loading import is_recurrent

    if not is_recurrent(model):
        raise LoopfitError("--draft-loops needs a loopfit (recurrent) model; this one is plain: drop --draft-loops")
    if draft_loops < 1 or draft_tokens < 1:
        raise LoopfitError(f"--draft-loops and --draft-tokens must be >= 1 (got {draft_loops} and {draft_tokens})")
    top = max(loops) if isinstance(loops, (list, tuple)) else (loops or model.config.mean_recurrence)
    if draft_loops >= top:
        raise LoopfitError(f"--draft-loops {draft_loops} must be below --loops {top}: the draft runs the first D of "
                           "the r loops")
    if model.config.cache_policy != "exact":
        raise LoopfitError(f"--draft-loops needs the exact cache, but this model's cache_policy is "
                           f"'{model.config.cache_policy}': set \"cache_policy\": \"exact\" in its config.json")
    if exit_criterion or warm_start:
        raise LoopfitError(f"--draft-loops does not combine with {'--exit' if exit_criterion else '--warm-start'}: "
                           "choose one")
