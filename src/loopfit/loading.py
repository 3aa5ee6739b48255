"""The one way in: a short name, a model folder or a GGUF file -> a model and its tokenizer.

- `load(source)`: any causal LM to evaluate or generate with (a loopfit folder, a plain transformers folder, a
  GGUF file or an offline short name), its tokenizer padded with EOS where it has no pad token.
- `load_base(source)`: a plain base model to convert or analyze (fp32, GGUF dequantized), its tokenizer as saved;
  `base_config(source)` reads its config without the weights.
- `offline_folder(name)`: an offline model (smollm2-135m, qwen2.5-0.5b, gemma3-270m) as a cached fp32 folder.
- `load_tokenizer(source, pad=...)`: the one tokenizer loader; `is_recurrent(x)`: the one answer to "loopfit?".

Every failure is one LoopfitError line naming the file and the fix: missing, truncated or corrupt weights and
GGUF files, a tokenizer of another model, a folder written by a newer loopfit. Where the offline packages live
is `loopfit.assets`'s business; this module is the only one that turns them into models.
"""

import json
import struct
from collections.abc import Mapping
from pathlib import Path

from . import LoopfitError, __version__
from .assets import CACHE_DIR, OFFLINE_MODELS, offline_gguf
from .io import atomic_dir

# The base model families loopfit converts (loopfit.convert maps each onto its block flags).
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma3_text")

# What a truncated or corrupt GGUF file raises inside transformers / gguf (struct.error: cut in the metadata).
GGUF_ERRORS = (ValueError, KeyError, OSError, RuntimeError, IndexError, EOFError, struct.error)


def _first_line(e):
    return (str(e).splitlines() or [type(e).__name__])[0][:160]


# ----------------------------------------------------------------------------------------------------------------
# What a model is


def is_recurrent(model_or_config_or_folder):
    """True for a loopfit (depth-recurrent) model, its config (object or dict), or a folder holding one; plain
    transformers models ignore the number of loops. A folder without a readable config.json is not recurrent."""
    x = model_or_config_or_folder
    if isinstance(x, (str, Path)):
        try:
            x = json.loads((Path(x) / "config.json").read_text())
        except (OSError, ValueError):
            return False
    if isinstance(x, Mapping):
        return x.get("model_type") == "loopfit"
    config = getattr(x, "config", x)  # a model (also compiled or wrapped: they forward .config) or a config
    return getattr(config, "model_type", None) == "loopfit"


def check_family(cfg):
    """Refuse a base config of a family loopfit does not convert (or a variant it cannot run)."""
    if cfg.model_type not in SUPPORTED:
        raise LoopfitError(f"unsupported architecture '{cfg.model_type}': "
                           f"loopfit converts {', '.join(SUPPORTED)} models")
    if cfg.model_type == "gemma3_text" and getattr(cfg, "attn_logit_softcapping", None):
        raise LoopfitError("Gemma3 with attention logit softcapping is not supported (SDPA cannot cap logits)")


# ----------------------------------------------------------------------------------------------------------------
# Sources


def _check_gguf(path):
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LoopfitError(f"{path} is not a GGUF file (bad magic bytes): give a .gguf file or a model folder")


def _bad_gguf(path, e):
    return LoopfitError(f"cannot read GGUF {path} ({type(e).__name__}: {_first_line(e)}): the file is truncated or "
                        f"corrupt, or not of the {', '.join(SUPPORTED)} families; download it again")


def resolve_source(source):
    """(kind, path) for a short name, GGUF file or transformers folder: kind is "gguf" or "folder"."""
    if str(source) in OFFLINE_MODELS:
        return "gguf", offline_gguf(str(source))
    path = Path(source)
    if not path.exists():
        raise LoopfitError(f"{source} does not exist: give a model folder, a .gguf file, or one of "
                           f"{', '.join(OFFLINE_MODELS)}")
    if path.is_file():
        _check_gguf(path)
        return "gguf", path
    if not (path / "config.json").exists():
        raise LoopfitError(f"{path} has no config.json: give a transformers model folder (save_pretrained output)")
    return "folder", path


def base_config(source):
    """The base model's text config, read without loading weights; raises LoopfitError if unsupported."""
    from transformers import AutoConfig

    kind, path = resolve_source(source)
    try:
        if kind == "folder":
            cfg = AutoConfig.from_pretrained(path)
        else:
            cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except GGUF_ERRORS as e:
        if kind == "gguf":
            raise _bad_gguf(path, e) from None
        raise LoopfitError(f"cannot read the config of {source} ({_first_line(e)}): loopfit reads "
                           f"{', '.join(SUPPORTED)} models") from None
    if is_recurrent(cfg):
        raise LoopfitError(f"{source} is already a loopfit model: give the plain base model it was converted from")
    cfg = cfg.get_text_config()
    check_family(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


def load_tokenizer(source, pad=False):
    """A transformers tokenizer from a model or tokenizer folder, a GGUF file or an offline short name (a tokenizer
    object is returned as it is).

    The pad policy, the same for every caller: the tokenizer comes as saved (conversion writes it on unchanged);
    `pad=True` (batched evaluation and generation) gives one that has no pad token EOS as its pad token. The
    padding side is the caller's to choose per call (generation pads on the left)."""
    if not isinstance(source, (str, Path)):
        tok = source
    else:
        from transformers import AutoTokenizer

        path = Path(source)
        if not path.exists():
            if str(source) not in OFFLINE_MODELS:
                raise LoopfitError(f"tokenizer '{source}' does not exist: give a model folder, a GGUF file or a short "
                                   "name")
            path = offline_gguf(str(source))
        try:
            if path.is_file():
                tok = _gguf_eos(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name), path)
            else:
                tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:  # transformers raises OSError, ValueError, TypeError and others for unusable folders
            raise LoopfitError(f"no tokenizer in {path} ({type(e).__name__}: {_first_line(e)[:120]}): point at a model "
                               f"or tokenizer folder, or save one there with `tokenizer.save_pretrained('{path}')`"
                               ) from None
    if pad and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _gguf_eos(tok, path):
    """The GGUF file's own EOS token: transformers before 5.2x reads some (SmolLM2's <|im_end|>) as another token,
    and data prepared with one EOS would not match a model converted with the other."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.ggml.eos_token_id")
    if field is not None:
        eos = tok.convert_ids_to_tokens(int(field.contents()))
        if eos is not None and tok.eos_token != eos:
            tok.eos_token = eos
    return tok


# ----------------------------------------------------------------------------------------------------------------
# Models


def check_folder_version(folder):
    """Refuse a folder whose config was written by a newer loopfit than the installed one (its model file may
    hold features this one lacks): one line saying to upgrade."""
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
        raise LoopfitError(f"{folder} was written by loopfit {written}, "
                           f"newer than the installed loopfit {__version__}: upgrade with `pip install -U loopfit`")


def from_pretrained(folder, dtype=None, what=None):
    """AutoModelForCausalLM.from_pretrained(folder) (loopfit folders need no remote code: importing loopfit
    registers the model type) with one-line errors for a newer loopfit's folder and for missing, truncated or
    corrupt weights. `dtype` defaults to float32. `what` names the setting the folder came from in the error
    (e.g. "model.init_from")."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    check_folder_version(folder)
    where = f"of {what}" if what else "in"
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32,
                                                           output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise LoopfitError(f"cannot read the weights {where} {folder} ({type(e).__name__}: {_first_line(e)}): check "
                           "that its model.safetensors is complete (copy, convert or save it again)") from None
    # a config.json whose layer counts (or sizes) disagree with the weights would load with random or dropped
    # layers: refuse it rather than train or evaluate a different model
    for problem, keys in (("the model it describes needs {} weight(s) the weights lack", info.get("missing_keys")),
                          ("the weights hold {} the model it describes has no place for", info.get("unexpected_keys")),
                          ("{} weight(s) have another shape than it describes", info.get("mismatched_keys"))):
        keys = sorted(k if isinstance(k, str) else k[0] for k in keys or ())
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise LoopfitError(f"the weights {where} {folder} do not match its config.json: "
                               f"{problem.format(len(keys))} ({shown}); restore the config.json saved with these "
                               "weights (layer counts, sizes)")
    return model


def _dequantized_copy(model):
    # A model loaded from GGUF carries quantization_config, which save_pretrained refuses: rebuild it plain.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    plain_cfg = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(plain_cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True)
    for name, buf in model.named_buffers():  # non-persistent buffers (RoPE) are not in the state dict
        owner, _, attr = name.rpartition(".")
        plain.get_submodule(owner)._buffers[attr] = buf
    plain.tie_weights()
    return plain


def _load_gguf(path, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=dtype or torch.float32)
    except GGUF_ERRORS as e:
        raise _bad_gguf(path, e) from None
    check_family(model.config.get_text_config())
    return _dequantized_copy(model), load_tokenizer(path)


def offline_folder(name):
    """The offline model `name` as a plain fp32 transformers folder, dequantized from its GGUF once and cached
    (loading a folder takes a second; dequantizing the GGUF takes tens of seconds)."""
    folder = CACHE_DIR / f"{name}-fp32"
    if (folder / "config.json").exists():
        return folder
    path = offline_gguf(name)
    base_config(path)
    model, tokenizer = _load_gguf(path)
    with atomic_dir(folder, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def load_base(source, dtype=None):
    """A plain transformers causal LM (`dtype`, float32 by default; no quantization config) in eval mode and its
    tokenizer (as saved), from a folder, GGUF file or short name (its cached fp32 folder). Raises LoopfitError for
    unsupported architectures, missing or corrupt weights and a tokenizer of another model."""
    kind, path = resolve_source(source)
    if str(source) in OFFLINE_MODELS:
        kind, path = "folder", offline_folder(str(source))
    base_config(path)
    if kind == "folder":
        model, tokenizer = from_pretrained(path, dtype), load_tokenizer(path)
    else:
        model, tokenizer = _load_gguf(path, dtype)
    model.eval()
    if len(tokenizer) > model.config.vocab_size:
        raise LoopfitError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                           f"{model.config.vocab_size}: the tokenizer belongs to another model")
    return model, tokenizer


def load(source, dtype=None, device="cpu"):
    """(model, tokenizer) in eval mode (`dtype`, float32 by default), to evaluate or generate with: a loopfit folder
    (recurrent), any plain transformers folder (the baseline), or a base model `load_base` reads (GGUF file, short
    name). The tokenizer pads with EOS where it has no pad token (batches need one)."""
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LoopfitError(f"{path} is not a model folder (no config.json): "
                               "pass a folder written by save_pretrained")
        tokenizer = load_tokenizer(path, pad=True)  # before the weights: a missing tokenizer fails fast
        model = from_pretrained(path, dtype)
    else:
        model, tokenizer = load_base(source)
        load_tokenizer(tokenizer, pad=True)
    return model.to(device).eval(), tokenizer
