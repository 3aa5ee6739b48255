"""loopfit: retrofit depth recurrence into pretrained language models and train them to think deeper."""

import importlib.abc
import importlib.util
import sys

__version__ = "0.2.0"


class LoopfitError(Exception):
    """A user mistake or bad input: the CLI prints the message as one line, without a traceback."""


# The oldest transformers loopfit supports: keep equal to the lower bound in pyproject.toml (a test checks).
MIN_TRANSFORMERS = "5.16.1"


def _transformers_problem():
    """A one-line message if the installed transformers is older than supported (read without importing it)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        installed = version("transformers")
    except PackageNotFoundError:
        return f"transformers is not installed: run `pip install 'transformers>={MIN_TRANSFORMERS}'`"
    if Version(installed) < Version(MIN_TRANSFORMERS):
        return (f"transformers {installed} is older than loopfit supports (>= {MIN_TRANSFORMERS}): run "
                f"`pip install -U 'transformers>={MIN_TRANSFORMERS}'`")
    return None


TRANSFORMERS_PROBLEM = _transformers_problem()


_REGISTERED = False


def _register_with_auto_classes():
    # With loopfit imported, AutoConfig / AutoModelForCausalLM know the "loopfit" model type: no remote code needed.
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model import LoopfitConfig, LoopfitForCausalLM

    try:
        AutoConfig.register("loopfit", LoopfitConfig)
        AutoModelForCausalLM.register(LoopfitConfig, LoopfitForCausalLM)
    except ValueError:  # already registered (module reloaded)
        pass


class _RegisterWhenTransformersLoads(importlib.abc.MetaPathFinder):
    """`import loopfit` stays light (the CLI's --help and --version import neither torch nor transformers), yet
    the Auto classes know the "loopfit" model type as soon as transformers or loopfit's model code is imported,
    whichever comes first (the model code imports transformers: it registers once it is complete)."""

    NAMES = ("transformers", "loopfit.model")

    def find_spec(self, name, path=None, target=None):
        if name not in self.NAMES or getattr(self, "_busy", False):
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            if "loopfit.model" in sys.modules and not hasattr(sys.modules["loopfit.model"], "LoopfitForCausalLM"):
                return  # transformers loaded for the model code, which is still importing: it registers when done
            if sys.meta_path.count(self):
                sys.meta_path.remove(self)
            _register_with_auto_classes()

        spec.loader.exec_module = exec_module
        return spec


def __getattr__(name):
    if name in ("LoopfitConfig", "LoopfitForCausalLM"):
        if TRANSFORMERS_PROBLEM:
            raise ImportError(TRANSFORMERS_PROBLEM)
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'loopfit' has no attribute {name!r}")


if TRANSFORMERS_PROBLEM is None:
    if "transformers" in sys.modules:
        _register_with_auto_classes()
    else:
        sys.meta_path.insert(0, _RegisterWhenTransformersLoads())

__all__ = ["LoopfitConfig", "LoopfitForCausalLM", "LoopfitError", "__version__"]
