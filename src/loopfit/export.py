"""Write a plain transformers folder: the way out of loopfit for models that need none of it.

  loopfit export smollm2-135m --out smollm2-hf              an offline short name (its GGUF, dequantized)
  loopfit export model.Q4_K_M.gguf --out model-hf            any GGUF file of a supported family
  loopfit export runs/baseline/final --out baseline-hf       a trained plain baseline, without loopfit's files

The result holds config.json, model.safetensors (fp32 unless --dtype) and the tokenizer files, and loads with
`AutoModelForCausalLM.from_pretrained(OUT)` where loopfit is not installed. (transformers itself cannot save a
model it loaded from GGUF: "The model is quantized with gguf and is not serializable".) A loopfit (recurrent)
folder is already a transformers folder: it loads with `trust_remote_code=True`, so it is not exported.
"""

import sys
from pathlib import Path

from . import LoopfitError
from .io import atomic_dir, check_writable
from .loading import is_recurrent, load_base

DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names


def export(source, out, dtype="float32", force=False):
    """Write SOURCE (short name, GGUF file or plain transformers folder) as a plain transformers folder at OUT."""
    out = Path(out)
    if dtype not in DTYPES:
        raise LoopfitError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if out.exists() and not force:
        raise LoopfitError(f"{out} already exists: choose another --out or pass --force to replace it")
    check_writable(out)
    if Path(source).is_dir() and is_recurrent(source):
        raise LoopfitError(f"{source} is a loopfit (recurrent) model: it is already a transformers folder (load it "
                           "with trust_remote_code=True, or import loopfit); export takes plain models")
    import torch

    model, tokenizer = load_base(source)
    model.config.__dict__.pop("loopfit_version", None)
    with atomic_dir(out, force=force) as tmp:
        model.to(getattr(torch, dtype)).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def add_arguments(parser):
    parser.add_argument("source", metavar="SRC", help="offline short name, .gguf file, or a plain transformers "
                        "folder (e.g. a trained baseline's final/)")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist unless --force)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (default float32)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args):
    out = export(args.source, args.out, args.dtype, args.force)
    print(f"wrote {out}: a plain transformers folder (AutoModelForCausalLM.from_pretrained('{out}'))",
          file=sys.stderr)
