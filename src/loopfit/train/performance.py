"""Speed and memory switches of a training run: per-block compilation and activation checkpointing.

Compilation (`train.compile`) compiles each transformer block on its own (`Block.compile()`), not the whole
model: every block of the same family shares one compiled graph (module parameters are graph inputs), so the
looped core runs that graph for every loop and every sampled (n, k) without recompiling; the loop itself, the
no-grad / grad switch of truncated backprop and the loss stay eager Python. One graph is made for loops with
gradients and one for loops without. `auto` compiles on CUDA only: on a CPU the first steps spend tens of seconds
compiling for a modest gain per step, which a short CPU run (tests, the quickstart) does not earn back; ask for it
with `train.compile: true` on long CPU runs.

Activation checkpointing (`train.activation_checkpointing`) recomputes blocks in the backward instead of keeping
their activations: `core` the core blocks (the loops with gradients hold k copies of their activations), `all`
every block. Loops without gradients keep nothing either way. A plain (non-recurrent) model has no core: `core`
checkpoints all its layers there.
"""

from functools import partial

import torch
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from .. import LoopfitError
from .distributed import blocks


def compile_wanted(setting, device):
    """Whether `train.compile` (auto | true | false) compiles on `device`; raises LoopfitError with the fix when
    compilation was asked for and cannot work there."""
    setting = str(setting).lower()
    if setting == "false":
        return False
    problem = compile_problem(device)
    if setting == "auto":
        return device.type == "cuda" and problem is None
    if problem:
        raise LoopfitError(f"train.compile=true cannot work here: {problem}; or set train.compile=false")
    return True


def compile_problem(device):
    """Why torch.compile cannot compile for `device` (a sentence naming the fix), or None."""
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception:  # noqa: BLE001  (InvalidCxxCompiler, or a broken toolchain)
            return "no working C++ compiler for torch.compile on the CPU: install g++ (or set CXX to one)"
        return None
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch.compile needs triton on CUDA: install it (pip install triton)"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 7:
            return f"torch.compile's GPU kernels need compute capability >= 7.0, this GPU has {major}.{minor}"
        return None
    return f"torch.compile is not supported on {device.type} devices by loopfit"


def compile_blocks(model):
    """Compile every transformer block in place (parameter names, checkpoints and FSDP units are unchanged)."""
    for _, block in blocks(model):
        block.compile()
    return model


def set_activation_checkpointing(model, which):
    """Recompute the blocks `which` names (none | core | all) in the backward; returns how many blocks."""
    chosen = [b for part, b in blocks(model) if which == "all" or (which == "core" and part in ("core", "layer"))]
    if which not in ("none", "core", "all"):
        raise LoopfitError(f"train.activation_checkpointing is {which!r}: choose one of none, core, all")
    for block in chosen:
        if not isinstance(block, GradientCheckpointingLayer):
            raise LoopfitError(f"{type(block).__name__} blocks cannot recompute activations: set "
                               "train.activation_checkpointing=none")
        block.gradient_checkpointing = True  # transformers' GradientCheckpointingLayer then checkpoints forward
        block._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
    return len(chosen)
