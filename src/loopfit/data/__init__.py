"""loopfit's data pipeline: sources -> token shards (`prepare`) -> phased blends (`blend`) -> packed batches
(`sampler`).

    from loopfit.data import prepare, load_blend, BlendSampler, check_tokenizer, iter_eval_batches
"""

from .blend import Blend, Phase, load_blend
from .prepare import prepare
from .sampler import BlendSampler
from .shards import (
    TokenDataset,
    check_tokenizer,
    iter_eval_batches,
    open_dataset,
    tokenizer_fingerprint,
    verify_dataset,
)
from .sources import Chat, Source, read_documents

__all__ = [
    "Blend", "BlendSampler", "Chat", "Phase", "Source", "TokenDataset", "check_tokenizer", "iter_eval_batches",
    "load_blend", "open_dataset", "prepare", "read_documents", "tokenizer_fingerprint", "verify_dataset",
]  # fmt: skip
