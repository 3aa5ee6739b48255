"""loopfit's depth-recurrent causal LM, in one self-contained file.

    e   = Prelude(embed(x))                               first p layers of the base model
    s_0 = noise (truncated normal), zeros, or e
    s_i = Core(Adapter(concat[s_{i-1}, e]))   i = 1..r    a block of layers looped r times
    y   = LMHead(Norm(Coda(s_r)))                         last c layers of the base model

Prelude, core and coda hold the base family's own block (Llama, Mistral, Qwen2, Qwen3, OLMo-2, Gemma3), computed
exactly as the base computes it; the family's differences are a handful of config flags. This file imports only
torch and transformers, so a converted folder loads with `trust_remote_code=True` where loopfit is not installed.
"""

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

HUGINN_STATE_STD = math.sqrt(2 / (5 * 5280))  # 0.0087039, the state-init sigma of Huginn and the paper
ADAPTER_INITS = ("random", "passthrough", "state", "mean")
STATE_INITS = ("normal", "zeros", "embed")
CACHE_POLICIES = ("exact", "ring")
EXIT_CANDIDATES = 256  # tokens an adaptive exit's later looks score (see `exit_rule`)
EXIT_LOOK_AGAIN = 2  # latent:T:M: a near-tie found at loop t is looked at again at loop 2t
DRAFT_TOKENS = 4  # tokens a speculative round drafts by default (see `speculative_generate`)
# This file ships inside converted folders and meets whatever transformers the user has. transformers moves its
# cache plumbing between releases (5.24 renamed `past_key_values` to `cache`), so the model never hands its cache
# to GenerationMixin under a cache name: `generate` passes it as `loopfit_cache`, a model kwarg transformers
# forwards untouched, and every entry point takes the cache under any of these names.
CACHE_NAMES = ("loopfit_cache", "cache", "past_key_values", "cache_params")
OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def find_cache(kwargs):
    """The LoopfitCache among `kwargs`' cache names (a cache transformers made for itself is ignored)."""
    for name in CACHE_NAMES:
        if isinstance(kwargs.get(name), LoopfitCache):
            return kwargs[name]
    return None


class LoopfitConfig(PretrainedConfig):
    """Config of a loopfit model. Block fields mirror the base family; recurrence fields say how it loops.

    Family flags: `qkv_bias` (Qwen2), `qk_norm` "head" (Qwen3, Gemma3) or "full" (OLMo-2), `norm_style`
    "pre" (Llama family), "post" (OLMo-2: norms after each sublayer) or "sandwich" (Gemma3: both), `norm_offset` 1.0
    for Gemma's (1 + w) norms, `embed_scale` sqrt(h) for Gemma, `query_pre_attn_scalar` for Gemma's attention scale.
    `layer_types` has one entry per loopfit layer (prelude, then core, then coda): "full_attention" or
    "sliding_attention" (window `sliding_window`); `rope` maps each layer type to its RoPE parameters.
    """

    model_type = "loopfit"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_attention_heads: int = 9
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str | None = None
    norm_style: str = "pre"
    norm_offset: float = 0.0
    embed_scale: float = 1.0
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: list | None = None
    rope: dict | None = None
    # recurrence
    num_prelude_layers: int = 2
    num_core_layers: int = 2
    num_coda_layers: int = 2
    mean_recurrence: int = 4
    adapter_init: str = "random"
    state_init: str = "normal"
    state_init_std: float = HUGINN_STATE_STD
    state_noise_seed: int = 0
    cache_policy: str = "exact"
    cache_ring_size: int = 2
    # provenance: which base layers went where (written by `loopfit convert`)
    base_model_type: str | None = None
    source_layers: dict | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_layers
        if self.rope is None:
            self.rope = {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        super().__post_init__(**kwargs)
        self.check()

    @property
    def num_layers(self):
        return self.num_prelude_layers + self.num_core_layers + self.num_coda_layers

    @property
    def num_hidden_layers(self):  # what generic transformers code reads
        return self.num_layers

    def check(self):
        """Raise ValueError naming the field and the fix when the config cannot describe a working model."""
        if self.num_core_layers < 1:
            raise ValueError("num_core_layers must be >= 1: the core is the block that loops")
        if min(self.num_prelude_layers, self.num_coda_layers) < 0:
            raise ValueError("num_prelude_layers and num_coda_layers must be >= 0")
        if self.mean_recurrence < 1:
            raise ValueError(f"mean_recurrence must be >= 1 (got {self.mean_recurrence})")
        if self.adapter_init not in ADAPTER_INITS:
            raise ValueError(f"adapter_init must be one of {ADAPTER_INITS} (got {self.adapter_init!r})")
        if self.state_init not in STATE_INITS:
            raise ValueError(f"state_init must be one of {STATE_INITS} (got {self.state_init!r})")
        if self.cache_policy not in CACHE_POLICIES or self.cache_ring_size < 1:
            raise ValueError(f"cache_policy must be one of {CACHE_POLICIES} with cache_ring_size >= 1")
        if self.norm_style not in ("pre", "post", "sandwich") or self.qk_norm not in (None, "head", "full"):
            raise ValueError("norm_style must be pre/post/sandwich and qk_norm None/head/full")
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        for t in set(self.layer_types):
            if t not in self.rope:
                raise ValueError(f"rope has no parameters for layer type {t!r}")


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """RMSNorm in fp32. `offset` 1.0 gives Gemma's (1 + w) scaling, with weights stored as zeros-centred."""

    def __init__(self, dim, eps, offset=0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma multiplies in fp32 then casts; Llama casts then multiplies (same in fp32)
            return (x * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def rope_inv_freq(params, head_dim):
    """Inverse RoPE frequencies for `default`, `linear` and `llama3` RoPE (the types our families use)."""
    kind = params.get("rope_type", "default")
    inv = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / params["factor"]
    if kind == "llama3":
        factor, lo, hi = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) * ~(wavelen > old_len / lo)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {kind!r}: loopfit supports default, linear and llama3")


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config, layer_type):
        super().__init__()
        c = config
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.window = c.sliding_window if layer_type == "sliding_attention" else None
        self.scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=c.o_bias)
        self.qk_norm = c.qk_norm
        if c.qk_norm == "head":
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps, c.norm_offset)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps, c.norm_offset)
        elif c.qk_norm == "full":
            self.q_norm = RMSNorm(self.n_heads * self.head_dim, c.rms_norm_eps, c.norm_offset)
            self.k_norm = RMSNorm(self.n_kv * self.head_dim, c.rms_norm_eps, c.norm_offset)

    def forward(self, x, rope, mask, cache, cache_key):
        b, q_len, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, q_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, q_len, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, q_len, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(cache_key, k, v)
        attn_mask = mask[self.window]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and q_len > 1,
            scale=self.scale, enable_gqa=self.n_kv != self.n_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, f, bias=config.mlp_bias)
        self.down_proj = nn.Linear(f, h, bias=config.mlp_bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(GradientCheckpointingLayer):
    """One transformer layer of the base family. Norms by role: `input_norm` and `pre_mlp_norm` before the
    sublayers (pre / sandwich), `post_attn_norm` and `post_mlp_norm` after them (post / sandwich)."""

    def __init__(self, config, layer_type):
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = Attention(config, layer_type)
        self.mlp = MLP(config)
        norm = lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)  # noqa: E731
        self.pre = config.norm_style in ("pre", "sandwich")
        self.post = config.norm_style in ("post", "sandwich")
        if self.pre:
            self.input_norm, self.pre_mlp_norm = norm(), norm()
        if self.post:
            self.post_attn_norm, self.post_mlp_norm = norm(), norm()

    def forward(self, x, rope, mask, cache=None, cache_key=None):
        h = self.self_attn(self.input_norm(x) if self.pre else x, rope[self.layer_type], mask, cache, cache_key)
        x = x + (self.post_attn_norm(h) if self.post else h)
        h = self.mlp(self.pre_mlp_norm(x) if self.pre else x)
        return x + (self.post_mlp_norm(h) if self.post else h)


# ----------------------------------------------------------------------------------------------------------------
# KV cache


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
        self.last_embed = None  # prelude output of the last token (a speculative draft keeps it for verification)
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

    def begin(self, q_len):
        self.start = self.seen

    def end(self, q_len):
        self.seen = self.start + q_len

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
        self.last_state = self.last_embed = None
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
        self.last_state = self.last_embed = None
        return self

    def repeat_rows(self, repeats):
        """Each row `repeats` times over (rows i*repeats .. (i+1)*repeats - 1 copy row i): a prompt prefix that
        many prompts share is cached once, then given to all of them. Returns the cache."""
        self.slots = {key: (k.repeat_interleave(repeats, 0), v.repeat_interleave(repeats, 0))
                      for key, (k, v) in self.slots.items()}
        self.buffers = {}
        self.last_state = self.last_embed = None
        return self

    def reorder_cache(self, beam_idx):
        self.slots = {key: (k.index_select(0, beam_idx), v.index_select(0, beam_idx))
                      for key, (k, v) in self.slots.items()}
        self.buffers = {}


# ----------------------------------------------------------------------------------------------------------------
# The model


class LoopfitPreTrainedModel(PreTrainedModel):
    config_class = LoopfitConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # the model makes its own LoopfitCache

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.constant_(module.weight, 1.0 - module.offset)
        if isinstance(module, LoopfitModel):
            init_adapter(module.adapter.weight, self.config.adapter_init)
            for t, params in self.config.rope.items():  # non-persistent buffers are not in checkpoints
                init.copy_(getattr(module, f"inv_freq_{t}"), rope_inv_freq(params, self.config.head_dim))


def init_adapter(weight, kind):
    """Adapter W [h, 2h] acting on concat[state, e]: random (nn.Linear's default, the paper's), passthrough
    [0 | I] (returns e), state [I | 0] (returns the state), mean [I/2 | I/2]."""
    h = weight.shape[0]
    with torch.no_grad():
        if kind == "random":
            fresh = nn.Linear(2 * h, h, bias=False, device=weight.device, dtype=weight.dtype)
            return init.copy_(weight, fresh.weight)
        eye = torch.eye(h, dtype=weight.dtype, device=weight.device)
        zero = torch.zeros_like(eye)
        halves = {"passthrough": (zero, eye), "state": (eye, zero), "mean": (eye / 2, eye / 2)}[kind]
        return init.copy_(weight, torch.cat(halves, dim=1))


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


def check_row_steps(row_steps, batch, unsupported):
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


def check_sweep(sweep, unsupported, cache_policy):
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


class LoopfitModel(LoopfitPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, c.pad_token_id)
        types = iter(c.layer_types)
        self.prelude = nn.ModuleList(Block(c, next(types)) for _ in range(c.num_prelude_layers))
        self.core = nn.ModuleList(Block(c, next(types)) for _ in range(c.num_core_layers))
        self.coda = nn.ModuleList(Block(c, next(types)) for _ in range(c.num_coda_layers))
        self.adapter = nn.Linear(2 * c.hidden_size, c.hidden_size, bias=False)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_offset)
        self.init_rope()
        self._noise_bank = None
        self.post_init()

    def init_rope(self):
        for t, params in self.config.rope.items():
            self.register_buffer(f"inv_freq_{t}", rope_inv_freq(params, self.config.head_dim), persistent=False)

    def rope(self, position_ids, dtype):
        out = {}
        for t in self.config.rope:
            freqs = position_ids[:, :, None].float() * getattr(self, f"inv_freq_{t}")[None, None, :].float()
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [b, 1, q, head_dim]
            out[t] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return out

    def masks(self, attention_mask, q_len, past, device, position_ids=None):
        """Attention masks by window size (None = full causal). None means plain causal attention (fast path).
        A 4D boolean `attention_mask` [b, 1, q, past + q] says itself which keys each query sees (packed
        sequences); sliding windows then count by `position_ids`, the cached tokens before it being unpadded."""
        windows = {None} | {self.config.sliding_window} if "sliding_attention" in self.config.layer_types else {None}
        out = {}
        if attention_mask is not None and attention_mask.dim() == 4:
            keys = torch.cat([torch.arange(past, device=device)[None].expand(len(position_ids), -1), position_ids], 1)
            for w in windows:
                allowed = attention_mask.bool()
                if w is not None:
                    allowed = allowed & (keys[:, None, None, :] > position_ids[:, None, :, None] - w)
                out[w] = allowed | ~allowed.any(-1, keepdim=True)
            return out
        padded = attention_mask is not None and not bool(attention_mask.all())
        for w in windows:
            if w is None and not padded and (past == 0 or q_len == 1):
                out[w] = None
                continue
            kv_len = past + q_len
            qi = torch.arange(past, kv_len, device=device)[:, None]
            ki = torch.arange(kv_len, device=device)[None, :]
            allowed = ki <= qi
            if w is not None and not padded:
                allowed = allowed & (ki > qi - w)
            allowed = allowed[None, None]
            if padded:
                real = attention_mask[:, :kv_len].bool()
                allowed = allowed & real[:, None, None, :]
                if w is not None:  # the window counts tokens, not cache slots: padding or holes may sit inside it
                    pos = real.long().cumsum(-1)
                    allowed = allowed & (pos[:, None, None, :] > pos[:, None, past:, None] - w)
            # rows with nothing to attend to (left padding) attend everywhere: finite, and never read
            out[w] = allowed | ~allowed.any(-1, keepdim=True)
        return out

    def initial_state(self, e, position_ids):
        c = self.config
        if c.state_init == "zeros":
            return torch.zeros_like(e)
        if c.state_init == "embed":
            return e
        std = c.state_init_std
        if self.training:  # a fresh draw every step, as in training the paper's models
            return nn.init.trunc_normal_(torch.empty_like(e), std=std, a=-3 * std, b=3 * std)
        # At inference a fixed draw per position: outputs are deterministic, and cached decoding equals recomputation.
        return self.state_noise(position_ids).to(device=e.device, dtype=e.dtype).expand_as(e)

    def state_noise(self, position_ids, block=256):
        c, need = self.config, int(position_ids.max()) + 1
        have = 0 if self._noise_bank is None else self._noise_bank.shape[0]
        if have < need:
            blocks = [self._noise_bank] if have else []
            for b in range(have // block, -(-need // block)):
                g = torch.Generator().manual_seed(c.state_noise_seed * 1_000_003 + b)
                x = torch.empty(block, c.hidden_size)
                blocks.append(nn.init.trunc_normal_(x, std=c.state_init_std, a=-3 * c.state_init_std,
                                                    b=3 * c.state_init_std, generator=g))
            self._noise_bank = torch.cat(blocks)
        return self._noise_bank[position_ids.cpu()]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, num_steps=None, output_hidden_states=False, use_cache=False,
                exit_rule=None, head=None, warm_start=False, resume=None, row_steps=None, sweep=None):
        """`resume=(e, s, t)` skips the prelude and starts the core at loop t from state s, with e the prelude's
        output (speculative verification: loops t.. of tokens whose first t loops a draft already ran).
        `row_steps` gives each row its own r, `sweep` reads the output at several r (see `LoopfitForCausalLM`)."""
        if resume is None:
            x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            if self.config.embed_scale != 1.0:
                x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        else:
            x = resume[0]
        b, q_len, _ = x.shape
        cache = past_key_values if use_cache or past_key_values is not None else None
        past = cache.seen if cache is not None else 0
        if attention_mask is not None and attention_mask.dim() == 4 and position_ids is None:
            raise ValueError("a 4D attention_mask (packed sequences) needs position_ids")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + q_len]
            else:
                position_ids = torch.arange(past, past + q_len, device=x.device)[None].expand(b, -1)
        rope = self.rope(position_ids, x.dtype)
        mask = self.masks(attention_mask, q_len, past, x.device, position_ids)
        hidden = [] if output_hidden_states else None
        if cache is not None:
            cache.begin(q_len)

        def run(segment, layers, x, loop=0, rows=None):  # rows: only the first `rows` rows take part
            rope_, mask_ = (rope, mask) if rows is None else (
                {t: (cos[:rows], sin[:rows]) for t, (cos, sin) in rope.items()},
                {w: None if m is None else m[:rows] for w, m in mask.items()})
            for j, layer in enumerate(layers):
                if hidden is not None:
                    hidden.append(x)
                key = cache.key(segment, loop, j) if cache is not None else None
                x = layer(x, rope_, mask_, cache, key)
            return x

        decoding = cache is not None and q_len == 1 and past > 0
        if resume is not None:
            e, s, first_loop = resume
        else:
            e, first_loop = run("prelude", self.prelude, x), 0
            if warm_start and decoding and cache.last_state is not None:  # continuous chain of thought
                s = cache.last_state
            else:
                s = self.initial_state(e, position_ids)
        n, k = resolve_steps(num_steps, self.config.mean_recurrence)
        inference_only = self.training or exit_rule is not None or warm_start or hidden is not None \
            or (row_steps is not None and sweep is not None)
        if sweep is not None:  # loops 0..t are the same whatever r: run the deepest r once, keep s_r for each r
            depth, states = check_sweep(sweep, inference_only or resume is not None,
                                        cache.policy if cache is not None else "exact"), {}
            for t in range(depth[0]):
                s = run("core", self.core, self.adapter(torch.cat([s, e], dim=-1)), loop=t)
                states[t + 1] = s
            s, g = torch.cat([states[r] for r in depth]), len(depth)  # the coda reads every r: rows r-major
            rope = {t: tuple(x if x.shape[0] == 1 else x.repeat(g, 1, 1, 1) for x in cs) for t, cs in rope.items()}
            mask = {w: m if m is None or m.shape[0] == 1 else m.repeat(g, 1, 1, 1) for w, m in mask.items()}
        elif row_steps is not None:  # row i runs its deepest r; deepest rows first, so loop t runs rows [:m]
            reads = check_row_steps(row_steps, b, inference_only)
            if min(rs[-1] for rs in reads) < first_loop:
                raise ValueError(f"a row_steps pass resumed at loop {first_loop} reads only r >= {first_loop}")
            depth, wanted, after = [rs[0] for rs in reads], {r for rs in reads for r in rs[1:]}, {}
            if first_loop in wanted:  # a resumed row read at its first loop: the state it resumes from
                after[first_loop] = s
            for t in range(first_loop, depth[0]):  # a resumed row (speculative verification) starts at its loop
                m = sum(r > t for r in depth)
                new = run("core", self.core, self.adapter(torch.cat([s[:m], e[:m]], dim=-1)), loop=t, rows=m)
                s = new if m == b else torch.cat([new, s[m:]])
                if t + 1 in wanted:
                    after[t + 1] = s
            if wanted:  # rows reading several r: one output row per (row, r), row-major, so the coda reads each
                rows = torch.tensor([i for i, rs in enumerate(reads) for _ in rs], device=s.device)
                s = torch.cat([(s if j == 0 else after[r])[i:i + 1] for i, rs in enumerate(reads)
                               for j, r in enumerate(rs)])
                rope = {t: tuple(x if x.shape[0] == 1 else x[rows] for x in cs) for t, cs in rope.items()}
                mask = {w: m if m is None or m.shape[0] == 1 else m[rows] for w, m in mask.items()}
        elif exit_rule is not None and decoding:
            s = self.loop_with_exit(s, e, n + k, run, exit_rule, head, rope, mask, cache)
        else:
            for t in range(first_loop, n + k):
                with torch.set_grad_enabled(torch.is_grad_enabled() and t >= n):  # truncated backprop: last k loops
                    s = run("core", self.core, self.adapter(torch.cat([s, e], dim=-1)), loop=t)
        if cache is not None:
            cache.last_state, cache.last_embed = s[:, -1:].detach(), e[:, -1:].detach()
        x = self.norm(run("coda", self.coda, s))
        if hidden is not None:
            hidden.append(x)
        if cache is not None:
            cache.end(q_len)
        return x, cache, hidden

    @torch.no_grad()
    def loop_with_exit(self, s, e, max_loops, run, rule, head, rope, mask, cache):
        """Decode one token per row, each row stopping its loops once `rule` says its next-token distribution has
        settled. Rows that stopped keep their state; the loop ends when every row has stopped. Afterwards each
        cache slot of a loop a row skipped holds that row's latest loop (Huginn's fallback), so later tokens
        read what an unbatched run would have left there."""
        peek, candidates = _ReadOnlyCache(cache), None

        def next_token_logprobs(state):  # None for a rule on the state alone (no coda, no head: nearly free)
            nonlocal candidates
            if not rule.reads_logits:
                return None
            x = state
            for j, layer in enumerate(self.coda):
                x = layer(x, rope, mask, peek, cache.key("coda", 0, j))
            x = self.norm(x)[:, -1]
            if candidates is None:  # first look: the whole vocabulary; later looks: its top candidates only
                logits = head(x).float()
                candidates = logits.topk(min(EXIT_CANDIDATES, logits.shape[-1]), -1).indices
                logits = logits.gather(-1, candidates)
            else:
                logits = torch.einsum("bh,bkh->bk", x, head.weight[candidates]).float()
            return torch.log_softmax(logits, dim=-1)

        def margin(state):  # one look: top-1 minus top-2 next-token logit (a near-tie flips with a little more depth)
            x = state
            for j, layer in enumerate(self.coda):
                x = layer(x, rope, mask, peek, cache.key("coda", 0, j))
            top = head(self.norm(x)[:, -1]).float().topk(2, -1).values
            return top[:, 0] - top[:, 1]

        b = s.shape[0]
        done = torch.zeros(b, dtype=torch.bool, device=s.device)
        next_look = torch.zeros(b, dtype=torch.long, device=s.device)  # when a near-tie may look again
        loops = torch.full((b,), max_loops, dtype=torch.long, device=s.device)
        prev, history = None, []
        for t in range(max_loops):
            new = run("core", self.core, self.adapter(torch.cat([s, e], dim=-1)), loop=t)
            new = torch.where(done[:, None, None], s, new)
            logp = next_token_logprobs(new)
            if prev is not None:
                stop = rule(prev_logp=prev[0], logp=logp, prev_state=prev[1], state=new, history=history) & ~done
                if rule.margin is not None:
                    stop = stop & (next_look <= t + 1) & (t + 1 < max_loops)  # a look at the last loop saves nothing
                    if bool(stop.any()):
                        sure = margin(new) >= rule.margin
                        again = torch.full_like(next_look, EXIT_LOOK_AGAIN * (t + 1))
                        next_look = torch.where(stop & ~sure, again, next_look)
                        stop = stop & sure
                loops = torch.where(stop, torch.full_like(loops, t + 1), loops)
                done = done | stop
            if logp is not None:
                history.append(logp.argmax(-1))
            prev, s = (logp, new), new
            if bool(done.all()):
                break
        used = loops.cpu()
        last = min(max_loops, t + 1)
        if cache.policy == "exact":  # rows that stopped early: later loops' slots fall back to their last loop
            # only the loops past the earliest stop have such rows (none when every row ran to the end or stopped
            # together, e.g. batch 1): thousands of small kernels saved per token, which a GPU feels
            for j in range(len(self.core)):
                for u in range(max(1, int(used.min())), last):
                    k_u, v_u = cache.slots[("core", u, j)]
                    k_p, v_p = cache.slots[("core", u - 1, j)]
                    skip = (loops <= u)[:, None, None, None]
                    k_u[:, :, -1:] = torch.where(skip, k_p[:, :, -1:], k_u[:, :, -1:])
                    v_u[:, :, -1:] = torch.where(skip, v_p[:, :, -1:], v_u[:, :, -1:])
        cache.loops_used.append(used)
        return s


class _ReadOnlyCache:
    """Reads a LoopfitCache's past keys/values without writing this forward's (probing the coda mid-loop)."""

    def __init__(self, cache):
        self.cache = cache

    def update(self, key, k, v):
        start, slot = self.cache.start, self.cache.slots.get(key)
        if slot is None or start == 0:
            return k, v
        return torch.cat([slot[0][:, :, :start], k], 2), torch.cat([slot[1][:, :, :start], v], 2)


def exit_rule(spec):
    """Parse an adaptive-exit rule 'kind:threshold' into a function of successive loops -> rows that may stop.

      kl:5e-4       KL(p_t || p_t-1) of the next-token distributions below the threshold (Huginn's default rule)
      entropy:1e-3  |H(p_t) - H(p_t-1)| below the threshold
      latent:0.03   ||s_t - s_t-1|| / ||s_t|| below the threshold
      latent:0.005:1  the same, confirmed by a look at the next token: the row stops only if its top logit leads
                    the runner-up by at least 1; a near-tie (where a little more depth may flip the token) loops on
                    and looks again once it has run twice the loops. A look (coda + head) is paid only once the
                    state has settled, and at most log2(r) times a token
      argmax:5      the argmax has not changed for this many loops

    What a look costs: kl, entropy and argmax run the coda each loop, and the head on the whole vocabulary only at
    a token's first look; later looks score its first look's top EXIT_CANDIDATES tokens (renormalised), so the
    head is no longer dearer than the loops it saves. latent reads the recurrent state alone: no coda, no head,
    a decision far cheaper than a loop, which makes it the rule that saves wall time.
    """
    kind, _, value = str(spec).partition(":")
    value, _, margin = value.partition(":")
    try:
        thr, margin = float(value), float(margin) if margin else None
    except ValueError:
        raise ValueError(f"exit rule {spec!r} must look like kl:5e-4, entropy:1e-3, latent:0.03, latent:0.005:1 or "
                         "argmax:5") from None
    if margin is not None and kind != "latent":
        raise ValueError(f"exit rule {spec!r}: only latent takes a margin (latent:T:M)")

    def kl(prev_logp, logp, **_):
        return (logp.exp() * (logp - prev_logp)).sum(-1) < thr

    def entropy(prev_logp, logp, **_):
        h = lambda lp: -(lp.exp() * lp).sum(-1)  # noqa: E731
        return (h(logp) - h(prev_logp)).abs() < thr

    def latent(prev_state, state, **_):
        return ((state - prev_state).norm(dim=-1) / state.norm(dim=-1).clamp_min(1e-12))[:, -1] < thr

    def argmax(logp, history, **_):
        n = int(thr)
        if len(history) < n:
            return torch.zeros(logp.shape[0], dtype=torch.bool, device=logp.device)
        current = logp.argmax(-1)
        return torch.stack([h == current for h in history[-n:]]).all(0)

    rules = {"kl": kl, "entropy": entropy, "latent": latent, "argmax": argmax}
    if kind not in rules:
        raise ValueError(f"unknown exit rule {kind!r}: choose one of {', '.join(rules)} (e.g. kl:5e-4)")
    rules[kind].reads_logits, rules[kind].margin = kind != "latent", margin
    return rules[kind]


class LoopfitForCausalLM(LoopfitPreTrainedModel, GenerationMixin):
    """Depth-recurrent causal LM. `forward(..., num_steps=r)` runs r loops; `num_steps=(n, k)` runs n loops without
    gradient then k with it; the default is `config.mean_recurrence`. `generate(..., num_steps=r)` works too."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LoopfitModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, num_steps=None, use_cache=None, output_hidden_states=None,
                logits_to_keep=0, num_items_in_batch=None, return_dict=None, exit_criterion=None,
                warm_start=False, cache=None, return_logits=True, row_steps=None, sweep=None, **kwargs):
        """`exit_criterion` ('kl:5e-4', see `exit_rule`) stops each row's loops early while decoding with the
        cache, up to `num_steps` loops; `warm_start` starts each new token's state from the previous token's.
        `sweep` (inference) reads the output at each r it lists, deepest first, from one run of the deepest: loops
        0..t of a token are the same whatever r, so [16, 8, 4, 2, 1] costs 16 loops, not 31. Row i at sweep[j] is
        output row j * batch + i; `loss` then holds one loss per r.
        `row_steps` (inference) gives each row its own r instead of `num_steps`, deepest rows first, e.g.
        [8, 8, 4, 4, 1, 1]: one batch, and one cache, decodes a sweep over r, and every weight read serves all of it.
        A row may list several r, deepest first, e.g. [(8, 4), (8, 4, 2), 1]: it runs the deepest once and is read
        at each (output rows row-major: here 2 + 3 + 1), so r's whose tokens so far agree share their loops.
        With a cache, the prelude and core slots keep one row per input row and the coda's one per output row;
        `LoopfitCache.select_rows` rearranges them between calls.
        The cache may be given as `cache` or `past_key_values` (transformers' names before and after 5.24).
        `return_logits=False` with `labels` computes the loss chunk by chunk without the full logits (training
        with large vocabularies, see `linear_cross_entropy`); `logits` is then None."""
        past_key_values = find_cache({"cache": cache, "past_key_values": past_key_values, **kwargs})
        use_cache = bool(use_cache) and not self.training
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        rule = exit_rule(exit_criterion) if exit_criterion else None
        x, cache, hidden = self.model(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, num_steps,
            bool(output_hidden_states), use_cache, rule, self.lm_head, warm_start, row_steps=row_steps, sweep=sweep,
        )
        if labels is not None and sweep is not None:  # one loss per r, without the full logits
            rows = labels.shape[0]
            loss = torch.stack([linear_cross_entropy(x[j * rows:(j + 1) * rows], self.lm_head.weight, labels,
                                                     num_items_in_batch, self.config.final_logit_softcapping)
                                for j in range(x.shape[0] // rows)])
            logits = self.head_logits(x) if return_logits else None
            return CausalLMOutputWithPast(loss=loss, logits=logits, **{OUTPUT_CACHE_FIELD: cache})
        if labels is not None and not return_logits:
            loss = linear_cross_entropy(x, self.lm_head.weight, labels, num_items_in_batch,
                                        self.config.final_logit_softcapping)
            return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=tuple(hidden) if hidden else None,
                                          **{OUTPUT_CACHE_FIELD: cache})
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) and logits_to_keep else slice(None)
        logits = self.head_logits(x[:, keep])
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=tuple(hidden) if hidden else None,
                                      **{OUTPUT_CACHE_FIELD: cache})

    def head_logits(self, x):
        logits = self.lm_head(x)
        if self.config.final_logit_softcapping:
            cap = self.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def new_cache(self):
        return LoopfitCache(self.config.cache_policy, self.config.cache_ring_size)

    @torch.no_grad()
    def generate(self, inputs=None, generation_config=None, draft_steps=None, draft_tokens=DRAFT_TOKENS, **kwargs):
        """transformers' `generate`, plus `num_steps`, `exit_criterion` and `warm_start`. A LoopfitCache may be
        passed as `cache` or `past_key_values`; it reaches the model as `loopfit_cache` whatever the installed
        transformers calls its cache argument. `draft_steps=d` decodes by exact self-speculation instead, with a
        decoding loop of loopfit's own (see `speculative_generate`), drafting `draft_tokens` tokens a round."""
        cache = find_cache(kwargs)
        for name in CACHE_NAMES:
            kwargs.pop(name, None)
        if any(isinstance(r, (tuple, list)) and len(r) > 1 for r in kwargs.get("row_steps") or ()):
            raise ValueError("row_steps with several r for a row gives one output row per r, which generate cannot "
                             "follow: decode such rows with forward calls (see eval.generation.generate_sweep)")
        if draft_steps is not None:
            inputs = inputs if inputs is not None else kwargs.pop("input_ids", None)
            return self.speculative_generate(inputs, draft_steps, draft_tokens, generation_config, cache, **kwargs)
        use_cache = kwargs.get("use_cache", generation_config.use_cache if generation_config else True)
        if cache is None and use_cache is not False:
            cache = self.new_cache()
        return super().generate(inputs, generation_config, loopfit_cache=cache, **kwargs)

    SPECULATIVE_SETTINGS = ("max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature", "top_k",
                            "top_p", "eos_token_id", "pad_token_id")

    @torch.no_grad()
    def speculative_generate(self, input_ids, draft_steps, draft_tokens=DRAFT_TOKENS, generation_config=None,
                             cache=None, attention_mask=None, num_steps=None, stopping_criteria=None, **kwargs):
        """Self-speculative decoding, exact. Loops 0..d-1 of an r-loop pass are a d-loop pass (loop t of a token
        reads only earlier tokens' loops <= t), so each round drafts `draft_tokens` tokens at d = `draft_steps`
        loops, which writes the cache entries of loops < d, then verifies them all in one pass that runs only loops
        d..r-1 and the coda from the draft's states, keeps the longest prefix r-loop decoding agrees with plus its
        first correction, and crops the cache past it. Greedy output equals r-loop greedy decoding token for token;
        sampling keeps the r-loop distribution by the speculative acceptance rule (keep a drafted token with
        probability min(1, p/q), else sample from max(p - q, 0)). A batch advances by its shortest kept prefix, so
        every row stays exact; the next round drafts one token more than this one emitted (at most
        `draft_tokens`), so early disagreement costs few wasted drafts. Takes what lm-eval and most callers pass:
        max_new_tokens or max_length, min_new_tokens, eos_token_id, pad_token_id, stopping_criteria, do_sample with
        temperature, top_k, top_p.
        Each round is logged in `cache.drafts` as (tokens drafted, tokens emitted, drafted tokens kept)."""
        gc = generation_config or self.generation_config
        opts = {k: kwargs.pop(k) if k in kwargs else getattr(gc, k, None) for k in self.SPECULATIVE_SETTINGS}
        if kwargs.pop("exit_criterion", None):
            raise ValueError("draft_steps and exit_criterion do not combine: speculation verifies every token at "
                             "the full r loops, the exit picks each token's depth alone; choose one")
        if kwargs.pop("warm_start", False):
            raise ValueError("draft_steps and warm_start do not combine: a warm-started token starts from the previous "
                             "token's r-loop state, which its draft does not have; drop one")
        kwargs.pop("use_cache", None)
        unsupported = sorted(k for k, v in kwargs.items() if v not in (None, False, 1, 1.0))
        if unsupported or getattr(gc, "num_beams", 1) not in (None, 1):
            raise ValueError(f"speculative decoding (draft_steps) does not take {', '.join(unsupported) or 'num_beams'}"
                             f": it takes {', '.join(self.SPECULATIVE_SETTINGS)} and stopping_criteria; drop "
                             "draft_steps to use transformers' generate")
        if input_ids is None:
            raise ValueError("speculative decoding needs input_ids (not inputs_embeds)")
        if self.config.cache_policy != "exact":
            raise ValueError(f"speculative decoding needs cache_policy 'exact', not {self.config.cache_policy!r}: the "
                             "ring's shared slots let the draft's loops overwrite what verification reads; set "
                             "model.config.cache_policy = 'exact'")
        n, k_grad = resolve_steps(num_steps, self.config.mean_recurrence)
        r, d, k = n + k_grad, int(draft_steps), int(draft_tokens)
        if not 1 <= d < r:
            raise ValueError(f"draft_steps must be at least 1 and below num_steps (got draft_steps={d}, num_steps={r}):"
                             " a draft runs the first d of the r loops")
        if k < 1:
            raise ValueError(f"draft_tokens must be at least 1 (got {k})")
        sample = bool(opts["do_sample"])
        temperature = 1.0 if opts["temperature"] is None else float(opts["temperature"])
        if sample and temperature <= 0:
            raise ValueError(f"sampling needs temperature > 0 (got {temperature}); "
                             "for greedy decoding pass do_sample=False")
        device, (b, prompt_len) = input_ids.device, input_ids.shape
        eos = opts["eos_token_id"] if opts["eos_token_id"] is not None else self.config.eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), dtype=torch.long, device=device)
        pad = opts["pad_token_id"] if opts["pad_token_id"] is not None else (int(eos[0]) if len(eos) else 0)
        if opts["max_new_tokens"] is not None:
            max_new = int(opts["max_new_tokens"])
        else:  # transformers' default length is 20 tokens, prompt included
            max_new = (opts["max_length"] if opts["max_length"] is not None else 20) - prompt_len
        min_new = int(opts["min_new_tokens"] or 0)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        mask = torch.cat([mask, mask.new_ones(b, max(max_new, 0) + k)], 1)  # sliced to each pass's length
        cache = self.new_cache() if cache is None else cache
        if cache.seen:
            raise ValueError("speculative decoding needs a fresh cache: pass model.new_cache() or none")

        def scores(logits, index):  # logits [b, q, V] of generated tokens index.. -> what a token is picked from
            logits = logits.float()
            if index < min_new and len(eos):
                early = index + torch.arange(logits.shape[1], device=device) < min_new
                ban = early[:, None] & torch.isin(torch.arange(logits.shape[-1], device=device), eos)[None]
                logits = logits.masked_fill(ban, float("-inf"))
            return warp_logits(logits, temperature, opts["top_k"], opts["top_p"]) if sample else logits

        def pick(logits):
            if not sample:
                return logits.argmax(-1)
            return torch.multinomial(logits.softmax(-1).flatten(0, -2), 1).view(logits.shape[:-1])

        out, finished = input_ids, torch.zeros(b, dtype=torch.bool, device=device)

        def emit(tokens):  # append [b, a] tokens one by one as transformers does; True once every row is done
            nonlocal out, finished
            for i in range(tokens.shape[1]):
                token = tokens[:, i]
                if len(eos):  # as transformers: rows that ended are padded only where an EOS token is known
                    token = torch.where(finished, torch.full_like(token, pad), token)
                out = torch.cat([out, token[:, None]], 1)
                finished = finished | torch.isin(token, eos)
                for criterion in stopping_criteria or ():
                    finished = finished | torch.as_tensor(criterion(out, None), device=device).expand(b)
                if bool(finished.all()):
                    return True
            return False

        if max_new <= 0:
            return input_ids
        x, _, _ = self.model(input_ids, mask[:, :prompt_len], None, cache, None, r, False, True)
        done, generated, length = emit(pick(scores(self.head_logits(x[:, -1:]), 0))), 1, k
        while not done and generated < max_new:
            q, start, active = min(length, max_new - generated), cache.seen, ~finished
            token, embeds, states, drafted, draft_scores = out[:, -1:], [], [], [], []
            for i in range(q):  # draft at d loops; the cache keeps loops < d of these tokens, which are exact
                x, _, _ = self.model(token, mask[:, :start + i + 1], None, cache, None, d, False, True)
                embeds.append(cache.last_embed)
                states.append(cache.last_state)
                draft_scores.append(scores(self.head_logits(x), generated + i))
                token = pick(draft_scores[-1])
                drafted.append(token)
            cache.seen = start  # verify: loops d..r-1 and the coda of all q tokens in one pass
            x, _, _ = self.model(None, mask[:, :start + q], None, cache, None, r, False, True,
                                 resume=(torch.cat(embeds, 1), torch.cat(states, 1), d))
            target, drafted = scores(self.head_logits(x), generated), torch.cat(drafted, 1)
            if sample:
                p, p_draft = target.softmax(-1), torch.cat(draft_scores, 1).softmax(-1)
                keep = torch.rand(drafted.shape, device=device) * p_draft.gather(-1, drafted[..., None])[..., 0] \
                    <= p.gather(-1, drafted[..., None])[..., 0]
                residual = (p - p_draft).clamp(min=0)
                residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
                fix = torch.multinomial(residual.flatten(0, 1), 1).view(b, q)
            else:
                fix = target.argmax(-1)
                keep = fix == drafted
            kept = keep.long().cumprod(1).sum(1)  # leading drafted tokens each row keeps
            tokens = torch.where(torch.arange(q, device=device)[None] < kept[:, None], drafted, fix)
            usable = torch.clamp(kept + 1, max=q)  # kept tokens, then the first correction
            ends = (torch.isin(tokens, eos) & (torch.arange(q, device=device)[None] < usable[:, None])).any(1)
            # rows padded from here on (ended, and an EOS is known) take whatever the others keep
            released = (finished | ends) if len(eos) else torch.zeros_like(finished)
            step = int(torch.where(released, q, usable).min())
            cache.crop(start + step)
            cache.drafts.append((q, step, min(step, int(kept[active].min()))))
            # draft what the last round kept and one more, up to k: rejected drafts are the loss, so a batch
            # whose rows disagree early drafts little, and one that agrees drafts k again
            length = min(k, step + 1)
            done, generated = emit(tokens[:, :step]), generated + step
        return out

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, position_ids=None,
                                      use_cache=True, num_steps=None, logits_to_keep=None, exit_criterion=None,
                                      warm_start=False, loopfit_cache=None, row_steps=None, **kwargs):
        # Feed only the tokens the cache has not seen; positions come from the attention mask (left padding).
        past_key_values = find_cache({"loopfit_cache": loopfit_cache, **kwargs}) if use_cache else None
        seen = past_key_values.seen if past_key_values is not None else 0
        inputs = {"input_ids": input_ids[:, seen:], "attention_mask": attention_mask,
                  "past_key_values": past_key_values, "use_cache": use_cache, "num_steps": num_steps,
                  "exit_criterion": exit_criterion, "warm_start": warm_start, "row_steps": row_steps}
        if inputs_embeds is not None and seen == 0:
            inputs = {**inputs, "input_ids": None, "inputs_embeds": inputs_embeds}
        if position_ids is not None:
            inputs["position_ids"] = position_ids[:, seen:]
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs


def warp_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """Sampling scores as transformers makes them: divide by the temperature, keep the top_k, then the smallest
    set of tokens whose probability reaches top_p."""
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(int(top_k), logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(-1)
        remove = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -1] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def causal_lm_loss(logits, labels, num_items_in_batch=None):
    """Next-token cross-entropy in fp32; labels are shifted here, -100 is ignored."""
    logits = logits[:, :-1].flatten(0, 1).float()
    labels = labels[:, 1:].flatten().to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels, ignore_index=-100)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / num_items_in_batch


def linear_cross_entropy(hidden, weight, labels, num_items_in_batch=None, softcap=None, chunk_elements=2**25):
    """`causal_lm_loss(hidden @ weight.T, labels)` without the full logits: rows go through the head in chunks of
    about `chunk_elements` logits, and each chunk's gradients (for hidden and the head weight) are computed in the
    forward, so at most one chunk of fp32 logits exists at a time and the backward only scales them."""
    hidden = hidden[:, :-1].flatten(0, 1)
    labels = labels[:, 1:].flatten().to(hidden.device)
    chunk = max(1, min(hidden.shape[0], chunk_elements // weight.shape[0]))
    grads = torch.is_grad_enabled()  # under no_grad (evaluation) only the loss: no gradient work in the forward
    total = _LinearCrossEntropy.apply(hidden, weight, labels, chunk, softcap, grads)
    count = (labels != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return total / count


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (optionally soft-capped) logits hidden @ weight.T, chunk by chunk (-100 ignored)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, softcap, grads=True):
        need_hidden, need_weight = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            logits = F.linear(h, weight).float()
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            valid = y != -100
            target = y.clamp(min=0)[:, None]
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, target)[:, 0]) * valid).sum()
            if not (need_hidden or need_weight):
                continue
            grad = torch.exp(logits - lse[:, None])  # d loss / d logits = softmax - one_hot, for valid rows
            grad.scatter_add_(1, target, -torch.ones_like(target, dtype=grad.dtype))
            grad *= valid[:, None]
            if softcap:
                grad *= 1 - capped.square()
            if not torch.is_autocast_enabled(h.device.type):  # under autocast, matmuls take its dtype as in autograd
                grad = grad.to(weight.dtype)
            if need_hidden:
                grad_hidden[start:start + chunk] = grad @ weight
            if need_weight:
                grad_weight += grad.T @ h.to(grad.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype),
                None, None, None, None)


LoopfitConfig.register_for_auto_class()
LoopfitForCausalLM.register_for_auto_class("AutoModelForCausalLM")
