"""LoRA on the core's linear layers (recipe section `lora`): shared by every loop and merged into the weights on
export, or one delta per loop (`lora.per_loop`, relaxed recursion) kept in the model.

Each targeted nn.Linear of the core blocks gains two parameters, `lora_A` [rank, in] (Kaiming-uniform, as PEFT
initialises it) and `lora_B` [out, rank] (zero, so training starts from the converted model), and a forward
hook adding (alpha / rank) * x A^T B^T to its output. The weight keeps its name, so checkpoints, FSDP2 units,
compilation and activation checkpointing see the same blocks; `merged_state_dict` folds B A into each weight
for `final/`, which is then an ordinary loopfit folder.

The factors are optimised by AdamW at `lora.lr`, not by Muon: Muon replaces each update by an orthogonal matrix
of the same size whatever the gradient's scale, which for a factor pair whose product is the real update (and
whose B starts at zero, making A's first gradients zero) loses the alpha / rank scaling LoRA is tuned around;
the retrofitting authors' trainer refuses LoRA with Muon for the same reason. Muon still trains whatever else
`train.trainable` selects.

Per loop (Relaxed Recursive Transformers, Bae et al., arXiv 2410.20672): loop t of the core adds its own delta
B_t A_t (the model package's LoopLoRALinear; the model's config records `loop_lora`, so the folder loads and
decodes with the deltas wherever the package goes). `lora.init: svd` starts loop t of core layer j from the
truncated SVD of W_base - W_core, where W_base is the base layer that loop stands for: the layers between the
prelude and the coda, dropped ones included, read K at a time (loop 0 the first K, ...); a loop with no base
layer left starts at zero. At full rank each such loop's linear layers then equal the base layer's (its norms
stay the core's).
"""

import math

import torch
import torch.nn.functional as F

from .. import LoopfitError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def targets(model, names):
    """{qualified name: nn.Linear} of the core's linear layers named in `names` (e.g. q_proj, down_proj)."""
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        raise LoopfitError(f"lora.targets names {', '.join(unknown)}: choose among {', '.join(TARGETS)}")
    return {n: m for n, m in model.named_modules()
            if n.startswith("model.core.") and n.rsplit(".", 1)[-1] in names and isinstance(m, torch.nn.Linear)}


def check(model, cfg, recurrent):
    """Refuse LoRA where it cannot apply: a plain model, or a rank outside [1, the matrix's smaller side]."""
    if not cfg.rank:
        return
    if not recurrent:
        raise LoopfitError("lora.rank is set but model.init_from is a plain model: loopfit puts LoRA on the core of a "
                           "recurrent model; convert the model first, or set lora.rank=0")
    found = targets(model, cfg.targets)
    if not found:
        raise LoopfitError(f"lora.targets {cfg.targets} matches no linear layer of the core")
    if cfg.per_loop and cfg.init == "svd" and not (getattr(model.config, "source_model", None)
                                                   and model.config.source_layers):
        raise LoopfitError("lora.init svd needs the base model the conversion came from, but model.init_from does "
                           "not record it (converted by an earlier loopfit): use lora.init=zero, or convert again")
    smallest = min(min(m.weight.shape) for m in found.values())
    if cfg.rank > smallest:
        raise LoopfitError(f"lora.rank {cfg.rank} is above the smallest targeted matrix side ({smallest}): choose a "
                           f"rank in [1, {smallest}]")


def _add_delta(module, args, output):
    return output + F.linear(F.linear(args[0], module.lora_A), module.lora_B) * module.lora_scale


def apply(model, cfg):
    """Give the targeted core linear layers LoRA factors; returns how many layers."""
    found = targets(model, cfg.targets)
    for module in found.values():
        w = module.weight
        module.lora_A = torch.nn.Parameter(torch.empty(cfg.rank, w.shape[1], dtype=w.dtype, device=w.device))
        torch.nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))
        module.lora_B = torch.nn.Parameter(torch.zeros(w.shape[0], cfg.rank, dtype=w.dtype, device=w.device))
        module.lora_scale = cfg.alpha / cfg.rank
        module.register_forward_hook(_add_delta)
    return len(found)


def relax(model, cfg, loops):
    """Give the core's targeted linear layers a delta per loop (`loops` of them); A Kaiming-uniform and B zero
    (`lora.init: zero`) or the truncated SVD of the base layer each loop stands for (`svd`)."""
    from ..model.modeling import relax_core

    spec = {"rank": cfg.rank, "alpha": cfg.alpha, "loops": loops, "targets": list(cfg.targets)}
    inner = model.model
    model.config.loop_lora = spec
    inner.loop_linears = relax_core(inner.core, spec)
    for linear in inner.loop_linears:
        for t in range(loops):
            torch.nn.init.kaiming_uniform_(linear.loop_lora_A.data[t], a=math.sqrt(5))
    if cfg.init == "svd":
        svd_init(model, spec)
    return len(inner.loop_linears)


def stands_for(source_layers, loops):
    """{(loop t, core position j): base layer index} of the layers between the prelude and the coda."""
    prelude, core, coda = source_layers["prelude"], source_layers["core"], source_layers["coda"]
    first = prelude[-1] + 1 if prelude else 0
    end = coda[0] if coda else source_layers["num_base_layers"]
    middle = list(range(first, end))
    return {(t, j): middle[t * len(core) + j] for t in range(loops) for j in range(len(core))
            if t * len(core) + j < len(middle)}


@torch.no_grad()
def svd_init(model, spec):
    """Loop t's delta of each targeted core linear := the rank-r truncated SVD of W_base[layer] - W_core."""
    from .distill import load_teacher, teacher_source

    source = model.config.source_layers
    base = load_teacher(teacher_source(model.config.source_model, None)).state_dict()
    prefix = "model.language_model.layers." if any(k.startswith("model.language_model.") for k in base) \
        else "model.layers."
    scale = spec["alpha"] / spec["rank"]
    for (t, j), layer in stands_for(source, spec["loops"]).items():
        for name, module in model.model.core[j].named_modules():
            if not hasattr(module, "loop_lora_A"):
                continue
            residual = (base[f"{prefix}{layer}.{name}.weight"].float() - module.weight.float()) / scale
            u, sv, vh = torch.linalg.svd(residual, full_matrices=False)
            root = sv[: spec["rank"]].sqrt()
            module.loop_lora_B[t] = (u[:, : spec["rank"]] * root).to(module.loop_lora_B.dtype)
            module.loop_lora_A[t] = (root[:, None] * vh[: spec["rank"]]).to(module.loop_lora_A.dtype)


def merged_state_dict(state_dict, cfg):
    """The state dict with every W + (alpha / rank) B A folded in and the factors dropped."""
    out = {k: v for k, v in state_dict.items() if ".lora_" not in k}
    scale = cfg.alpha / cfg.rank
    for key in state_dict:
        if key.endswith(".lora_A"):
            prefix = key[: -len("lora_A")]
            a, b = state_dict[key].float(), state_dict[prefix + "lora_B"].float()
            weight = out[prefix + "weight"]
            out[prefix + "weight"] = (weight.float() + scale * (b @ a)).to(weight.dtype)
    return out
