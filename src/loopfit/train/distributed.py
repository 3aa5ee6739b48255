"""torchrun support, applied from outside the model: process group setup, DDP or FSDP2 wrapping, reductions.

Under `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK set) the process group uses NCCL on GPUs and gloo on CPUs.
FSDP2 (`fully_shard`) shards every transformer block, then the root model; the core blocks, which run many
times per forward, keep their gathered weights between loops (reshard_after_forward=False) so a loop does not
re-gather them.
"""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..loading import is_recurrent


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def setup():
    """Start the process group if launched by torchrun; returns a Dist describing this process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def blocks(model):
    """The transformer blocks of a loopfit model (prelude, core, coda) or of a plain HF causal LM (model.layers)."""
    if is_recurrent(model):
        return model.fsdp_units()
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None) or getattr(inner, "h", None)
    if layers is None:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} for FSDP")
    return [("layer", b) for b in layers]


def wrap(model, strategy, d):
    """The model ready for training on `d`: unchanged for one process, DDP or FSDP2 under torchrun."""
    model.to(d.device)
    if d.world == 1 and not dist.is_initialized():  # (a one-rank process group still wraps: FSDP2 checks)
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for part, block in blocks(model):
            fully_shard(block, reshard_after_forward=part != "core")
        fully_shard(model)
        return model
    raise ValueError(f"unknown distributed strategy {strategy!r}")


def unwrap(model):
    return getattr(model, "module", model)


@contextlib.contextmanager
def grad_sync(model, enabled):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP no_sync / FSDP2 set_requires_gradient_sync)."""
    if enabled or not dist.is_initialized():
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_sum(values, device):
    """Sum a list of floats over ranks (one collective); returns a list of floats."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj):
    """List of `obj` from every rank (on every rank)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
