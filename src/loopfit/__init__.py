"""loopfit: retrofit depth recurrence into pretrained language models and train them to think deeper."""

__version__ = "0.1.0"


class LoopfitError(Exception):
    """A user mistake or bad input: the CLI prints the message as one line, without a traceback."""


def _register_with_auto_classes():
    # With loopfit imported, AutoConfig / AutoModelForCausalLM know the "loopfit" model type: no remote code needed.
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling import LoopfitConfig, LoopfitForCausalLM

    try:
        AutoConfig.register("loopfit", LoopfitConfig)
        AutoModelForCausalLM.register(LoopfitConfig, LoopfitForCausalLM)
    except ValueError:  # already registered (module reloaded)
        pass


_register_with_auto_classes()

from .modeling import LoopfitConfig, LoopfitForCausalLM  # noqa: E402

__all__ = ["LoopfitConfig", "LoopfitForCausalLM", "LoopfitError", "__version__"]
