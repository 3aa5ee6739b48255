"""Optional dependencies: what each extra installs, and one line naming the extra when a verb needs a missing one.

  pip install 'loopfit[eval]'         lm-eval, math-verify, reasoning-gym: `eval` (GSM8K / MATH / lm: tasks),
                                      `prepare` of reasoning-gym sources (rg:, math), the quickstart
  pip install 'loopfit[tensorboard]'  TensorBoard logs of `train` (train.loggers: tensorboard)
  pip install 'loopfit[wandb]' / 'loopfit[mlflow]' / 'loopfit[trackio]'   experiment trackers (train.loggers)

`make setup` installs them all.
"""

import importlib.util

from . import LoopfitError

MODULES = {"lm_eval": "eval", "math_verify": "eval", "reasoning_gym": "eval", "tensorboard": "tensorboard",
           "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
PACKAGES = {"lm_eval": "lm-eval", "math_verify": "math-verify", "reasoning_gym": "reasoning-gym"}


def require(module, what):
    """Refuse, before any work, `what` (e.g. "--tasks gsm8k") when `module` is not installed: one line naming the
    extra that brings it."""
    try:
        missing = importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a broken or blocked install
        missing = True
    if missing:
        extra = MODULES[module]
        raise LoopfitError(f"{what} needs {PACKAGES.get(module, module)}, which is not installed: "
                           f"pip install 'loopfit[{extra}]'")
