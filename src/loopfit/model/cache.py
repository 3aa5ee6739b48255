"""loopfit's KV cache: one slot per (segment, loop, layer), so cached decoding equals full recomputation."""

import itertools

import torch

from .configuration import CACHE_POLICIES

# This file ships inside converted folders and meets whatever transformers the user has. transformers moves its
# cache plumbing between releases (5.24 renamed `past_key_values` to `cache`), so the model never hands its cache
# to GenerationMixin under a cache name: `generate` passes it as `loopfit_cache`, a model kwarg transformers
# forwards untouched, and every entry point takes the cache under any of these names.
CACHE_NAMES = ("loopfit_cache", "cache", "past_key_values", "cache_params")


def find_cache(kwargs):
    """The LoopfitCache among `kwargs`' cache names (a cache transformers made for itself is ignored)."""
    for name in CACHE_NAMES:
        if isinstance(kwargs.get(name), LoopfitCache):
            return kwargs[name]
    return None



class LoopfitCache:
    """KV cache with one slot per (segment, loop, layer), so cached decoding equals full recomputation.

    Policies (config `cache_policy`):
      exact  one slot per loop and core layer: memory grows with r, results equal recomputation exactly.
      ring   `cache_ring_size` slots per core layer, loop t writes and reads slot t % N: memory bounded by N, but
             a token at loop t sees earlier tokens' keys from their latest loop congruent to t mod N, not loop t,
             so outputs differ slightly from recomputation (the trade Huginn makes).
    A slot that lacks some earlier tokens (those tokens ran fewer loops, e.g. a call with a smaller r) is filled
    from the latest earlier loop those tokens have.
    """

    is_compileable = False

    def __init__(self, policy="exact", ring_size=2):
        if policy not in CACHE_POLICIES:
            raise ValueError(f"cache policy must be one of {CACHE_POLICIES}")
        self.policy, self.ring_size = policy, ring_size
        self.slots = {}  # (segment, loop, layer) -> (keys, values), each [batch, kv_heads, seq, head_dim]
        self.buffers = {}  # the same keys -> preallocated (keys, values) that slots are leading views of
        self.seen = 0  # tokens cached before the current forward
        self.start = 0
        self.last_state = None  # final recurrent state of the last token (continuous chain of thought)
        self.loops_used = []  # per decoded token, loops each row ran under adaptive exit
        self.drafts = []  # per speculative round: (tokens drafted, tokens emitted, draft tokens accepted)

    def key(self, segment, loop, layer):
        if segment == "core" and self.policy == "ring":
            loop = loop % self.ring_size
        return (segment, loop, layer)

    def get_seq_length(self, layer_idx=0):
        return self.seen

    def crop(self, length):
        """Forget every position from `length` on (speculative decoding rolls back rejected draft tokens)."""
        self.slots = {key: (k[:, :, :length], v[:, :, :length]) for key, (k, v) in self.slots.items()}
        self.seen = min(self.seen, length)

    def rewind(self, length):
        """The next forward writes from position `length` on, over what is there (a speculative verification
        rewrites the deep loops of the tokens its draft wrote); unlike `crop`, nothing is forgotten."""
        self.seen = length

    def begin(self, q_len):
        self.start = self.seen

    def end(self, q_len, last_state=None):
        """Close a forward of q_len tokens; `last_state` is its last token's final state (for `warm_start`)."""
        self.seen = self.start + q_len
        self.last_state = last_state

    def record_loops(self, loops):
        """Log the loops each row ran for one decoded token under an adaptive exit."""
        self.loops_used.append(loops)

    def record_round(self, drafted, emitted, accepted):
        """Log one self-speculative round: tokens drafted, tokens emitted, drafted tokens accepted."""
        self.drafts.append((drafted, emitted, accepted))

    def read_only(self):
        """A view that reads this cache's earlier tokens without writing this forward's (peeking at the coda)."""
        return _ReadOnlyCache(self)

    def fall_back_to_earlier_loops(self, loops, first, last, core_layers):
        """After an adaptive exit: the last token's slot of core loop u (first <= u < last) takes, in rows that
        stopped after `loops` <= u, what loop u - 1 left there, so later tokens read what an unbatched run would
        have left (Huginn's fallback). Only the exact policy keeps one slot per loop."""
        if self.policy != "exact":
            return
        for j in range(core_layers):
            for u in range(first, last):
                k_u, v_u = self.slots[("core", u, j)]
                k_p, v_p = self.slots[("core", u - 1, j)]
                skip = (loops <= u)[:, None, None, None]
                k_u[:, :, -1:] = torch.where(skip, k_p[:, :, -1:], k_u[:, :, -1:])
                v_u[:, :, -1:] = torch.where(skip, v_p[:, :, -1:], v_u[:, :, -1:])

    def _earlier(self, key, upto):
        segment, loop, layer = key
        for t in range(loop - 1, -1, -1):
            slot = self.slots.get((segment, t, layer))
            if slot is not None and slot[0].shape[2] >= upto:
                return slot
        raise RuntimeError(f"KV cache has no entries for {key} or any earlier loop; reset the cache")

    def update(self, key, k, v):
        """Write this forward's keys/values at positions [start, start + q) and return all up to there. Slots are
        views of buffers with room to grow, so a decoded token writes in place instead of copying the whole cache.
        A forward may run only the first rows of a slot (a speculative sweep verifies its deep rows alone): it
        writes and reads those rows, and the others must already hold these positions."""
        start, end, n = self.start, self.start + k.shape[2], k.shape[0]
        old, buf = self.slots.get(key), self.buffers.get(key)
        have = 0 if old is None else old[0].shape[2]
        if old is not None and n < old[0].shape[0]:
            if have < end or buf is None or buf[0].data_ptr() != old[0].data_ptr():
                raise RuntimeError(f"a forward over the first {n} of {old[0].shape[0]} cached rows needs the other "
                                   f"rows to hold positions up to {end} already (slot {key} has {have})")
            buf[0][:n, :, start:end], buf[1][:n, :, start:end] = k, v
            return buf[0][:n, :, :end], buf[1][:n, :, :end]
        if buf is None or old is None or buf[0].data_ptr() != old[0].data_ptr() or buf[0].shape[2] < end \
                or buf[0].shape[0] != n:
            room = end + max(128, end // 4)  # geometric growth: copies amortise to O(1) per token
            buf = (k.new_empty(*k.shape[:2], room, k.shape[3]), v.new_empty(*v.shape[:2], room, v.shape[3]))
            keep = min(have, start)
            if keep:
                buf[0][:, :, :keep], buf[1][:, :, :keep] = old[0][:, :, :keep], old[1][:, :, :keep]
            self.buffers[key] = buf
        if have < start:  # earlier tokens never ran this loop: take their latest earlier loop
            fk, fv = self._earlier(key, start)
            buf[0][:, :, have:start], buf[1][:, :, have:start] = fk[:, :, have:start], fv[:, :, have:start]
        # positions past `start` written earlier in this forward (ring policy) are overwritten
        buf[0][:, :, start:end], buf[1][:, :, start:end] = k, v
        self.slots[key] = (buf[0][:, :, :end], buf[1][:, :, :end])
        return self.slots[key]

    def select_rows(self, rows, outputs, depths):
        """Rebuild the batch for `row_steps` decoding: new row i goes on from old row rows[i] (its prelude and core
        slots) and new output j from old output outputs[j] (its coda slots: one per (row, r) read, see `row_steps`).
        `depths` are the new rows' deepest r, non-increasing: core slot t keeps the rows deeper than t. This drops
        ended rows, splits a row whose r's picked different tokens, and turns a `sweep` prefill (core rows per
        input row, coda rows r-major) into any decoding layout. Returns the cache."""
        if self.policy != "exact":
            raise ValueError("select_rows needs cache_policy 'exact': a ring slot mixes loops")
        rows, outputs = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(outputs, dtype=torch.long)

        def pick(segment, loop, x):
            index = outputs if segment == "coda" else rows if segment == "prelude" else \
                rows[:sum(d > loop for d in depths)]
            return x.index_select(0, index.to(x.device))

        self.slots = {key: (pick(key[0], key[1], k), pick(key[0], key[1], v)) for key, (k, v) in self.slots.items()}
        self.buffers = {}
        self.last_state = None
        return self

    def unpack(self, lengths, length):
        """A packed prefill -> a left-padded batch. The cache holds one row: a prefix, then segments of `lengths`
        tokens one after another (a coda slot holds one such row per swept r). Row i becomes the prefix, left
        padding, then segment i, `length` positions in all; a coda slot's rows become r-major (row j * b + i for
        the j-th r), as a `sweep` prefill of the padded batch leaves them. Returns the cache."""
        b = len(lengths)

        def spread(x):
            common = x.shape[2] - sum(lengths)
            out = x.new_zeros(x.shape[0] * b, x.shape[1], length, x.shape[3])
            out[:, :, :common] = x[:, :, :common].repeat_interleave(b, 0)
            for i, (start, n) in enumerate(zip(itertools.accumulate([common, *lengths]), lengths)):
                out[i::b, :, length - n:] = x[:, :, start:start + n]
            return out

        self.slots = {key: (spread(k), spread(v)) for key, (k, v) in self.slots.items()}
        self.buffers, self.seen = {}, length
        self.last_state = None
        return self

    def repeat_rows(self, repeats):
        """Each row `repeats` times over (rows i*repeats .. (i+1)*repeats - 1 copy row i): a prompt prefix that
        many prompts share is cached once, then given to all of them. Returns the cache."""
        self.slots = {key: (k.repeat_interleave(repeats, 0), v.repeat_interleave(repeats, 0))
                      for key, (k, v) in self.slots.items()}
        self.buffers = {}
        self.last_state = None
        return self

    def reorder_cache(self, beam_idx):
        self.slots = {key: (k.index_select(0, beam_idx), v.index_select(0, beam_idx))
                      for key, (k, v) in self.slots.items()}
        self.buffers = {}


class _ReadOnlyCache:
    """Reads a LoopfitCache's past keys/values without writing this forward's (probing the coda mid-loop)."""

    def __init__(self, cache):
        self.cache = cache

    def update(self, key, k, v):
        start, slot = self.cache.start, self.cache.slots.get(key)
        if slot is None or start == 0:
            return k, v
        return torch.cat([slot[0][:, :, :start], k], 2), torch.cat([slot[1][:, :, :start], v], 2)
