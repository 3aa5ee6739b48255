"""The training sampler: packed fixed-length sequences from a phased blend, a pure function of (seed, step, rank).

    blend = load_blend("recipes/blend.yaml", "data/")
    sampler = BlendSampler(blend, seq_len=1024, global_batch_size=64, rank=rank, world_size=world, seed=0,
                           total_steps=10_000)
    for step in range(start, total_steps):
        batch = sampler.batch(step, lr_fraction=lr / lr_start)   # input_ids, labels, dataset
    checkpoint["sampler"] = sampler.state_dict()                 # tiny: the steps at which phases began

How a global batch is drawn (every rank computes the same plan and keeps its own slice):
1. The phase at `step` gives normalised weights w over the datasets. The batch's `global_batch_size` slots
   are split between datasets by systematic sampling with a per-step random offset: dataset d gets
   floor or ceil of w_d * global_batch_size slots, exactly w_d on average. The slots are then shuffled.
2. The k-th sequence ever drawn from dataset d is its unit perm_{d,e}[k mod N_d] in epoch e = k div N_d, a
   fresh permutation per epoch, so every unit is seen once before any repeats. How many sequences each dataset
   gave before `step` has a closed form per step, so `batch(step)` needs no history beyond the phase starts.
3. Units: with pack="concat" (default) a unit is a `seq_len` window of the dataset's token stream (documents
   run into each other, separated by EOS; the windows' offset shifts each epoch). With pack="docs" a unit
   starts at a document and takes the following whole documents that fit; the rest is EOS padding with
   labels -100 (a document longer than `seq_len` is cut). No sequence then starts mid-document.

Labels follow transformers: `labels` equals `input_ids` (-100 where no loss) and the model shifts them. A dataset
of conversations (`prepare` wrote a loss mask) has labels -100 outside the assistant turns: its documents begin
with masked template tokens and end with a masked end of text, so in either packing no loss reaches from one
document into the next.

Ranks: global slot j goes to rank j // (global_batch_size // world_size), so ranks get disjoint shares whose
union is the single-process batch; changing world_size (same global batch) leaves the token stream unchanged.
"""

import bisect
import functools
import warnings

import numpy as np

from .. import LoopfitError
from .shards import open_dataset

STATE_FORMAT = "loopfit-sampler/1"
_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x):
    """splitmix64 finaliser over a uint64 array: a fast counter-based hash."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M
        return x ^ (x >> np.uint64(31))


def uniform(seed, stream, index):
    """Deterministic uniforms in [0, 1) for an int array `index`, independent across (seed, stream)."""
    key = _mix(np.asarray([seed * 1_000_003 + stream], dtype=np.uint64))
    return (_mix(np.asarray(index, dtype=np.uint64) ^ key) >> np.uint64(11)).astype(np.float64) * 2.0**-53


class BlendSampler:
    """Packed batches from a Blend (see the module docstring for how they are drawn).

    Arguments: blend (from `load_blend`), seq_len, global_batch_size (sequences per optimizer step over all
    ranks; must divide by world_size), rank, world_size, seed, total_steps (needed by `fraction` triggers and
    the epoch report), pack ("concat" or "docs"), max_epochs (warn when a
    dataset would be seen more often than this), lr_fraction_at (optional callable step -> lr / lr_start:
    then lr-triggered switches are known in advance and `batch` needs no `lr_fraction`), split ("train").
    """

    def __init__(self, blend, seq_len, global_batch_size, *, rank=0, world_size=1, seed=0, total_steps=None,
                 pack="concat", max_epochs=4.0, lr_fraction_at=None, split="train"):  # fmt: skip
        if seq_len < 2 or global_batch_size < 1:
            raise LoopfitError(f"seq_len {seq_len} and global_batch_size {global_batch_size} must be >= 2 and >= 1")
        if world_size < 1 or not 0 <= rank < world_size or global_batch_size % world_size:
            raise LoopfitError(f"global_batch_size {global_batch_size} must divide evenly over world_size {world_size} "
                               f"(rank {rank})")
        if pack not in ("concat", "docs"):
            raise LoopfitError(f"unknown pack '{pack}': "
                               "use 'concat' (documents run together) or 'docs' (whole documents)")
        needs_total = any(p.until and p.until[0] == "fraction" for p in blend.phases)
        if needs_total and not total_steps:
            raise LoopfitError("the blend has an 'until: {fraction: F}' phase: pass total_steps to the sampler")
        self.blend, self.seq_len, self.global_batch_size = blend, seq_len, global_batch_size
        self.rank, self.world_size, self.seed, self.total_steps = rank, world_size, seed, total_steps
        self.pack, self.max_epochs, self.lr_fraction_at = pack, max_epochs, lr_fraction_at
        self.local_batch_size = global_batch_size // world_size
        self.dataset_names = blend.dataset_names
        self.datasets = [open_dataset(blend.datasets[n], split) for n in self.dataset_names]
        self.vocab_size = self.datasets[0].manifest["tokenizer"]["vocab_size"]  # token ids are < vocab_size
        self.units = np.asarray([self._num_units(ds) for ds in self.datasets], dtype=np.int64)
        # Per phase: cumulative weights over all datasets (fixed order), last exactly 1.
        self._cum_weights = []
        for phase in blend.phases:
            w = np.asarray([phase.weights.get(n, 0.0) for n in self.dataset_names])
            cum = np.cumsum(w)
            cum[np.flatnonzero(w)[-1] :] = 1.0
            self._cum_weights.append(cum)
        self._starts = [0]  # step at which each phase began, as far as known
        self._last_step = -1
        self._cache = (0, np.zeros(len(self.datasets), dtype=np.int64))  # (step, draws per dataset before it)
        self._warned = set()
        # unit order per (dataset, epoch), cached per sampler: a cache on the method would keep samplers alive
        self._permutation = functools.lru_cache(maxsize=8)(self._unit_order)
        if total_steps:
            for row in self.report():
                if row["epochs"] > max_epochs:
                    self._warn(row["dataset"], row["epochs"], "will be")

    def _num_units(self, ds):
        if self.pack == "docs":
            return ds.num_docs
        if ds.num_tokens < self.seq_len:
            raise LoopfitError(f"dataset '{ds.name}' has {ds.num_tokens} tokens, fewer than seq_len {self.seq_len}: "
                               "prepare more data or shorten seq_len")
        return ds.num_tokens // self.seq_len

    # ------------------------------------------------------------ phases

    def _static_end(self, p):
        kind, value = self.blend.phases[p].until
        end = value if kind == "step" else round(value * self.total_steps) if kind == "fraction" else None
        return None if end is None else max(end, self._starts[p])

    def _lr_fired(self, p, step, lr_fraction):
        if self.lr_fraction_at is not None:
            lr_fraction = self.lr_fraction_at(step)
        if lr_fraction is None:
            raise LoopfitError(f"phase '{self.blend.phases[p].name}' ends on lr_fraction: "
                               "pass batch(step, lr_fraction=lr / lr_start)")
        return lr_fraction <= self.blend.phases[p].until[1]

    def phase_at(self, step, lr_fraction=None):
        """Index of the phase that `step` belongs to (into blend.phases). Switches found here are recorded, so
        call it (or `batch`) for steps in increasing order, passing lr / lr_start when a phase ends on lr."""
        p = bisect.bisect_right(self._starts, step) - 1
        if p < len(self._starts) - 1 or step <= self._last_step:
            return p  # a later phase is known to start after `step`, or `step` was seen already
        while p < len(self.blend.phases) - 1:
            end = self._static_end(p)
            if end is None:  # lr trigger
                if self.lr_fraction_at is not None:
                    end = next((s for s in range(max(self._starts[p], self._last_step + 1), step + 1)
                                if self._lr_fired(p, s, None)), None)  # fmt: skip
                elif self._lr_fired(p, step, lr_fraction):
                    if step > self._last_step + 1 and self._last_step >= 0:
                        warnings.warn(f"lr-triggered phase switch seen at step {step} after step {self._last_step}: "
                                      "load the sampler's state_dict on resume to keep the exact switch step",
                                      stacklevel=3)  # fmt: skip
                    end = step
            if end is None or end > step:
                break
            self._starts.append(end)
            p += 1
        self._last_step = max(self._last_step, step)
        return p

    # ------------------------------------------------------------ the plan of a global batch

    def _counts(self, p, steps):
        """Slots per dataset for each step in `steps` under phase p: int64 [len(steps), n_datasets]."""
        b = self.global_batch_size
        u = uniform(self.seed, 1, steps)[:, None]
        edges = np.ceil(self._cum_weights[p][None, :] * b - u).astype(np.int64)
        return np.diff(edges, axis=1, prepend=np.ceil(-u).astype(np.int64))

    def _draws_before(self, step):
        """How many sequences each dataset gave in steps [0, step): sum of closed-form per-step counts."""
        cached_step, cached = self._cache
        base, total = (cached_step, cached.copy()) if cached_step <= step else (0, np.zeros_like(cached))
        for p, start in enumerate(self._starts):
            end = self._starts[p + 1] if p + 1 < len(self._starts) else step
            lo, hi = max(start, base), min(end, step)
            for a in range(lo, hi, 1 << 20):
                total += self._counts(p, np.arange(a, min(hi, a + (1 << 20)))).sum(axis=0)
        self._cache = (step, total)
        return total

    def plan(self, step, lr_fraction=None):
        """The global batch at `step` as (dataset index, draw index) arrays of length global_batch_size: slot j
        holds the draws[j]-th sequence ever taken from dataset datasets[j]."""
        p = self.phase_at(step, lr_fraction)
        b = self.global_batch_size
        counts = self._counts(p, np.asarray([step]))[0]
        datasets = np.repeat(np.arange(len(self.datasets)), counts)
        before = self._draws_before(step)
        first = np.cumsum(counts) - counts
        draws = before[datasets] + np.arange(b) - first[datasets]
        order = np.argsort(uniform(self.seed, 2, step * b + np.arange(b)), kind="stable")
        after = before + counts
        for d in np.flatnonzero(after > self.max_epochs * self.units):
            if d not in self._warned:
                self._warn(self.dataset_names[d], after[d] / self.units[d], "is now")
        return datasets[order], draws[order]

    def _warn(self, name, epochs, verb):
        self._warned.add(self.dataset_names.index(name))
        warnings.warn(f"dataset '{name}' {verb} repeated {epochs:.2f} times (limit {self.max_epochs}): "
                      "prepare more data, lower its weight or raise max_epochs", stacklevel=3)  # fmt: skip

    # ------------------------------------------------------------ reading units

    def _unit_order(self, d, epoch):
        return np.random.default_rng([self.seed, 3, d, epoch]).permutation(int(self.units[d]))

    def _row(self, d, k):
        """(tokens, labels) of the k-th draw from dataset d: seq_len tokens; labels -100 on padding and where the
        dataset's loss mask excludes a token."""
        ds, n = self.datasets[d], int(self.units[d])
        epoch, i = divmod(int(k), n)
        unit = int(self._permutation(d, epoch)[i])
        if self.pack == "concat":
            slack = ds.num_tokens - n * self.seq_len
            offset = int(uniform(self.seed, 4 + d, [epoch])[0] * (slack + 1))
            start = offset + unit * self.seq_len
            row = ds.tokens(start, self.seq_len)
            return row, (ds.labels(start, self.seq_len) if ds.masked else row.copy())
        start = ds.doc_start(unit)
        last = int(np.searchsorted(ds.doc_ends, start + self.seq_len, side="right")) - 1
        n_real = self.seq_len if last < unit else int(ds.doc_ends[last]) - start
        row = np.full(self.seq_len, ds.eos_token_id, dtype=np.int64)
        row[:n_real] = ds.tokens(start, n_real)
        label = np.full(self.seq_len, -100, dtype=np.int64)
        label[:n_real] = ds.labels(start, n_real) if ds.masked else row[:n_real]
        return row, label

    def batch(self, step, lr_fraction=None):
        """This rank's batch at `step`: dict of LongTensors input_ids / labels [local_batch, seq_len] and dataset
        [local_batch] (index into dataset_names). Pure in `step`
        given the phase starts (state_dict); pass lr_fraction = lr / lr_start when a phase ends on lr."""
        import torch

        datasets, draws = self.plan(step, lr_fraction)
        mine = slice(self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size)
        rows, labels = zip(*(self._row(d, k) for d, k in zip(datasets[mine], draws[mine])))
        return {
            "input_ids": torch.from_numpy(np.stack(rows)),
            "labels": torch.from_numpy(np.stack(labels)),
            "dataset": torch.from_numpy(np.asarray(datasets[mine], dtype=np.int64)),
        }

    # ------------------------------------------------------------ state and report

    def state_dict(self):
        """Small, JSON-able state: with it a new sampler continues exactly (token for token) where this one was."""
        return {"format": STATE_FORMAT, "blend": self.blend.fingerprint, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "pack": self.pack, "phase_starts": list(self._starts),
                "last_step": self._last_step}  # fmt: skip

    def load_state_dict(self, state):
        """Restore `state_dict()` output; rank and world_size may differ from the run that saved it."""
        mine = self.state_dict()
        for key in ("format", "blend", "seed", "seq_len", "global_batch_size", "pack"):
            if state.get(key) != mine[key]:
                raise LoopfitError(f"sampler state was saved with {key}={state.get(key)!r}, this run has "
                                   f"{mine[key]!r}: resume with the same blend and data settings")  # fmt: skip
        self._starts = [int(s) for s in state["phase_starts"]]
        self._last_step = int(state["last_step"])
        self._cache = (0, np.zeros(len(self.datasets), dtype=np.int64))

    def report(self, total_steps=None):
        """Per dataset: tokens available and the expected tokens drawn / epochs over `total_steps` (default: the
        sampler's). Phase lengths come from their triggers; an lr-triggered phase without `lr_fraction_at`
        counts as running to the end (so later phases count zero), marked with "estimated": True."""
        total = total_steps or self.total_steps
        if not total:
            raise LoopfitError("report() needs total_steps")
        bounds, estimated, start = [], False, 0
        for phase in self.blend.phases:
            if phase.until is None:
                end = total
            elif phase.until[0] == "lr_fraction":
                if self.lr_fraction_at is None:
                    end, estimated = total, True
                else:
                    end = next((s for s in range(start, total) if self.lr_fraction_at(s) <= phase.until[1]), total)
            else:
                end = phase.until[1] if phase.until[0] == "step" else round(phase.until[1] * total)
            end = min(max(end, start), total)
            bounds.append((start, end))
            start = end
        rows = []
        for d, (name, ds) in enumerate(zip(self.dataset_names, self.datasets)):
            seqs = sum((e - s) * self.global_batch_size * self.blend.phases[p].weights.get(name, 0.0)
                       for p, (s, e) in enumerate(bounds))  # fmt: skip
            epochs = seqs / int(self.units[d]) if self.pack == "concat" else seqs * self.seq_len / ds.num_tokens
            rows.append({"dataset": name, "tokens_available": ds.num_tokens, "tokens_drawn": int(seqs * self.seq_len),
                         "epochs": epochs, "estimated": estimated})  # fmt: skip
        return rows
