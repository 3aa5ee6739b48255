"""Checkpoints: everything needed to continue a run bit for bit, written atomically, last K kept.

    OUT/checkpoints/step-00000100/
        model.safetensors   full (gathered) model weights
        optimizer.pt        full optimizer state of every optimizer, keyed by parameter name (Muon momentum
                            included, gathered from every rank under FSDP)
        state.pt            step, token and FLOP counters, data sampler state, RNG state of every rank
        trainer.json        the same counters, readable, and the resolved recipe
        manifest.json       sha256 of every file above; written last, so a checkpoint without it is incomplete

A checkpoint folder appears under its final name only once complete (`loopfit.io.atomic_dir`), so a kill -9
during a write leaves the previous checkpoints intact; a checkpoint whose files do not match the manifest is
skipped on resume with a message, falling back to the previous good one.
"""

import json
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..io import atomic_dir, sha256_file
from . import distributed

STEP_DIR = re.compile(r"^step-(\d+)$")
FILES = ("model.safetensors", "optimizer.pt", "state.pt", "trainer.json")


def checkpoint_dir(out_dir):
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir):
    """[(step, path)] of completed checkpoint folders, newest first (not yet verified)."""
    root = checkpoint_dir(out_dir)
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def remove_partial(out_dir):
    """Delete the temporary folders of checkpoint (and final/) writes that were killed midway; returns how many."""
    stale = [p for p in checkpoint_dir(out_dir).glob(".step-*.tmp-*") if p.is_dir()]
    stale += [p for p in Path(out_dir).glob(".final.tmp-*") if p.is_dir()]  # killed while exporting final/
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


def verify(path):
    """None if the checkpoint folder is complete and intact, else the reason it is not."""
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json (the write did not finish)"
    try:
        expected = json.loads(manifest.read_text())["sha256"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest.json ({e})"
    for name, digest in expected.items():
        f = Path(path) / name
        if not f.is_file():
            return f"{name} is missing"
        if sha256_file(f) != digest:
            return f"{name} does not match its checksum (corrupt)"
    return None


def latest_good(out_dir):
    """(path or None, [messages about skipped corrupt checkpoints]) for the newest intact checkpoint."""
    skipped = []
    for _, path in list_checkpoints(out_dir):
        reason = verify(path)
        if reason is None:
            return path, skipped
        skipped.append(f"checkpoint {path} is unusable: {reason}; falling back to the previous one")
    return None, skipped


def _full_options():
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _unshare(sd):
    """safetensors refuses tensors sharing memory (tied embeddings): give each its own storage."""
    seen, out = set(), {}
    for k, v in sd.items():
        v = v.detach().contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def save(out_dir, step, model, optimizers, trainer_state, d, keep=3, recipe=None):
    """Write checkpoint `step` (collective: every rank calls it); returns its path."""
    msd, osd = get_state_dict(model, optimizers, options=_full_options())
    rngs = distributed.gather_objects(rng_state(d.device))
    path = checkpoint_dir(out_dir) / f"step-{step:08d}"
    if d.main:
        with atomic_dir(path, force=True) as tmp:
            save_file(_unshare(msd), tmp / "model.safetensors")
            torch.save(osd, tmp / "optimizer.pt")
            torch.save({**trainer_state, "rng": rngs, "world": d.world}, tmp / "state.pt")
            readable = {k: v for k, v in trainer_state.items() if isinstance(v, (int, float, str))}
            (tmp / "trainer.json").write_text(json.dumps({**readable, "world": d.world, "recipe": recipe}, indent=1))
            sums = {name: sha256_file(tmp / name) for name in FILES}
            (tmp / "manifest.json").write_text(json.dumps({"sha256": sums, "time": time.time()}))
        for _, old in list_checkpoints(out_dir)[max(1, keep):]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return path


def load(path, model, optimizers, d):
    """Restore model, optimizers and this rank's RNG from checkpoint `path`; returns the trainer state dict."""
    path = Path(path)
    msd = load_file(path / "model.safetensors")
    osd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    set_state_dict(model, optimizers, model_state_dict=msd, optim_state_dict=osd, options=_full_options())
    rngs = state.pop("rng")
    if state.get("world") == d.world:
        set_rng_state(rngs[d.rank], d.device)
    state["rng_restored"] = state.get("world") == d.world
    return state
