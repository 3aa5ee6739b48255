"""What the trainer reads: a data source is any object with

    batch(step, lr_fraction) -> {"input_ids": LongTensor[B_rank, T], "labels": LongTensor[B_rank, T]}
        this rank's rows of the global batch of `step` (labels aligned with input_ids, -100 = ignore; the
        trainer shifts them), deterministic in (seed, step, rank) so a resumed run reads the same batches
    state_dict() / load_state_dict(state)     whatever else it needs to resume (JSON-like values)
    vocab_size                                 largest token id + 1 it can produce (checked against the model)
    eval_batches(n) -> iterable of such dicts  optional: this rank's held-out batches for the fixed-r eval loss

`build_source` makes one from the recipe's `data` section (a DataConfig, checked when the recipe loads):
`synthetic:` (random or learnable patterns, for smoke tests and benchmarks), `tokens:` (one .npy / .pt file of
token ids, sampled in windows), or else the prepared shards and phased blends of `loopfit.data`.
"""

import pickle
from pathlib import Path

import numpy as np
import torch

from .. import LoopfitError


def _rows(global_batch, rank, world):
    per = global_batch // world
    return slice(rank * per, (rank + 1) * per)


class SyntheticSource:
    """Deterministic synthetic batches: 'random' tokens, or 'pattern' (arithmetic sequences mod vocab: learnable)."""

    def __init__(self, kind="pattern", vocab_size=256, seq_len=64, batch_size=8, rank=0, world=1, seed=0):
        self.kind, self.vocab_size, self.seq_len = kind, int(vocab_size), int(seq_len)
        self.batch_size, self.rank, self.world, self.seed = int(batch_size), rank, world, int(seed)

    def _make(self, key):
        rng = np.random.default_rng([self.seed, *key])
        if self.kind == "random":
            ids = rng.integers(0, self.vocab_size, (self.batch_size, self.seq_len))
        else:
            start = rng.integers(0, self.vocab_size, (self.batch_size, 1))
            stride = rng.integers(1, 8, (self.batch_size, 1))
            ids = (start + stride * np.arange(self.seq_len)) % self.vocab_size
        ids = torch.from_numpy(ids[_rows(self.batch_size, self.rank, self.world)]).long()
        return {"input_ids": ids, "labels": ids.clone()}

    def batch(self, step, lr_fraction=1.0):
        return self._make((0, step))

    def eval_batches(self, n):
        return (self._make((1, i)) for i in range(n))

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class TokenWindowSource:
    """Random windows of seq_len tokens from one 1-D array of token ids; the last 5% is held out for eval."""

    def __init__(self, tokens, seq_len=1024, batch_size=8, rank=0, world=1, seed=0, vocab_size=None):
        tokens = torch.as_tensor(np.asarray(tokens)).long().flatten()
        if len(tokens) < 2 * (seq_len + 1):
            raise LoopfitError(f"data.tokens holds {len(tokens)} tokens, too few for data.seq_len {seq_len}")
        cut = int(len(tokens) * 0.95)
        self.train, self.heldout = tokens[:cut], tokens[cut:]
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.rank, self.world = rank, world
        self.vocab_size = int(vocab_size or int(tokens.max()) + 1)

    def _windows(self, tokens, key):
        rng = np.random.default_rng([self.seed, *key])
        hi = max(1, len(tokens) - self.seq_len)
        starts = rng.integers(0, hi, self.batch_size)[_rows(self.batch_size, self.rank, self.world)]
        ids = torch.stack([tokens[s:s + self.seq_len] for s in starts])
        return {"input_ids": ids, "labels": ids.clone()}

    def batch(self, step, lr_fraction=1.0):
        return self._windows(self.train, (0, step))

    def eval_batches(self, n):
        return (self._windows(self.heldout, (1, i)) for i in range(n))

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _load_tokens(path, vocab_size=None):
    """The token ids of a .npy / .pt file, checked: an integer array, no negative ids, none past vocab_size."""
    path = Path(path)
    if not path.is_file():
        raise LoopfitError(f"data.tokens file {path} not found: pass a .npy or .pt file of token ids")
    fix = "save a 1-D integer array of token ids (np.save or torch.save)"
    try:
        if path.suffix == ".npy":
            tokens = np.load(path, mmap_mode="r")
        elif path.suffix == ".pt":
            tokens = torch.load(path, weights_only=True)
        else:
            raise LoopfitError(f"data.tokens {path} must be a .npy or .pt file of token ids")
    except (ValueError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise LoopfitError(f"data.tokens {path} is not a readable array ({_first_line(e)}): {fix}") from None
    dtype = getattr(tokens, "dtype", None)
    integer = dtype is not None and (np.issubdtype(dtype, np.integer) if isinstance(dtype, np.dtype)
                                     else not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool))
    if not integer:
        what = f"an array of {dtype}" if dtype is not None else f"a {type(tokens).__name__}"
        raise LoopfitError(f"data.tokens {path} holds {what}, not integer token ids: {fix}")
    if tokens.size == 0 if isinstance(tokens, np.ndarray) else tokens.numel() == 0:
        raise LoopfitError(f"data.tokens {path} is empty: {fix}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0:
        raise LoopfitError(f"data.tokens {path} holds negative token ids (down to {low}): token ids start at 0; "
                           "tokenize the text again with the model's tokenizer")
    if vocab_size is not None and high >= vocab_size:
        raise LoopfitError(f"data.tokens {path} holds token id {high}, past data.vocab_size {vocab_size}: raise "
                           "data.vocab_size or tokenize the text again with the model's tokenizer")
    return tokens


def _first_line(e):
    return (str(e).splitlines() or [type(e).__name__])[0][:120]


class BlendSource:
    """The prepared shards and phased blend of `loopfit.data` (BlendSampler), plus held-out batches of a dataset."""

    def __init__(self, sampler, eval_folder=None, eval_batch_size=4):
        self.sampler, self.eval_folder, self.eval_batch_size = sampler, eval_folder, eval_batch_size

    def batch(self, step, lr_fraction=None):
        b = self.sampler.batch(step, lr_fraction)
        return {"input_ids": b["input_ids"], "labels": b["labels"]}

    def eval_batches(self, n):
        if self.eval_folder is None:
            return []
        from ..data import iter_eval_batches

        s = self.sampler
        return iter_eval_batches(self.eval_folder, s.seq_len, self.eval_batch_size, max_batches=n, rank=s.rank,
                                 world_size=s.world_size)

    def check_tokenizer(self, model_dir):
        from ..data import check_tokenizer

        if not any(Path(model_dir).glob("tokenizer*")):
            return  # a model folder without tokenizer files: nothing to compare against
        for folder in self.sampler.blend.datasets.values():
            check_tokenizer(folder, model_dir)

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state):
        if state:
            self.sampler.load_state_dict(state)


def build_source(data, batch_size, rank, world, seed, total_steps=None, lr_fraction_at=None, eval_batch_size=4):
    """A data source for this rank from the recipe's `data` section (a DataConfig, or a dict of its keys; see the
    module docstring and `loopfit train --help`)."""
    from .config import data_config

    cfg = data_config(data)
    if cfg.kind is None:
        raise LoopfitError("the recipe has no data: set data.root and data.blend (from `loopfit prepare`), or "
                           "data.synthetic / data.tokens (see the recipes shipped in loopfit/recipes/)")
    if cfg.kind == "synthetic":
        return SyntheticSource(cfg.synthetic, cfg.vocab_size or 256, cfg.seq_len, batch_size, rank, world, seed)
    if cfg.kind == "tokens":
        tokens = _load_tokens(cfg.tokens, cfg.vocab_size)
        return TokenWindowSource(tokens, cfg.seq_len, batch_size, rank, world, seed, cfg.vocab_size)
    from ..data import BlendSampler, load_blend

    if cfg.root is not None and not Path(cfg.root).is_dir():
        raise LoopfitError(f"data.root {cfg.root} does not exist: run `loopfit prepare ... --out {cfg.root}` first")
    blend = load_blend(cfg.blend_spec(), cfg.root)
    sampler = BlendSampler(blend, cfg.seq_len, batch_size, rank=rank, world_size=world, seed=seed,
                           total_steps=total_steps, pack=cfg.pack, lr_fraction_at=lr_fraction_at)
    eval_folder = None
    if cfg.eval:
        from ..data import open_dataset

        eval_folder = blend.datasets.get(cfg.eval) or Path(cfg.root or ".") / cfg.eval
        try:  # at set-up, not when the first held-out loss is due
            open_dataset(eval_folder, "val")
        except LoopfitError as e:
            raise LoopfitError(f"data.eval {cfg.eval}: {e}") from None
    return BlendSource(sampler, eval_folder, eval_batch_size)
