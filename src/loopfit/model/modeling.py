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
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .cache import CACHE_NAMES, LoopfitCache, find_cache
from .configuration import ADAPTER_INITS, CACHE_POLICIES, HUGINN_STATE_STD, STATE_INITS, LoopfitConfig
from .depth import DepthPlan, resolve_steps
from .generation import DRAFT_TOKENS, exit_rule, loop_with_exit, speculative_generate, warp_logits
from .losses import causal_lm_loss, linear_cross_entropy

__all__ = [
    "ADAPTER_INITS", "CACHE_NAMES", "CACHE_POLICIES", "DRAFT_TOKENS", "HUGINN_STATE_STD", "STATE_INITS",
    "DepthPlan", "LoopfitCache", "LoopfitConfig", "LoopfitForCausalLM", "LoopfitModel", "LoopfitModelOutput",
    "LoopfitPreTrainedModel", "causal_lm_loss", "exit_rule", "init_adapter", "linear_cross_entropy",
    "resolve_steps", "warp_logits",
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


class LoopLoRALinear(nn.Linear):
    """A core linear layer with its own low-rank delta for each loop (relaxed recursion, Bae et al., arXiv
    2410.20672): at loop t it computes x W^T + b + (alpha / rank) x A_t^T B_t^T; a loop past the last delta runs
    the shared weight alone. `loop` is a 0-d tensor, so one compiled block serves every loop, and an argument, so
    a block recomputed in the backward (activation checkpointing) reads the same loop's delta."""

    def __init__(self, in_features, out_features, bias, loops, rank, alpha):
        super().__init__(in_features, out_features, bias=bias)
        self.loop_lora_A = nn.Parameter(torch.zeros(loops, rank, in_features))
        self.loop_lora_B = nn.Parameter(torch.zeros(loops, out_features, rank))
        self.scale = alpha / rank

    def forward(self, x, loop=None):
        out = super().forward(x)
        if loop is None:  # outside the core loop: the shared weight
            return out
        last = self.loop_lora_A.shape[0] - 1
        t = loop.clamp(max=last).view(1)
        a, b = (w.index_select(0, t)[0].to(x.dtype) for w in (self.loop_lora_A, self.loop_lora_B))
        live = (loop <= last).to(x.dtype)  # a loop past the last delta adds nothing
        return out + F.linear(F.linear(x, a), b) * (self.scale * live)


def project(linear, x, loop):
    """linear(x), plus loop `loop`'s low-rank delta where the layer is relaxed per loop."""
    return linear(x, loop) if isinstance(linear, LoopLoRALinear) else linear(x)


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

    def forward(self, x, rope, mask, cache, cache_key, loop=None):
        b, q_len, _ = x.shape
        q, k, v = (project(p, x, loop) for p in (self.q_proj, self.k_proj, self.v_proj))
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
        return project(self.o_proj, out.transpose(1, 2).reshape(b, q_len, -1), loop)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, f, bias=config.mlp_bias)
        self.down_proj = nn.Linear(f, h, bias=config.mlp_bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x, loop=None):
        h = self.act(project(self.gate_proj, x, loop)) * project(self.up_proj, x, loop)
        return project(self.down_proj, h, loop)


def add_norms(layer, config):
    """Give a transformer layer its norms by role: `input_norm` and `pre_mlp_norm` before the sublayers (pre /
    sandwich), `post_attn_norm` and `post_mlp_norm` after them (post / sandwich); `pre` and `post` say which."""
    norm = lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)  # noqa: E731
    layer.pre = config.norm_style in ("pre", "sandwich")
    layer.post = config.norm_style in ("post", "sandwich")
    if layer.pre:
        layer.input_norm, layer.pre_mlp_norm = norm(), norm()
    if layer.post:
        layer.post_attn_norm, layer.post_mlp_norm = norm(), norm()


class Block(GradientCheckpointingLayer):
    """One transformer layer of the base family. Norms by role: `input_norm` and `pre_mlp_norm` before the
    sublayers (pre / sandwich), `post_attn_norm` and `post_mlp_norm` after them (post / sandwich)."""

    def __init__(self, config, layer_type):
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = Attention(config, layer_type)
        self.mlp = MLP(config)
        add_norms(self, config)

    def forward(self, x, rope, mask, cache=None, cache_key=None, loop=None):
        h = self.self_attn(self.input_norm(x) if self.pre else x, rope[self.layer_type], mask, cache, cache_key, loop)
        x = x + (self.post_attn_norm(h) if self.post else h)
        h = self.mlp(self.pre_mlp_norm(x) if self.pre else x, loop)
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
        if isinstance(module, LoopLoRALinear):  # no delta: every loop runs the shared weight
            init.zeros_(module.loop_lora_A)
            init.zeros_(module.loop_lora_B)
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


@dataclass
class LoopfitModelOutput(ModelOutput):
    """What the inner model returns. `last_hidden_state`: the coda's normed output, one row per read of the depth
    plan; `final_state`: the recurrent state the coda read (same rows); `prelude_output`: e, one row per input
    row; `loops_used`: the loops each row ran under an adaptive exit."""

    last_hidden_state: torch.FloatTensor | None = None
    final_state: torch.FloatTensor | None = None
    prelude_output: torch.FloatTensor | None = None
    loops_used: torch.LongTensor | None = None
    hidden_states: tuple | None = None
    cache: LoopfitCache | None = None


class ForwardStep:
    """One forward's view for its blocks: positions, RoPE tables and masks (by layer type and window), the cache,
    the hidden states kept, and whether it decodes one token a row after cached ones."""

    def __init__(self, position_ids, rope, mask, cache, hidden, decoding):
        self.position_ids, self.rope, self.mask = position_ids, rope, mask
        self.cache, self.hidden, self.decoding = cache, hidden, decoding


def relax_core(core, spec):
    """Swap the core's linear layers named in spec['targets'] for LoopLoRALinear (weights kept, deltas zero);
    returns the new layers."""
    swapped = []
    for block in core:
        for name, module in list(block.named_modules()):
            if name.rsplit(".", 1)[-1] in spec["targets"] and type(module) is nn.Linear:
                new = LoopLoRALinear(module.in_features, module.out_features, module.bias is not None,
                                     spec["loops"], spec["rank"], spec["alpha"]).to(module.weight.device,
                                                                                   module.weight.dtype)
                new.weight, new.bias = module.weight, module.bias
                owner, _, attr = name.rpartition(".")
                setattr(block.get_submodule(owner), attr, new)
                swapped.append(new)
    return swapped


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
        self.loop_linears = relax_core(self.core, c.loop_lora) if c.loop_lora else []
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

    def forward(self, input_ids=None, *, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                plan=None, output_hidden_states=False, warm_start=False, resume_from=None, core_loop=None):
        """Embed, prelude, the core looped as `plan` says (a DepthPlan; default `config.mean_recurrence` loops for
        every row), coda. `resume_from=(e, s)` skips the prelude and starts the core at `plan.first_loop` from
        state s, with e the prelude's output (a speculative verification: loops d.. of tokens whose first d loops
        a draft already ran). While decoding (one token a row, after cached ones), `core_loop(step, s, e)` replaces
        the plan's loop by one that picks each row's depth as it goes (the adaptive exit) and returns (state,
        loops per row). Returns a LoopfitModelOutput."""
        if resume_from is None:
            x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            if self.config.embed_scale != 1.0:
                x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        else:
            x = resume_from[0]
        step = self.begin(x, attention_mask, position_ids, cache, output_hidden_states)
        plan = plan if plan is not None else DepthPlan.fixed(None, self.config.mean_recurrence, x.shape[0])
        if resume_from is not None:
            e, s = resume_from
        else:
            e = self.run(step, "prelude", self.prelude, x)
            if warm_start and step.decoding and cache.last_state is not None:  # continuous chain of thought
                s = cache.last_state
            else:
                s = self.initial_state(e, step.position_ids)
        loops_used = None
        if core_loop is not None and step.decoding:
            s, loops_used = core_loop(step, s, e)
        else:
            s = self.loop(step, s, e, plan)
        x = self.norm(self.run(step, "coda", self.coda, s))
        if step.hidden is not None:
            step.hidden.append(x)
        if cache is not None:
            cache.end(x.shape[1], last_state=s[:, -1:].detach())
        return LoopfitModelOutput(last_hidden_state=x, final_state=s, prelude_output=e, loops_used=loops_used,
                                  hidden_states=tuple(step.hidden) if step.hidden else None, cache=cache)

    def begin(self, x, attention_mask, position_ids, cache, output_hidden_states=False):
        """What every block of this forward reads: positions, RoPE tables, attention masks, the cache."""
        b, q_len, _ = x.shape
        past = cache.seen if cache is not None else 0
        if attention_mask is not None and attention_mask.dim() == 4 and position_ids is None:
            raise ValueError("a 4D attention_mask (packed sequences) needs position_ids")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + q_len]
            else:
                position_ids = torch.arange(past, past + q_len, device=x.device)[None].expand(b, -1)
        if cache is not None:
            cache.begin(q_len)
        return ForwardStep(position_ids, self.rope(position_ids, x.dtype),
                           self.masks(attention_mask, q_len, past, x.device, position_ids), cache,
                           [] if output_hidden_states else None, cache is not None and q_len == 1 and past > 0)

    def run(self, step, segment, layers, x, loop=0, rows=None):
        """x through `layers` (cache slots of `segment`, loop); with `rows`, only the first `rows` rows."""
        rope, mask = step.rope, step.mask
        if rows is not None:
            rope = {t: (cos[:rows], sin[:rows]) for t, (cos, sin) in rope.items()}
            mask = {w: None if m is None else m[:rows] for w, m in mask.items()}
        loop_index = torch.full((), loop, device=x.device) if segment == "core" and self.loop_linears else None
        for j, layer in enumerate(layers):
            if step.hidden is not None:
                step.hidden.append(x)
            key = step.cache.key(segment, loop, j) if step.cache is not None else None
            x = layer(x, rope, mask, step.cache, key, loop_index)
        return x

    def core_step(self, step, s, e, loop, rows=None):
        """One loop of the core: s_{t+1} = Core(Adapter(concat[s_t, e]))."""
        return self.run(step, "core", self.core, self.adapter(torch.cat([s, e], dim=-1)), loop=loop, rows=rows)

    def read_coda(self, step, s):
        """The normed coda output for states s, reading earlier tokens from the cache without writing this
        forward's (the adaptive exit looks at a state's next token before deciding to loop on)."""
        peek = step.cache.read_only()
        for j, layer in enumerate(self.coda):
            s = layer(s, step.rope, step.mask, peek, step.cache.key("coda", 0, j))
        return self.norm(s)

    def loop(self, step, s, e, plan):
        """The core loop: row i runs to its deepest r (rows deepest first, so loop t runs the first few rows), and
        the states the coda reads come out one row per plan output."""
        b, wanted, kept = s.shape[0], plan.read_on_the_way, {}
        if plan.first_loop in wanted:  # a resumed row read at its first loop: the state it resumes from
            kept[plan.first_loop] = s
        for t in range(plan.first_loop, plan.depth):
            m = plan.rows_at(t)
            with torch.set_grad_enabled(torch.is_grad_enabled() and t >= plan.no_grad_loops):  # truncated backprop
                if m == b:
                    s = self.core_step(step, s, e, t)
                else:
                    s = torch.cat([self.core_step(step, s[:m], e[:m], t, rows=m), s[m:]])
            if t + 1 in wanted:
                kept[t + 1] = s
        if plan.one_read_per_row:
            return s
        # one output row per (row, r): the coda reads each, and its rows take their input row's positions and mask
        s = torch.cat([(s if r == plan.reads[i][0] else kept[r])[i:i + 1] for i, r in plan.outputs])
        rows = torch.tensor([i for i, _ in plan.outputs], device=s.device)
        step.rope = {t: tuple(x if x.shape[0] == 1 else x[rows] for x in cs) for t, cs in step.rope.items()}
        step.mask = {w: m if m is None or m.shape[0] == 1 else m[rows] for w, m in step.mask.items()}
        return s


class LoopfitForCausalLM(LoopfitPreTrainedModel, GenerationMixin):
    """Depth-recurrent causal LM. `forward(..., num_steps=r)` runs r loops; `num_steps=(n, k)` runs n loops without
    gradient then k with it; the default is `config.mean_recurrence`. `generate(..., num_steps=r)` works too.
    With `config.tie_word_embeddings` the head shares the input embedding matrix (as the base model did)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

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
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        inference_only = self.training or rule is not None or warm_start or bool(output_hidden_states) \
            or (row_steps is not None and sweep is not None)
        if sweep is not None:
            policy = past_key_values.policy if past_key_values is not None else "exact"
            plan = DepthPlan.sweep(sweep, batch, inference_only, policy)
        elif row_steps is not None:
            plan = DepthPlan.per_row(row_steps, batch, unsupported=inference_only)
        else:
            plan = DepthPlan.fixed(num_steps, self.config.mean_recurrence, batch)
        core_loop = None
        if rule is not None:  # while decoding, each row loops until the rule says its next token has settled
            core_loop = partial(loop_with_exit, self, max_loops=plan.depth, rule=rule)
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=past_key_values,
                         inputs_embeds=inputs_embeds, plan=plan, output_hidden_states=bool(output_hidden_states),
                         warm_start=warm_start, core_loop=core_loop)
        x, cache, hidden = out.last_hidden_state, out.cache, out.hidden_states
        if out.loops_used is not None:
            cache.record_loops(out.loops_used)
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
            return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=hidden,
                                          **{OUTPUT_CACHE_FIELD: cache})
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) and logits_to_keep else slice(None)
        logits = self.head_logits(x[:, keep])
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden,
                                      **{OUTPUT_CACHE_FIELD: cache})

    def flop_groups(self):
        """Non-embedding parameters by how often a token's forward uses them: the prelude, the coda and the final
        norm once, the core and the adapter once per loop (the training FLOPs count reads these)."""
        inner = self.model

        def count(*modules):
            return sum(p.numel() for m in modules for p in m.parameters())

        return {"prelude": count(inner.prelude), "core": count(inner.core), "coda": count(inner.coda),
                "adapter": count(inner.adapter), "final_norm": count(inner.norm)}

    def fsdp_units(self):
        """(part, block) for every transformer block, the units FSDP shards one by one; the core's blocks run every
        loop, so a caller keeps them unsharded between loops."""
        inner = self.model
        return ([("prelude", b) for b in inner.prelude] + [("core", b) for b in inner.core]
                + [("coda", b) for b in inner.coda])

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
