"""Training: `train(recipe, overrides, resume=...)` is `loopfit train` as a Python function.

The trainer (torch) is imported when `train` is first used, so that `loopfit train --help`, which reads only the
recipe's keys, starts at once."""


def __getattr__(name):
    if name == "train":
        from .trainer import train

        return train
    raise AttributeError(f"module 'loopfit.train' has no attribute {name!r}")


__all__ = ["train"]
