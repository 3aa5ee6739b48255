"""The tiny random models the unit tests build: a (1, 2, 1) loopfit model and a plain Llama of the same width.
Neither seeds torch: a test seeds where its weights must repeat."""

from transformers import LlamaConfig, LlamaForCausalLM

from loopfit import LoopfitConfig, LoopfitForCausalLM

SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def recurrent(vocab_size=256, **overrides):
    """Prelude 1, core 2 (looped 4 times by default), coda 1; `overrides` are any LoopfitConfig fields."""
    cfg = dict(vocab_size=vocab_size, **SIZES, num_prelude_layers=1, num_core_layers=2, num_coda_layers=1,
               mean_recurrence=4)
    return LoopfitForCausalLM(LoopfitConfig(**{**cfg, **overrides}))


def llama(vocab_size=256, num_hidden_layers=2, **overrides):
    """A plain Llama of the same width; `overrides` are any LlamaConfig fields."""
    cfg = dict(vocab_size=vocab_size, **SIZES, num_hidden_layers=num_hidden_layers)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides}))


# The family flags of LoopfitConfig (what `loopfit convert` sets for each base family), for tests that must run
# every block variant: biases, q/k norms, post and sandwich norms, Gemma's offset norms, windows and soft-capping.
FAMILIES = {
    "llama": {},
    "mistral": dict(sliding_window=5, layer_types=["sliding_attention"] * 4,
                    rope={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm="head", head_dim=24),
    "olmo2": dict(qk_norm="full", norm_style="post"),
    "gemma3": dict(qk_norm="head", norm_style="sandwich", norm_offset=1.0, embed_scale=8.0,
                   hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=16, final_logit_softcapping=30.0,
                   sliding_window=4,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                   rope={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}),
}


def word_tokenizer(words=256, prefix="w"):
    """A word-level tokenizer of `words` tokens w0..w{words-1} (w0 is EOS): a tokenizer for tiny model folders."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({f"{prefix}{i}": i for i in range(words)}, unk_token=f"{prefix}1"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=f"{prefix}0", unk_token=f"{prefix}1")


def recurrent_family(family, **overrides):
    """`recurrent()` with the block flags of `family` (a key of FAMILIES)."""
    return recurrent(**{**FAMILIES[family], **overrides})
