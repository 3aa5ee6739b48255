"""Distillation from a teacher (recipe section `distill`): loss = alpha CE + (1 - alpha) T^2 KL(teacher || student).

The teacher is `base` (the model `loopfit convert` made model.init_from from, recorded in its config as
`source_model`), or any model folder, GGUF file or offline short name with the student's tokenizer. It runs in
eval mode under no_grad (bf16 autocast on a GPU), on every rank beside the student (sharded per block under
FSDP2); nothing of it is checkpointed: a resumed run loads it again.

Neither model's full logits are materialised: both give their final hidden states, and `linear_distill` runs
the two heads over chunks of rows, computing each chunk's loss and its gradients for the student's hidden
states and head in the forward (as loopfit's `linear_cross_entropy` does), so at most one chunk of each model's
fp32 logits exists at a time. The held-out loss stays plain cross-entropy.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from .. import LoopfitError
from ..loading import OFFLINE_MODELS, from_pretrained, is_recurrent, offline_folder, resolve_source
from ..model.losses import backprop_head

# ------------------------------------------------------------------------------------------------ the loss


def linear_distill(hidden, weight, teacher_hidden, teacher_weight, labels, alpha, temperature, num_items_in_batch,
                   softcap=None, teacher_softcap=None, chunk_elements=2**24):
    """(loss, ce, kl), each summed over the predicted tokens (labels != -100, shifted here) and divided by
    `num_items_in_batch` (default: their count). hidden [b, s, h] and weight [V, h] are the student's final hidden
    states and head; teacher_hidden and teacher_weight the teacher's (no gradient). loss = alpha * ce +
    (1 - alpha) * T^2 * kl, where kl = KL(softmax(teacher / T) || softmax(student / T)) and ce is the student's
    next-token cross-entropy at T = 1; only `loss` carries gradients."""
    hidden = hidden[:, :-1].flatten(0, 1)
    teacher_hidden = teacher_hidden[:, :-1].flatten(0, 1).detach()
    labels = labels[:, 1:].flatten().to(hidden.device)
    chunk = max(1, min(hidden.shape[0], chunk_elements // weight.shape[0]))
    grads = torch.is_grad_enabled()
    total, ce, kl = _LinearDistill.apply(hidden, weight, teacher_hidden, teacher_weight.detach(), labels, chunk,
                                         float(alpha), float(temperature), softcap, teacher_softcap, grads)
    count = (labels != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return total / count, ce / count, kl / count


def _capped(logits, softcap):
    if not softcap:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return capped * softcap, capped


class _LinearDistill(torch.autograd.Function):
    """Summed alpha * CE + (1 - alpha) * T^2 * KL over rows, chunk by chunk; also the summed CE and KL (no grad)."""

    @staticmethod
    def forward(ctx, hidden, weight, t_hidden, t_weight, labels, chunk, alpha, temp, softcap, t_softcap, grads):
        need_hidden, need_weight = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        fp = torch.promote_types(hidden.dtype, torch.float32)  # logits in fp32 (fp64 stays fp64, for tests)
        grad_weight = torch.zeros_like(weight, dtype=fp) if need_weight else None
        ce_total = torch.zeros((), dtype=fp, device=hidden.device)
        kl_total = torch.zeros((), dtype=fp, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            valid = (y != -100)[:, None]
            target = y.clamp(min=0)[:, None]
            logits, capped = _capped(F.linear(h, weight).to(fp), softcap)
            t_logp = torch.log_softmax(_capped(F.linear(t_hidden[start:start + chunk], t_weight).to(fp),
                                               t_softcap)[0] / temp, dim=-1)
            t_p = t_logp.exp()
            logq = torch.log_softmax(logits / temp, dim=-1)
            kl_total += t_logp.sub_(logq).mul_(t_p).mul_(valid).sum()  # sum p (log p - log q); t_logp is spent
            del t_logp
            logp = torch.log_softmax(logits, dim=-1)
            ce_total -= (logp.gather(1, target) * valid).sum()
            if not (need_hidden or need_weight):
                continue
            # d loss / d logits = alpha (softmax(z) - onehot) + (1 - alpha) T (softmax(z / T) - softmax(t / T))
            grad = logp.exp_().mul_(alpha)
            grad.scatter_add_(1, target, torch.full_like(target, -alpha, dtype=grad.dtype))
            grad.add_(logq.exp_().sub_(t_p), alpha=(1 - alpha) * temp)
            del logq, t_p
            grad.mul_(valid)
            backprop_head(grad, h, weight, capped, grad_hidden, grad_weight, start)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce_total, kl_total)
        total = alpha * ce_total + (1 - alpha) * temp**2 * kl_total
        return total, ce_total, kl_total

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kl):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype),
                None, None, None, None, None, None, None, None, None)


# ------------------------------------------------------------------------------------------------ final hidden states


def final_norm(model):
    """The module whose output is the final hidden state (what the head reads): `model.norm` of the inner model,
    in loopfit models and the transformers families loopfit reads."""
    inner = getattr(model, "module", model)
    base = getattr(inner, inner.base_model_prefix, None)
    norm = getattr(base, "norm", None)
    if norm is None:
        raise LoopfitError(f"cannot find the final norm of {type(inner).__name__} (model.norm): distillation reads "
                           "the final hidden states there; use a loopfit or transformers Llama-family model")
    return norm


def run_to_hidden(model, norm, **kwargs):
    """(final hidden states [b, s, h], outputs) of `model(**kwargs)`, read at `norm` by a hook, with the head applied
    to the last position only: the full logits are never computed. The caller adds 0 x the outputs' logits to its
    loss, so the wrapper's (DDP, FSDP2) backward hooks, which watch the forward's outputs, fire."""
    captured = []
    handle = norm.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        out = model(use_cache=False, logits_to_keep=1, **kwargs)
    finally:
        handle.remove()
    return captured[-1], out


def softcap_of(model):
    config = getattr(model, "module", model).config
    return getattr(config.get_text_config(), "final_logit_softcapping", None)


# ------------------------------------------------------------------------------------------------ the teacher


def teacher_source(teacher, student_folder):
    """Where the teacher comes from: an offline short name, or a folder or GGUF path (checked to exist)."""
    if teacher == "base":
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(student_folder)
        source = getattr(cfg, "source_model", None)
        if not is_recurrent(cfg):
            raise LoopfitError(f"distill.teacher base: model.init_from {student_folder} is a plain model, not a "
                               "converted one, so it has no base model: name the teacher's folder or short name")
        if not source:
            raise LoopfitError(f"distill.teacher base: {student_folder} does not record the model it was converted "
                               "from (converted by an earlier loopfit): name the teacher, e.g. "
                               f"--distill.teacher={next(iter(OFFLINE_MODELS))} or a folder")
        teacher = source
    if teacher in OFFLINE_MODELS:
        return teacher
    if not Path(teacher).exists():
        raise LoopfitError(f"distill.teacher {teacher} does not exist: give 'base', a model folder, a GGUF file or one "
                           f"of {', '.join(OFFLINE_MODELS)}")
    resolve_source(teacher)  # a folder without config.json, or an unreadable GGUF, is refused here
    return teacher


def _vocab_size(source):
    from transformers import AutoConfig

    kind, path = resolve_source(source)
    if kind == "folder":
        cfg = AutoConfig.from_pretrained(path)
    else:
        cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    return cfg.get_text_config().vocab_size


def _fingerprint(source):
    from ..data.shards import tokenizer_fingerprint

    kind, path = resolve_source(source)
    has_tokenizer = kind == "gguf" or any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    return tokenizer_fingerprint(str(path)) if has_tokenizer else None


def check_teacher(teacher, student_folder, student_vocab):
    """Refuse a teacher with another vocabulary size or tokenizer (before any model loads)."""
    vocab = _vocab_size(teacher)
    if vocab != student_vocab:
        raise LoopfitError(f"distill.teacher {teacher} has a vocabulary of {vocab} but the student's is "
                           f"{student_vocab}: a teacher must share the student's tokenizer; choose one of its family")
    theirs, ours = _fingerprint(teacher), _fingerprint(student_folder)
    if theirs and ours and theirs != ours:
        raise LoopfitError(f"distill.teacher {teacher} uses another tokenizer than {student_folder} (same vocabulary "
                           "size, different tokens): the KL compares distributions over the same tokens; choose a "
                           "teacher of the student's family")


def load_teacher(teacher):
    """The teacher model, fp32, eval mode, every parameter frozen."""
    folder = offline_folder(teacher) if teacher in OFFLINE_MODELS else teacher
    kind, path = resolve_source(folder)
    if kind == "gguf":
        from ..loading import load_base

        model, _ = load_base(path)
    else:
        model = from_pretrained(path, torch.float32, what="distill.teacher")
    model.eval().requires_grad_(False)
    return model


def forward_flops(tokens, counts, loops):
    """Forward FLOPs of the teacher over `tokens` tokens by the paper's count (2 x non-embedding parameters per
    token, the core's times its loops)."""
    if "plain" in counts:
        return 2 * counts["plain"] * tokens
    return 2 * tokens * (counts["prelude"] + loops * counts["core"] + counts["coda"])


class Teacher:
    """The teacher of a run: its final hidden states and head weight for a batch, and its FLOPs."""

    def __init__(self, model, name):
        from .flops import param_counts

        self.model, self.name = model, name
        self.recurrent = is_recurrent(model)
        self.norm = final_norm(model)
        self.softcap = softcap_of(model)
        self.counts = param_counts(model)
        self.loops = model.config.mean_recurrence if self.recurrent else 1

    @torch.no_grad()
    def hidden(self, ids, autocast):
        """(final hidden states, head weight) for input ids; the head weight is gathered under FSDP2."""
        with autocast:
            h, _ = run_to_hidden(self.model, self.norm, input_ids=ids)
        return h, self.model.get_output_embeddings().weight

    def release(self):
        """Free the gathered weights of a sharded teacher until its next forward."""
        if hasattr(self.model, "reshard"):
            self.model.reshard()

    def flops(self, tokens):
        return forward_flops(tokens, self.counts, self.loops)
