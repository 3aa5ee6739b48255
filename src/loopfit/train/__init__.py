"""Training: `train(recipe, overrides, resume=...)` is `loopfit train` as a Python function."""

from .trainer import train

__all__ = ["train"]
