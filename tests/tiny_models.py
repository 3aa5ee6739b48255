"""The tests' shared set-up: the tiny random models they build (a (1, 2, 1) loopfit model, a plain Llama of the
same width, loopfit's block variants, a tiny transformers model of every family), a left-padded batch and a long
prose-like document.
`recurrent` and `llama` do not seed torch: a test seeds where its weights must repeat."""

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Olmo2Config,
    Qwen2Config,
    Qwen3Config,
)

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


# Tiny transformers models of every family loopfit converts (parity tests compare against them).
VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
BASE_FAMILIES = {
    "llama": lambda: LlamaConfig(**COMMON),
    "llama3-rope": lambda: LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE),
    "tinyllama-mha": lambda: LlamaConfig(**{**COMMON, "num_key_value_heads": 4}, tie_word_embeddings=True),
    "mistral-window": lambda: MistralConfig(**COMMON, sliding_window=5),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=24),
    "olmo2": lambda: Olmo2Config(**COMMON),
    "gemma3": lambda: Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                       layer_types=["sliding_attention", "full_attention"] * 2),
}


def random_base(name, seed=0):
    """A tiny transformers model of the family, with norms and biases randomised so every weight matters."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(BASE_FAMILIES[name]()).eval()
    with torch.no_grad():
        for pname, p in base.named_parameters():
            if p.dim() == 1:
                p.normal_(0.2 if name == "gemma3" else 1.0, 0.1) if "norm" in pname else p.normal_(0, 0.1)
    return base


def padded_batch(seed=0, length=14):
    """Three rows of random tokens; rows 1 and 2 left padded by 3 and 6."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids, mask


WORDS = ("the a an and or of to in on at by for with from as is was are be has have had he she it they we you i "
         "what how many much more less plus minus times so then story river ran past old mill mills bridge town "
         "tom apples buys q a answer question total each").split()


def tokenizer():
    """A small word-level tokenizer built in-process, so unit tests need no downloaded model: the words above,
    single digits, letters and ASCII punctuation, lower-cased; an unknown word is <unk>, and <|endoftext|> is
    EOS and padding."""
    import string

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = ["<|endoftext|>", "<unk>", *dict.fromkeys([*WORDS, *string.ascii_letters, *string.digits,
                                                          *string.punctuation])]
    tok = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>")


PROSE_WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his from at which but "
               "have an they you were 12 1999 3.14 don't it's (see) e.g. \"quoted\" café naïve — x=y+1").split()


def long_document(chars, seed=0):
    """Prose-like text of about `chars` characters: words, numbers, punctuation, accents, runs of spaces, tabs and
    blank lines."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out, size = [], 0
    while size < chars:
        sentence = ("    " if rng.random() < 0.2 else "") + " ".join(rng.choice(PROSE_WORDS, rng.integers(3, 30)))
        out.append(sentence + str(rng.choice([".", "!", "?", ";", "  "])) + str(rng.choice(["\n\n", "\n", " ", "\t"])))
        size += len(out[-1])
    return "".join(out)


def record_tokenizer_calls(monkeypatch, tokenizer):
    """The number of characters handed to `tokenizer` at each call from now on (a list that grows)."""
    handed = []
    call = type(tokenizer).__call__

    def spy(self, texts, *args, **kwargs):
        handed.append(sum(map(len, texts)) if isinstance(texts, list) else len(texts))
        return call(self, texts, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    return handed
