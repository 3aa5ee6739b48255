"""The depth plan of one forward: how many loops of the core each row runs, from which loop, and at which r the
coda reads it. Loops 0..t of a token are the same whatever r, so a row run to its deepest r can be read at any
shallower r on the way; `fixed`, `sweep` and `per_row` are three spellings of that one plan, run by the model's one
core loop.

    fixed    every row runs r = n + k loops, the first n without gradient (truncated backprop); the default
    sweep    every row runs the deepest r once and is read at each r listed; output rows r-major (r j, row i is
             output row j * batch + i)
    per_row  each row its own r, or several r read from one run of the deepest (output rows row-major); rows
             deepest first, so the rows that run loop t are the first few
A plan may start at a later loop (`first_loop`): a pass that resumes from states a shallower pass left (the
verification of a self-speculative draft runs only loops d..r-1).
"""

from dataclasses import dataclass

import torch


def resolve_steps(num_steps, default):
    """num_steps -> (n loops without gradient, k loops with gradient)."""
    if num_steps is None:
        num_steps = default
    if isinstance(num_steps, torch.Tensor):
        num_steps = num_steps.tolist()
    if isinstance(num_steps, (tuple, list)):
        n, k = (int(s) for s in num_steps)
    else:
        n, k = 0, int(num_steps)
    if n < 0 or k < 0 or n + k < 1:
        raise ValueError(f"num_steps must be r >= 1 or (n, k) with n, k >= 0 and n + k >= 1 (got {num_steps})")
    return n, k


def _ints(values):
    return [int(r) for r in (values.tolist() if isinstance(values, torch.Tensor) else values)]


def check_row_steps(row_steps, batch, unsupported=False):
    """row_steps -> per row, the r it is read at, deepest first (several r for a row that reads several); rows in
    non-increasing order of their deepest r (so the rows that run loop t are the first few)."""
    reads = [tuple(_ints(r)) if isinstance(r, (tuple, list, torch.Tensor)) else (int(r),) for r in row_steps]
    depth = [rs[0] if rs else 0 for rs in reads]
    if len(reads) != batch or min(depth, default=0) < 1 or any(a < b for a, b in zip(depth, depth[1:])) \
            or any(a < b for rs in reads for a, b in zip(rs, rs[1:])) or min(min(rs) for rs in reads) < 1:
        raise ValueError(f"row_steps must give one r >= 1 (or several r, deepest first) per row, deepest rows first "
                         f"(got {[rs[0] if len(rs) == 1 else list(rs) for rs in reads]} for {batch} rows)")
    if unsupported:
        raise ValueError("row_steps is for inference alone: not with training, sweep, exit_criterion, warm_start "
                         "or output_hidden_states")
    return reads


def check_sweep(sweep, unsupported=False, cache_policy="exact"):
    """sweep -> a list of distinct r, deepest first."""
    depth = _ints(sweep)
    if not depth or min(depth) < 1 or any(a <= b for a, b in zip(depth, depth[1:])):
        raise ValueError(f"sweep must list distinct r >= 1, deepest first (got {depth})")
    if unsupported:
        raise ValueError("sweep is for inference alone: not with training, row_steps, exit_criterion, warm_start, "
                         "drafts or output_hidden_states")
    if cache_policy != "exact":
        raise ValueError(f"sweep needs cache_policy 'exact', not {cache_policy!r}: a ring slot holds one r's loop")
    return depth


@dataclass(frozen=True)
class DepthPlan:
    """reads[i]: the r's input row i is read at, deepest first; outputs: (input row, r) of each output row, in
    order; the first `no_grad_loops` loops run without gradient; the core starts at loop `first_loop`."""

    reads: tuple
    outputs: tuple
    no_grad_loops: int = 0
    first_loop: int = 0

    @classmethod
    def fixed(cls, num_steps, default, batch, first_loop=0):
        n, k = resolve_steps(num_steps, default)
        return cls(((n + k,),) * batch, tuple((i, n + k) for i in range(batch)), n, first_loop)

    @classmethod
    def sweep(cls, depths, batch, unsupported=False, cache_policy="exact"):
        depths = tuple(check_sweep(depths, unsupported, cache_policy))
        return cls((depths,) * batch, tuple((i, r) for r in depths for i in range(batch)))

    @classmethod
    def per_row(cls, row_steps, batch, first_loop=0, unsupported=False):
        reads = tuple(check_row_steps(row_steps, batch, unsupported))
        if min(rs[-1] for rs in reads) < first_loop:
            raise ValueError(f"a row_steps pass resumed at loop {first_loop} reads only r >= {first_loop}")
        return cls(reads, tuple((i, r) for i, rs in enumerate(reads) for r in rs), 0, first_loop)

    @property
    def depth(self):
        """The deepest r: the loops the first row runs."""
        return self.reads[0][0]

    def rows_at(self, loop):
        """How many rows run this loop (the first few: rows are deepest first)."""
        return sum(rs[0] > loop for rs in self.reads)

    @property
    def read_on_the_way(self):
        """The r's some row is read at before its deepest: their states are kept as the loop passes them."""
        return {r for rs in self.reads for r in rs[1:]}

    @property
    def one_read_per_row(self):
        """Each row read once, at its deepest r, in row order: the coda reads the final states as they are."""
        return self.outputs == tuple((i, rs[0]) for i, rs in enumerate(self.reads))
