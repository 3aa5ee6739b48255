"""Evaluation and logging packages are extras: the core does not require them, `make setup` installs them, a verb
that needs a missing one names the extra, and the caps move together (pyproject, the Makefile's torch range)."""

import re
import sys
from pathlib import Path

import pytest

from loopfit import LoopfitError
from loopfit.eval.run import require_extras

ROOT = Path(__file__).resolve().parents[2]


def _section(text, name):
    return text.split(f"[{name}]", 1)[1].split("\n[", 1)[0]


def test_the_core_leaves_evaluation_and_logging_packages_to_extras():
    text = (ROOT / "pyproject.toml").read_text()
    core = _section(text, "project").split("dependencies = [", 1)[1].split("]", 1)[0]
    extras = _section(text, "project.optional-dependencies")
    for package in ("lm-eval", "math-verify", "reasoning-gym", "tensorboard", "wandb", "mlflow", "trackio"):
        assert package not in core and package in extras, package
    for extra in ("eval", "tensorboard", "wandb", "mlflow", "trackio"):
        assert re.search(rf"^{extra} = \[", extras, re.M), extra
    # `make setup` installs the lock, compiled from the dev extra, which holds the eval and tensorboard extras
    dev = re.search(r"^dev = \[(.*?)\]$", extras, re.M | re.S).group(1)
    assert all(p in dev for p in ("lm-eval", "math-verify", "reasoning-gym", "tensorboard"))


def test_the_makefile_torch_range_is_pyprojects():
    pyproject = re.search(r'"(torch[^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    makefile = re.search(r"^TORCH_RANGE := (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert pyproject == makefile


def test_a_task_that_needs_a_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(LoopfitError, match=r"--tasks math needs math-verify, which is not installed: pip install "
                                           r"'loopfit\[eval\]'"):
        require_extras(["loss", "math"])
    with pytest.raises(LoopfitError, match=r"--tasks lm:hellaswag needs lm-eval, .*'loopfit\[eval\]'"):
        require_extras(["lm:hellaswag"])
    require_extras(["loss", "gsm8k"])  # loopfit's own GSM8K needs no extra
