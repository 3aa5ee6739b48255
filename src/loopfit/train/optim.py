"""Optimisers: Muon for hidden 2-D matrices (the adapter included), AdamW for embeddings, head and norms.

`name: muon` gives two optimizers, each with its own base lr (docs/papers.md §2: Muon lr 1e-3, AdamW lr 5e-5,
betas 0.9/0.95, weight decay 1e-4); `name: adamw` gives one AdamW over everything at `adamw_lr`.
Each param group remembers its base lr as `base_lr`; the schedule multiplies it every step.
"""

import torch
from torch.optim import _muon


def split_params(model):
    """(hidden matrices for Muon, everything else for AdamW), each a list of (name, param) with grad."""
    special = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            special |= {id(p) for p in module.parameters()}
    muon, adamw, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (muon if p.ndim == 2 and id(p) not in special else adamw).append((name, p))
    return muon, adamw


class Muon(torch.optim.Muon):
    """torch.optim.Muon with the Newton-Schulz orthogonalisation in fp32 on CPU, and batched over same-shaped
    matrices (the q, k, v, o, MLP matrices of every block): one bmm per iteration instead of one small matmul per
    matrix, which dominates a small-batch step on a CPU. torch runs it in bf16, right on GPUs (and what the paper
    used) but very slow on a CPU without fast bf16 matmul. Same math, state (momentum_buffer) and checkpoints as
    torch's."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            updates = []
            for grad, buf in zip(grads, bufs):
                buf.lerp_(grad, 1 - group["momentum"])
                updates.append(grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf)
            for idx in _same_shape_batches(updates):
                stacked = torch.stack([updates[i] for i in idx]) if len(idx) > 1 else updates[idx[0]]
                ortho = _newton_schulz(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"])
                for j, i in enumerate(idx):
                    param = params[i]
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                    param.add_(ortho[j] if len(idx) > 1 else ortho,
                               alpha=-_muon._adjust_lr(group["lr"], group["adjust_lr_fn"], param.shape))
        return loss


def _same_shaped_key(t, i):
    # sharded DTensors (FSDP2) go one by one: stacking them would gather every shard
    return (type(t), t.shape, t.dtype, t.device) if type(t) is torch.Tensor else ("alone", i)


def _same_shape_batches(tensors):
    """Index lists of tensors that can be orthogonalised together (same shape, dtype, device, plain tensors)."""
    batches = {}
    for i, t in enumerate(tensors):
        batches.setdefault(_same_shaped_key(t, i), []).append(i)
    return list(batches.values())


def _newton_schulz(grad, coefficients, steps, eps):
    """torch's quintic Newton-Schulz iteration, in bf16 on accelerators and fp32 on CPU, of one matrix [m, n] or a
    batch of them [b, m, n] (each normalised on its own)."""
    a, b, c = coefficients
    x = grad.to(torch.float32 if grad.device.type == "cpu" else torch.bfloat16)
    single = x.ndim == 2  # (one matrix may be a sharded DTensor: plain .T and .norm() only)
    tr = (lambda y: y.T) if single else (lambda y: y.mT)  # noqa: E731
    tall = grad.size(-2) > grad.size(-1)
    if tall:
        x = tr(x)
    x = x / (x.norm() if single else x.norm(dim=(-2, -1), keepdim=True)).clamp(min=eps)  # spectral norm <= 1
    mul_add = torch.addmm if single else torch.baddbmm
    for _ in range(steps):
        gram = x @ tr(x)
        x = mul_add(x, mul_add(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return tr(x) if tall else x


def build_optimizers(model, cfg):
    """A list of torch optimizers for `model` (already wrapped for DDP/FSDP if distributed) from the `optim` section."""
    inner = getattr(model, "module", model)  # DDP keeps the model in .module; FSDP2 modifies it in place
    muon, adamw = split_params(inner)
    betas = tuple(cfg.betas)
    if cfg.name == "adamw":
        params = [p for _, p in muon + adamw]
        return [torch.optim.AdamW(params, lr=cfg.adamw_lr, betas=betas, weight_decay=cfg.weight_decay, eps=cfg.eps)]
    if cfg.name != "muon":
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    opts = [
        Muon(
            [p for _, p in muon], lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
            adjust_lr_fn=cfg.muon_adjust_lr,
        )
    ]
    if adamw:
        opts.append(torch.optim.AdamW([p for _, p in adamw], lr=cfg.adamw_lr, betas=betas,
                                      weight_decay=cfg.weight_decay, eps=cfg.eps))
    return opts


def remember_base_lr(optimizers):
    for opt in optimizers:
        for group in opt.param_groups:
            group.setdefault("base_lr", group["lr"])


def set_lr(optimizers, factor):
    """Set every group's lr to base_lr * factor; returns the lrs in order (for logging)."""
    lrs = []
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
            lrs.append(group["lr"])
    return lrs
