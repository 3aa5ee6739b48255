"""Configuration of loopfit's depth-recurrent causal LM: the base family's block fields and the recurrence fields.

Part of the model package that ships inside every converted folder: imports only torch, transformers and its
sibling files.
"""

import math

from transformers import PretrainedConfig

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


LoopfitConfig.register_for_auto_class()
