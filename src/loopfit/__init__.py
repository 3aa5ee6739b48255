"""loopfit: retrofit depth recurrence into pretrained language models and train them to think deeper."""

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


def _register_with_auto_classes():
    # With loopfit imported, AutoConfig / AutoModelForCausalLM know the "loopfit" model type: no remote code needed.
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model import LoopfitConfig, LoopfitForCausalLM

    try:
        AutoConfig.register("loopfit", LoopfitConfig)
        AutoModelForCausalLM.register(LoopfitConfig, LoopfitForCausalLM)
    except ValueError:  # already registered (module reloaded)
        pass


if TRANSFORMERS_PROBLEM is None:
    _register_with_auto_classes()
    from .model import LoopfitConfig, LoopfitForCausalLM  # noqa: E402
else:  # `import loopfit` still works (the CLI prints the problem as one line); the model classes do not

    def __getattr__(name):
        if name in ("LoopfitConfig", "LoopfitForCausalLM"):
            raise ImportError(TRANSFORMERS_PROBLEM)
        raise AttributeError(f"module 'loopfit' has no attribute {name!r}")

__all__ = ["LoopfitConfig", "LoopfitForCausalLM", "LoopfitError", "__version__"]
