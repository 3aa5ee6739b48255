"""Load a model to evaluate: a loopfit folder (recurrent), a plain transformers folder (the baseline), or
anything `loopfit.convert.load_base` accepts (GGUF file, short name such as `smollm2-135m`)."""

from pathlib import Path

import torch

from .. import LoopfitError, LoopfitForCausalLM


def is_recurrent(model):
    """True for a loopfit recurrent model; plain transformers models ignore the number of loops."""
    return isinstance(model, LoopfitForCausalLM)


def steps_kwargs(model, num_steps):
    """Keyword arguments that make `model(...)` / `model.generate(...)` run `num_steps` loops ({} for a plain model)."""
    return {"num_steps": int(num_steps)} if is_recurrent(model) and num_steps is not None else {}


def parse_steps(text):
    """'1,2,4,8' -> [1, 2, 4, 8]; rejects an empty list and non-positive or non-integer values."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise LoopfitError("--steps is empty: give test-time recurrences like --steps 1,2,4,8")
    try:
        steps = [int(p) for p in parts]
    except ValueError:
        raise LoopfitError(f"--steps must be positive integers like 1,2,4,8, got '{text}'") from None
    if any(s < 1 for s in steps):
        raise LoopfitError(f"--steps must be positive integers like 1,2,4,8, got '{text}'")
    return sorted(set(steps))


def load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise LoopfitError(
            f"no tokenizer in {path}: save one there with `tokenizer.save_pretrained('{path}')` ({type(e).__name__})"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_folder_version(folder):
    """Refuse a folder whose config was written by a newer loopfit than the installed one (its model file may
    hold features this one lacks): one line saying to upgrade."""
    import json

    from .. import __version__

    try:
        written = json.loads((Path(folder) / "config.json").read_text()).get("loopfit_version")
    except (OSError, ValueError, AttributeError):
        return  # from_pretrained names an unreadable config
    if written is None:
        return
    from packaging.version import InvalidVersion, Version

    try:
        newer = Version(str(written)) > Version(__version__)
    except InvalidVersion:
        return
    if newer:
        raise LoopfitError(f"{folder} was written by loopfit {written}, newer than the installed loopfit {__version__}: "
                           "upgrade with `pip install -U loopfit`")


def from_pretrained(folder, dtype=torch.float32, what=None):
    """AutoModelForCausalLM.from_pretrained(folder) with one-line errors for a newer loopfit's folder and for
    missing, truncated or corrupt weights."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    check_folder_version(folder)
    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        line = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise LoopfitError(f"cannot load {what or 'the model in'} {folder} ({type(e).__name__}: {line}): check that its "
                           "model.safetensors is complete (copy or convert it again)") from None


def load(path, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) in eval mode. Loopfit folders need no remote code once loopfit is imported."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise LoopfitError(f"{p} is not a model folder (no config.json): pass a folder written by save_pretrained")
        tok = load_tokenizer(p)
        model = from_pretrained(p, dtype)
    else:
        try:
            from ..convert import load_base
        except ImportError:
            raise LoopfitError(f"model '{path}' not found: pass a model folder") from None
        model, tok = load_base(path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok
