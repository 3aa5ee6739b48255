"""loopfit's model package: the files every converted folder carries (each imports only torch, transformers and
its siblings, so a folder loads with `trust_remote_code` where loopfit is not installed).

    configuration.py  LoopfitConfig
    modeling.py       the blocks, prelude / core / coda, LoopfitModel and LoopfitForCausalLM
    depth.py          the depth plan of a forward: which loops each row runs and where the coda reads it
    cache.py          LoopfitCache
    losses.py         next-token cross-entropy, with and without the full logits
    generation.py     adaptive exit rules, self-speculative decoding, sampling warps
"""

from pathlib import Path

from .cache import CACHE_NAMES, LoopfitCache, find_cache
from .configuration import ADAPTER_INITS, CACHE_POLICIES, HUGINN_STATE_STD, STATE_INITS, LoopfitConfig
from .depth import DepthPlan, resolve_steps
from .generation import DRAFT_TOKENS, EXIT_CANDIDATES, exit_rule, speculative_generate, warp_logits
from .losses import causal_lm_loss, linear_cross_entropy
from .modeling import LoopfitForCausalLM, LoopfitModel, LoopfitModelOutput, LoopfitPreTrainedModel, init_adapter

MODEL_FILES = ("configuration.py", "modeling.py", "depth.py", "cache.py", "losses.py", "generation.py")


def model_files():
    """The package's files, as copied into a converted folder."""
    here = Path(__file__).parent
    return [here / name for name in MODEL_FILES]


__all__ = [
    "ADAPTER_INITS", "CACHE_NAMES", "CACHE_POLICIES", "DRAFT_TOKENS", "EXIT_CANDIDATES", "HUGINN_STATE_STD",
    "MODEL_FILES", "STATE_INITS", "DepthPlan", "LoopfitCache", "LoopfitConfig", "LoopfitForCausalLM",
    "LoopfitModel", "LoopfitModelOutput", "LoopfitPreTrainedModel", "causal_lm_loss", "exit_rule", "find_cache",
    "init_adapter", "linear_cross_entropy", "model_files", "resolve_steps", "speculative_generate", "warp_logits",
]
