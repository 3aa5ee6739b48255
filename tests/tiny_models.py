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
