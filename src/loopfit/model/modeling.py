"""loopfit's depth-recurrent causal LM: the blocks, prelude / core / coda, and the model.

    e   = Prelude(embed(x))                               first p layers of the base model
    s_0 = noise (truncated normal), zeros, or e
    s_i = Core(Adapter(concat[s_{i-1}, e]))   i = 1..r    a block of layers looped r times
    y   = LMHead(Norm(Coda(s_r)))                         last c layers of the base model

Prelude, core and coda hold the base family's own block (Llama, Mistral, Qwen2, Qwen3, OLMo-2, Gemma3), computed
exactly as the base computes it; the family's differences are a handful of config flags. The model package
(configuration, modeling, cache, losses, generation) imports only torch, transformers and its own files, and every
converted folder carries all of it, so the folder loads with `trust_remote_code=True` where loopfit is not installed.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import CACHE_NAMES, LoopfitCache, find_cache
from .configuration import ADAPTER_INITS, CACHE_POLICIES, HUGINN_STATE_STD, STATE_INITS, LoopfitConfig, resolve_steps
from .generation import DRAFT_TOKENS, exit_rule, loop_with_exit, speculative_generate, warp_logits
from .losses import causal_lm_loss, linear_cross_entropy

__all__ = [
    "ADAPTER_INITS", "CACHE_NAMES", "CACHE_POLICIES", "DRAFT_TOKENS", "HUGINN_STATE_STD", "STATE_INITS",
    "LoopfitCache", "LoopfitConfig", "LoopfitForCausalLM", "LoopfitModel", "LoopfitPreTrainedModel",
    "causal_lm_loss", "exit_rule", "init_adapter", "linear_cross_entropy", "resolve_steps", "warp_logits",
]

OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


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
            s = loop_with_exit(self, s, e, n + k, run, exit_rule, head, rope, mask, cache)
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

    @torch.no_grad()
    def speculative_generate(self, input_ids, draft_steps, draft_tokens=DRAFT_TOKENS, generation_config=None,
                             cache=None, attention_mask=None, num_steps=None, stopping_criteria=None, **kwargs):
        """Exact self-speculative decoding: see `generation.speculative_generate`."""
        return speculative_generate(self, input_ids, draft_steps, draft_tokens, generation_config, cache,
                                    attention_mask, num_steps, stopping_criteria, **kwargs)

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


LoopfitForCausalLM.register_for_auto_class("AutoModelForCausalLM")
