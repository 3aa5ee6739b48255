"""vLLM's `vllm.general_plugins` entry point for loopfit, and the checks a folder passes before vLLM serves it.

vLLM calls `register()` in every process it starts, before it reads a model's config. It teaches transformers'
AutoConfig the "loopfit" model type (importing loopfit does), registers the vLLM model lazily (the model module
imports vLLM's layers, which must not load before vLLM has chosen its platform), and hooks a config check into
vLLM's per-architecture config verification, which runs in the process that reads the config, before any engine
starts: a folder vLLM cannot serve is refused there in one line.
"""

import logging
import os
import sys
from pathlib import Path

ARCHITECTURE = "LoopfitForCausalLM"
SERVED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma3", "gemma3_text")
SERVED_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh")
SERVED_ROPE = ("default", "linear", "llama3")

logger = logging.getLogger("loopfit.serve")


def register():
    from vllm import ModelRegistry

    import loopfit  # noqa: F401  (registers the "loopfit" model type with AutoConfig)

    ModelRegistry.register_model(ARCHITECTURE, "loopfit.serve.vllm:LoopfitForCausalLM")
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    MODELS_CONFIG_MAP[ARCHITECTURE] = CheckLoopfitConfig


def serving_problem(config, folder=None):
    """One line saying why vLLM cannot serve this config (after hf_overrides) and how to fix it, or None."""
    from packaging.version import InvalidVersion, Version

    from loopfit import __version__

    where = f"{folder} " if folder else ""
    if getattr(config, "model_type", None) != "loopfit":
        return (f"{where}is not a loopfit model (model_type {getattr(config, 'model_type', None)!r}, not 'loopfit'): "
                f"serve it without the {ARCHITECTURE} architecture, or convert it with `loopfit convert`")
    written = getattr(config, "loopfit_version", None)
    try:
        newer = written is not None and Version(str(written)) > Version(__version__)
    except InvalidVersion:
        newer = False
    if newer:
        return (f"{where}was written by loopfit {written}, newer than the installed loopfit {__version__}: "
                "upgrade with `pip install -U loopfit`")
    r = getattr(config, "mean_recurrence", None)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        return (f"mean_recurrence must be an integer r >= 1 (got {r!r}): pass e.g. "
                "hf_overrides={\"mean_recurrence\": 4} (--hf-overrides '{\"mean_recurrence\": 4}' on vllm serve)")
    family = getattr(config, "base_model_type", None)
    if family is not None and family not in SERVED_FAMILIES:
        return (f"{where}was converted from a {family} model, a family loopfit's vLLM model does not serve: "
                f"it serves {', '.join(SERVED_FAMILIES)}; decode it with `loopfit generate` instead")
    if config.hidden_act not in SERVED_ACTIVATIONS:
        return (f"{where}uses the activation {config.hidden_act!r}, which loopfit's vLLM model does not serve "
                f"({', '.join(SERVED_ACTIVATIONS)}); decode it with `loopfit generate` instead")
    if getattr(config, "loop_lora", None):
        return (f"{where}has a low-rank delta per loop (lora.per_loop), which loopfit's vLLM model does not serve: "
                "decode it with `loopfit generate`, or train a shared LoRA (lora.per_loop=false), which is merged "
                "into the weights")
    kinds = sorted({p.get("rope_type", "default") for p in (config.rope or {}).values()} - set(SERVED_ROPE))
    if kinds:
        return (f"{where}uses RoPE type {kinds[0]!r}, which loopfit does not support (it supports "
                f"{', '.join(SERVED_ROPE)}); decode it with `loopfit generate` instead")
    if folder and Path(folder).is_dir():
        names = weight_names(folder)
        if names is not None and not any(n.startswith("model.core.0.") for n in names):
            return (f"{folder} has a loopfit config but its weights are not a loopfit model's (no model.core.0.*): "
                    "convert the base model with `loopfit convert` or save the trained model again")
    return None


def weight_names(folder):
    """The tensor names in a folder's safetensors files (headers only), or None if it has none."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    names = set()
    for f in files:
        with safe_open(str(f), "pt") as weights:
            names.update(weights.keys())
    return names


def refuse(message):
    """Stop serving: under vLLM's server commands, one line on stderr and exit status 2 (no traceback); from Python
    (`vllm.LLM`), a LoopfitError with the same line."""
    from loopfit import LoopfitError

    if os.path.basename(sys.argv[0]) in ("vllm", "api_server.py"):  # `vllm serve`, `python -m ...api_server`
        print(f"loopfit: error: {message}", file=sys.stderr)
        raise SystemExit(2)
    raise LoopfitError(message)


def fixed_depth_notice(config):
    """One line when the config asks for what vLLM does not do, served at a fixed r instead (or None)."""
    r = config.mean_recurrence
    if getattr(config, "exit_criterion", None):
        return (f"loopfit: this model's config asks for an adaptive exit ({config.exit_criterion}); vLLM serves it at "
                f"a fixed r = {r} loops per token")
    if getattr(config, "cache_policy", "exact") != "exact":
        return (f"loopfit: this model's config asks for the {config.cache_policy} KV cache; vLLM serves it with the "
                f"exact cache (one slot per loop), r = {r}")
    return None


class CheckLoopfitConfig:
    """vLLM's per-architecture config hook (the interface of vllm.model_executor.models.config's classes)."""

    @staticmethod
    def verify_and_update_config(vllm_config):
        model_config = vllm_config.model_config
        folder = model_config.model if os.path.isdir(str(model_config.model)) else None
        problem = serving_problem(model_config.hf_config, folder)
        if problem:
            refuse(problem)
        notice = fixed_depth_notice(model_config.hf_config)
        if notice:
            logger.warning(notice)

    @staticmethod
    def verify_and_update_model_config(model_config):
        return

