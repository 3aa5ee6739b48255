"""Training losses: next-token cross-entropy, and the same without materialising the full logits."""

import torch
import torch.nn.functional as F


def causal_lm_loss(logits, labels, num_items_in_batch=None):
    """Next-token cross-entropy in fp32; labels are shifted here, -100 is ignored."""
    logits = logits[:, :-1].flatten(0, 1).float()
    labels = labels[:, 1:].flatten().to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels, ignore_index=-100)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / num_items_in_batch


def linear_cross_entropy(hidden, weight, labels, num_items_in_batch=None, softcap=None, chunk_elements=2**25):
    """`causal_lm_loss(hidden @ weight.T, labels)` without the full logits: rows go through the head in chunks of
    about `chunk_elements` logits, and each chunk's gradients (for hidden and the head weight) are computed in the
    forward, so at most one chunk of fp32 logits exists at a time and the backward only scales them."""
    hidden = hidden[:, :-1].flatten(0, 1)
    labels = labels[:, 1:].flatten().to(hidden.device)
    chunk = max(1, min(hidden.shape[0], chunk_elements // weight.shape[0]))
    grads = torch.is_grad_enabled()  # under no_grad (evaluation) only the loss: no gradient work in the forward
    total = _LinearCrossEntropy.apply(hidden, weight, labels, chunk, softcap, grads)
    count = (labels != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return total / count


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (optionally soft-capped) logits hidden @ weight.T, chunk by chunk (-100 ignored)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, softcap, grads=True):
        need_hidden, need_weight = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            logits = F.linear(h, weight).float()
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            valid = y != -100
            target = y.clamp(min=0)[:, None]
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, target)[:, 0]) * valid).sum()
            if not (need_hidden or need_weight):
                continue
            grad = torch.exp(logits - lse[:, None])  # d loss / d logits = softmax - one_hot, for valid rows
            grad.scatter_add_(1, target, -torch.ones_like(target, dtype=grad.dtype))
            grad *= valid[:, None]
            backprop_head(grad, h, weight, capped if softcap else None, grad_hidden, grad_weight, start)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype),
                None, None, None, None)


def backprop_head(grad, h, weight, capped, grad_hidden, grad_weight, start):
    """Carry one chunk's d loss / d logits (rows start.. of the batch) back through the soft-cap (`capped`: the
    tanh it applied, or None) and the head, into grad_hidden's rows and grad_weight (each unless None)."""
    if capped is not None:
        grad *= 1 - capped.square()
    if not torch.is_autocast_enabled(h.device.type):  # under autocast, matmuls take its dtype as in autograd
        grad = grad.to(weight.dtype)
    if grad_hidden is not None:
        grad_hidden[start:start + h.shape[0]] = grad @ weight
    if grad_weight is not None:
        grad_weight += grad.T @ h.to(grad.dtype)
