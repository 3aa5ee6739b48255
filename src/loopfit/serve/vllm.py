"""loopfit's depth-recurrent LM as a vLLM model (registered by `loopfit.serve.plugin`).

    e   = Prelude(embed(x))
    s_0 = the inference path's fixed noise for each position (or zeros, or e)
    s_i = Core(Adapter(concat[s_{i-1}, e]))   i = 1..r
    y   = LMHead(Norm(Coda(s_r)))

The same computation as `loopfit.model` at r = the folder's `mean_recurrence` (or `hf_overrides`'
"mean_recurrence"). The core's weights are shared across loops, but each (loop, core layer) has its own vLLM
`Attention`, so the paged KV cache holds every loop's keys and values, exactly as loopfit's "exact" cache.
Projections are vLLM's tensor-parallel linear layers; norms, RoPE and the state noise are loopfit's own code,
so a token's logits are the reference model's up to matmul rounding.
"""

from collections.abc import Iterable

import torch
from torch import nn
from transformers.activations import ACT2FN
from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
)
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from loopfit.model.modeling import RMSNorm, add_norms, apply_rope, rope_inv_freq

from .plugin import refuse, serving_problem

# checkpoint name -> (vLLM's fused parameter, shard)
STACKED = ((".q_proj.", ".qkv_proj.", "q"), (".k_proj.", ".qkv_proj.", "k"), (".v_proj.", ".qkv_proj.", "v"),
           (".gate_proj.", ".gate_up_proj.", 0), (".up_proj.", ".gate_up_proj.", 1))


def state_noise_bank(config, length, block=256):
    """The fixed initial state of each position 0..length-1 that loopfit's inference path draws (the same
    generator seeds, block by block), in fp32 on the CPU."""
    std = config.state_init_std
    blocks = []
    for b in range(-(-length // block)):
        g = torch.Generator().manual_seed(config.state_noise_seed * 1_000_003 + b)
        x = torch.empty(block, config.hidden_size, device="cpu", dtype=torch.float32)
        blocks.append(nn.init.trunc_normal_(x, std=std, a=-3 * std, b=3 * std, generator=g))
    return torch.cat(blocks)[:length]


class LoopfitAttention(nn.Module):
    """q/k/v/o projections (tensor-parallel), optional QK norms and loopfit's RoPE, and one vLLM Attention per
    loop this layer runs (`attention_names`: the cache layer name of each)."""

    def __init__(self, config, layer_type, attention_names, cache_config, quant_config, prefix):
        super().__init__()
        c = config
        tp = get_tensor_model_parallel_world_size()
        self.tp, self.tp_rank = tp, get_tensor_model_parallel_rank()
        self.head_dim, self.layer_type = c.head_dim, layer_type
        self.n_heads = c.num_attention_heads // tp
        self.n_kv = max(1, c.num_key_value_heads // tp)
        self.q_size, self.kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.qkv_proj = QKVParallelLinear(c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads,
                                          bias=c.qkv_bias, quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.o_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.qk_norm = c.qk_norm
        if c.qk_norm == "head":
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.norm_offset)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.norm_offset)
        elif c.qk_norm == "full":  # over all heads: tensor-parallel ranks gather q and k first
            self.q_norm = RMSNorm(c.num_attention_heads * c.head_dim, c.rms_norm_eps, c.norm_offset)
            self.k_norm = RMSNorm(c.num_key_value_heads * c.head_dim, c.rms_norm_eps, c.norm_offset)
        window = c.sliding_window if layer_type == "sliding_attention" else None
        scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
        self.attn = nn.ModuleList(
            Attention(self.n_heads, self.head_dim, scale, num_kv_heads=self.n_kv, cache_config=cache_config,
                      quant_config=quant_config, per_layer_sliding_window=window, prefix=name)
            for name in attention_names)

    def _full_norm(self, x, norm):
        if self.tp == 1:
            return norm(x)
        x = norm(tensor_model_parallel_all_gather(x.contiguous()))
        return x.chunk(self.tp, dim=-1)[self.tp_rank]

    def forward(self, x, rope, loop=0):
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "full":
            q, k = self._full_norm(q, self.q_norm), self._full_norm(k, self.k_norm)
        q, k = q.view(-1, self.n_heads, self.head_dim), k.view(-1, self.n_kv, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope[self.layer_type]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.attn[loop](q.reshape(-1, self.q_size), k.reshape(-1, self.kv_size), v)
        out, _ = self.o_proj(out)
        return out


class LoopfitMLP(nn.Module):
    def __init__(self, config, quant_config, prefix):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(h, [f, f], bias=config.mlp_bias, quant_config=quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(f, h, bias=config.mlp_bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        gate_up, _ = self.gate_up_proj(x)
        gate, up = gate_up.chunk(2, dim=-1)
        out, _ = self.down_proj(self.act(gate) * up)
        return out


class LoopfitBlock(nn.Module):
    """One layer of the base family, norms by role as in loopfit.model.modeling.Block."""

    def __init__(self, config, layer_type, attention_names, cache_config, quant_config, prefix):
        super().__init__()
        self.self_attn = LoopfitAttention(config, layer_type, attention_names, cache_config, quant_config,
                                          f"{prefix}.self_attn")
        self.mlp = LoopfitMLP(config, quant_config, f"{prefix}.mlp")
        add_norms(self, config)

    def forward(self, x, rope, loop=0):
        h = self.self_attn(self.input_norm(x) if self.pre else x, rope, loop)
        x = x + (self.post_attn_norm(h) if self.post else h)
        h = self.mlp(self.pre_mlp_norm(x) if self.pre else x)
        return x + (self.post_mlp_norm(h) if self.post else h)


class LoopfitModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        c = vllm_config.model_config.hf_config
        problem = serving_problem(c)
        if problem:
            refuse(problem)
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        if cache_config is not None:  # windows are per layer (layer_types); none may fall back to a global one
            cache_config.sliding_window = None
        self.config, self.loops = c, c.mean_recurrence
        p, k = c.num_prelude_layers, c.num_core_layers
        types = list(c.layer_types)
        # Each Attention is one KV-cache layer, named with one index: prelude layers, then (loop t, core layer j)
        # at p + t * k + j, then the coda.
        name = lambda i: f"{prefix}.layers.{i}.self_attn.attn"  # noqa: E731
        block = lambda i, t, names, where: LoopfitBlock(c, t, names, cache_config, quant_config, where)  # noqa: E731
        self.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size, quant_config=quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        self.prelude = nn.ModuleList(block(i, types[i], [name(i)], f"{prefix}.prelude.{i}") for i in range(p))
        self.core = nn.ModuleList(
            block(j, types[p + j], [name(p + t * k + j) for t in range(self.loops)], f"{prefix}.core.{j}")
            for j in range(k))
        coda_start = p + self.loops * k
        self.coda = nn.ModuleList(block(m, types[p + k + m], [name(coda_start + m)], f"{prefix}.coda.{m}")
                                  for m in range(c.num_coda_layers))
        self.adapter = ReplicatedLinear(2 * c.hidden_size, c.hidden_size, bias=False, quant_config=quant_config,
                                        prefix=f"{prefix}.adapter")
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_offset)
        for t, params in c.rope.items():
            self.register_buffer(f"inv_freq_{t}", rope_inv_freq(params, c.head_dim), persistent=False)
        if c.state_init == "normal":
            bank = state_noise_bank(c, vllm_config.model_config.max_model_len)
            self.register_buffer("state_noise", bank.to(torch.get_default_device()), persistent=False)

    def rope(self, positions, dtype):
        out = {}
        for t in self.config.rope:
            freqs = positions[:, None].float() * getattr(self, f"inv_freq_{t}")[None, :].float()
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [tokens, 1 (heads), head_dim]
            out[t] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return out

    def embed_input_ids(self, input_ids):
        x = self.embed_tokens(input_ids)
        if self.config.embed_scale != 1.0:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        return x

    def initial_state(self, e, positions):
        if self.config.state_init == "zeros":
            return torch.zeros_like(e)
        if self.config.state_init == "embed":
            return e
        return self.state_noise[positions].to(e.dtype)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        x = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        rope = self.rope(positions, x.dtype)
        for layer in self.prelude:
            x = layer(x, rope)
        e, s = x, self.initial_state(x, positions)
        for t in range(self.loops):
            s, _ = self.adapter(torch.cat([s, e], dim=-1))
            for layer in self.core:
                s = layer(s, rope, loop=t)
        for layer in self.coda:
            s = layer(s, rope)
        return self.norm(s)


class LoopfitForCausalLM(nn.Module):
    """vLLM's entry for the LoopfitForCausalLM architecture; weight names are loopfit's safetensors names."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        c = vllm_config.model_config.hf_config
        self.config = c
        self.model = LoopfitModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(c.vocab_size, c.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if c.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(c.vocab_size, soft_cap=c.final_logit_softcapping)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue  # the head is the embedding
            for old, new, shard in STACKED:
                if old in name:
                    target = name.replace(old, new)
                    if target not in params:
                        raise KeyError(f"{name}: no parameter {target} in loopfit's vLLM model")
                    params[target].weight_loader(params[target], tensor, shard)
                    break
            else:
                target = name
                if target not in params:
                    raise KeyError(f"{name}: a weight loopfit's vLLM model does not have (is this a loopfit folder?)")
                loader = getattr(params[target], "weight_loader", default_weight_loader)
                loader(params[target], tensor)
            loaded.add(target)
        return loaded
