"""loopfit's depth-recurrent causal LM, in one self-contained file.

    e   = Prelude(embed(x))                               first p layers of the base model
    s_0 = noise (truncated normal), zeros, or e
    s_i = Core(Adapter(concat[s_{i-1}, e]))   i = 1..r    a block of layers looped r times
    y   = LMHead(Norm(Coda(s_r)))                         last c layers of the base model

Prelude, core and coda hold the base family's own block (Llama, Mistral, Qwen2, Qwen3, OLMo-2, Gemma3), computed
exactly as the base computes it; the family's differences are a handful of config flags. This file imports only
torch and transformers, so a converted folder loads with `trust_remote_code=True` where loopfit is not installed.
"""

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
        self.seen = 0  # tokens cached before the current forward
        self.start = 0
        self.last_state = None  # final recurrent state of the last token (continuous chain of thought)
        self.loops_used = []  # per decoded token, loops each row ran under adaptive exit

    def key(self, segment, loop, layer):
        if segment == "core" and self.policy == "ring":
            loop = loop % self.ring_size
        return (segment, loop, layer)

    def get_seq_length(self, layer_idx=0):
        return self.seen

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
        """Write this forward's keys/values at positions [start, start + q) and return all up to there."""
        start, old = self.start, self.slots.get(key)
        have = 0 if old is None else old[0].shape[2]
        if have < start:  # earlier tokens never ran this loop: take their latest earlier loop
            fk, fv = self._earlier(key, start)
            old = (fk[:, :, :start], fv[:, :, :start]) if old is None else (
                torch.cat([old[0], fk[:, :, have:start]], 2), torch.cat([old[1], fv[:, :, have:start]], 2))
        if old is None or start == 0:
            new = (k, v)
        else:  # positions past `start` were written earlier in this forward (ring policy): overwrite them
            new = (torch.cat([old[0][:, :, :start], k], 2), torch.cat([old[1][:, :, :start], v], 2))
        self.slots[key] = new
        return new

    def reorder_cache(self, beam_idx):
        self.slots = {key: (k.index_select(0, beam_idx), v.index_select(0, beam_idx)) for key, (k, v) in self.slots.items()}


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

    def masks(self, attention_mask, q_len, past, device):
        """Attention masks by window size (None = full causal). None means plain causal attention (fast path)."""
        windows = {None} | {self.config.sliding_window} if "sliding_attention" in self.config.layer_types else {None}
        padded = attention_mask is not None and not bool(attention_mask.all())
        out = {}
        for w in windows:
            if w is None and not padded and (past == 0 or q_len == 1):
                out[w] = None
                continue
            kv_len = past + q_len
            qi = torch.arange(past, kv_len, device=device)[:, None]
            ki = torch.arange(kv_len, device=device)[None, :]
            allowed = ki <= qi
            if w is not None:
                allowed = allowed & (ki > qi - w)
            allowed = allowed[None, None]
            if padded:
                allowed = allowed & attention_mask[:, None, None, :kv_len].bool()
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
                exit_rule=None, head=None, warm_start=False):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.embed_scale != 1.0:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        b, q_len, _ = x.shape
        cache = past_key_values if use_cache or past_key_values is not None else None
        past = cache.seen if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + q_len]
            else:
                position_ids = torch.arange(past, past + q_len, device=x.device)[None].expand(b, -1)
        rope = self.rope(position_ids, x.dtype)
        mask = self.masks(attention_mask, q_len, past, x.device)
        hidden = [] if output_hidden_states else None
        if cache is not None:
            cache.begin(q_len)

        def run(segment, layers, x, loop=0):
            for j, layer in enumerate(layers):
                if hidden is not None:
                    hidden.append(x)
                key = cache.key(segment, loop, j) if cache is not None else None
                x = layer(x, rope, mask, cache, key)
            return x

        e = run("prelude", self.prelude, x)
        decoding = cache is not None and q_len == 1 and past > 0
        if warm_start and decoding and cache.last_state is not None:  # continuous chain of thought
            s = cache.last_state
        else:
            s = self.initial_state(e, position_ids)
        n, k = resolve_steps(num_steps, self.config.mean_recurrence)
        if exit_rule is not None and decoding:
            s = self.loop_with_exit(s, e, n + k, run, exit_rule, head, rope, mask, cache)
        else:
            for t in range(n + k):
                with torch.set_grad_enabled(torch.is_grad_enabled() and t >= n):  # truncated backprop: last k loops
                    s = run("core", self.core, self.adapter(torch.cat([s, e], dim=-1)), loop=t)
        if cache is not None:
            cache.last_state = s[:, -1:].detach()
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
        peek = _ReadOnlyCache(cache)

        def next_token_logprobs(state):
            x = state
            for j, layer in enumerate(self.coda):
                x = layer(x, rope, mask, peek, cache.key("coda", 0, j))
            return torch.log_softmax(head(self.norm(x))[:, -1].float(), dim=-1)

        b = s.shape[0]
        done = torch.zeros(b, dtype=torch.bool, device=s.device)
        loops = torch.full((b,), max_loops, dtype=torch.long, device=s.device)
        prev, history = None, []
        for t in range(max_loops):
            new = run("core", self.core, self.adapter(torch.cat([s, e], dim=-1)), loop=t)
            new = torch.where(done[:, None, None], s, new)
            logp = next_token_logprobs(new)
            if prev is not None:
                stop = rule(prev_logp=prev[0], logp=logp, prev_state=prev[1], state=new, history=history) & ~done
                loops = torch.where(stop, torch.full_like(loops, t + 1), loops)
                done = done | stop
            history.append(logp.argmax(-1))
            prev, s = (logp, new), new
            if bool(done.all()):
                break
        if cache.policy == "exact":  # rows that stopped early: later loops' slots fall back to their last loop
            last = min(max_loops, t + 1)
            for j in range(len(self.core)):
                for u in range(1, last):
                    k_u, v_u = cache.slots[("core", u, j)]
                    k_p, v_p = cache.slots[("core", u - 1, j)]
                    skip = (loops <= u)[:, None, None, None]
                    k_u[:, :, -1:] = torch.where(skip, k_p[:, :, -1:], k_u[:, :, -1:])
                    v_u[:, :, -1:] = torch.where(skip, v_p[:, :, -1:], v_u[:, :, -1:])
        cache.loops_used.append(loops.cpu())
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
      argmax:5      the argmax has not changed for this many loops
    """
    kind, _, value = str(spec).partition(":")
    try:
        thr = float(value)
    except ValueError:
        raise ValueError(f"exit rule {spec!r} must look like kl:5e-4, entropy:1e-3, latent:0.03 or argmax:5") from None

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
                warm_start=False, **kwargs):
        """`exit_criterion` ('kl:5e-4', see `exit_rule`) stops each row's loops early while decoding with the
        cache, up to `num_steps` loops; `warm_start` starts each new token's state from the previous token's."""
        use_cache = bool(use_cache) and not self.training
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        rule = exit_rule(exit_criterion) if exit_criterion else None
        x, cache, hidden = self.model(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, num_steps,
            bool(output_hidden_states), use_cache, rule, self.lm_head, warm_start,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) and logits_to_keep else slice(None)
        logits = self.lm_head(x[:, keep])
        if self.config.final_logit_softcapping:
            cap = self.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=cache, hidden_states=tuple(hidden) if hidden else None
        )

    def new_cache(self):
        return LoopfitCache(self.config.cache_policy, self.config.cache_ring_size)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, position_ids=None, use_cache=True, num_steps=None,
                                      logits_to_keep=None, exit_criterion=None, warm_start=False, **kwargs):
        # Feed only the tokens the cache has not seen; positions come from the attention mask (left padding).
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        seen = past_key_values.seen if past_key_values is not None else 0
        inputs = {"input_ids": input_ids[:, seen:], "attention_mask": attention_mask, "past_key_values": past_key_values,
                  "use_cache": use_cache, "num_steps": num_steps, "exit_criterion": exit_criterion,
                  "warm_start": warm_start}
        if inputs_embeds is not None and seen == 0:
            inputs = {**inputs, "input_ids": None, "inputs_embeds": inputs_embeds}
        if position_ids is not None:
            inputs["position_ids"] = position_ids[:, seen:]
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs


def causal_lm_loss(logits, labels, num_items_in_batch=None):
    """Next-token cross-entropy in fp32; labels are shifted here, -100 is ignored."""
    logits = logits[:, :-1].flatten(0, 1).float()
    labels = labels[:, 1:].flatten().to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels, ignore_index=-100)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / num_items_in_batch


LoopfitConfig.register_for_auto_class()
LoopfitForCausalLM.register_for_auto_class("AutoModelForCausalLM")
