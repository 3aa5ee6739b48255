"""Deprecated: the model moved to the package `loopfit.model`; import from there (this module goes in 0.3.0)."""

import warnings

from .model import *  # noqa: F403
from .model import __all__  # noqa: F401

warnings.warn("loopfit.modeling is deprecated and goes in loopfit 0.3.0: import from loopfit.model",
              DeprecationWarning, stacklevel=2)
