"""The chunked distillation loss against full-logit autograd, and the trainable-set rules, on tiny tensors."""

import pytest
import tiny_models
import torch
import torch.nn.functional as F

from loopfit import LoopfitError
from loopfit.train import trainable
from loopfit.train.distill import linear_distill


def full_logits_reference(hidden, weight, t_hidden, t_weight, labels, alpha, temp, softcap, t_softcap):
    """The same loss from the full logits, differentiated by autograd."""
    logits, t_logits = hidden[:, :-1] @ weight.T, t_hidden[:, :-1] @ t_weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if t_softcap:
        t_logits = torch.tanh(t_logits / t_softcap) * t_softcap
    y = labels[:, 1:].flatten()
    valid = y != -100
    logits, t_logits = logits.flatten(0, 1)[valid], t_logits.flatten(0, 1)[valid]
    ce = F.cross_entropy(logits, y[valid], reduction="sum")
    kl = F.kl_div(F.log_softmax(logits / temp, -1), F.log_softmax(t_logits / temp, -1), log_target=True,
                  reduction="sum")
    n = valid.sum()
    return (alpha * ce + (1 - alpha) * temp**2 * kl) / n, ce / n, kl / n


@pytest.mark.parametrize("alpha,temp,softcap", [(0.0, 1.0, None), (0.3, 2.0, None), (1.0, 1.0, None),
                                                (0.5, 1.5, 30.0)])
def test_chunked_distillation_matches_full_logit_autograd(alpha, temp, softcap):
    torch.manual_seed(0)
    b, s, h, vocab = 3, 7, 16, 50
    hidden = torch.randn(b, s, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, h, dtype=torch.float64, requires_grad=True)
    t_hidden, t_weight = torch.randn(b, s, h, dtype=torch.float64), torch.randn(vocab, h, dtype=torch.float64)
    labels = torch.randint(0, vocab, (b, s))
    labels[0, 3:5] = -100  # ignored positions count in neither term
    ref = full_logits_reference(hidden, weight, t_hidden, t_weight, labels, alpha, temp, softcap, softcap)
    ref_grads = torch.autograd.grad(ref[0], (hidden, weight))
    # 5 rows a chunk: 18 rows in 4 chunks, the last one short
    got = linear_distill(hidden, weight, t_hidden, t_weight, labels, alpha, temp, None, softcap, softcap,
                         chunk_elements=5 * vocab)
    got_grads = torch.autograd.grad(got[0], (hidden, weight))
    for a, r in zip(got, ref):
        assert a.item() == pytest.approx(r.item(), abs=1e-10)
    for a, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-9)


def test_chunked_distillation_gradients_in_float32_within_1e_5():
    torch.manual_seed(1)
    b, s, h, vocab = 2, 33, 32, 300
    hidden = torch.randn(b, s, h, requires_grad=True)
    weight = (torch.randn(vocab, h) * 0.2).requires_grad_()
    t_hidden, t_weight = torch.randn(b, s, h), torch.randn(vocab, h) * 0.2
    labels = torch.randint(0, vocab, (b, s))
    ref = full_logits_reference(hidden, weight, t_hidden, t_weight, labels, 0.25, 2.0, None, None)
    ref_grads = torch.autograd.grad(ref[0], (hidden, weight))
    got = linear_distill(hidden, weight, t_hidden, t_weight, labels, 0.25, 2.0, None, chunk_elements=7 * vocab)
    got_grads = torch.autograd.grad(got[0], (hidden, weight))
    assert got[0].item() == pytest.approx(ref[0].item(), abs=1e-5)
    for a, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=0)


def test_identical_teacher_and_student_give_zero_kl_and_no_kl_gradient():
    torch.manual_seed(2)
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    labels = torch.randint(0, 40, (2, 9))
    loss, ce, kl = linear_distill(hidden, weight, hidden.detach(), weight.detach(), labels, 0.0, 3.0, None)
    loss.backward()
    assert abs(kl.item()) < 1e-6 and ce.item() > 1
    assert hidden.grad.abs().max() < 1e-6 and weight.grad.abs().max() < 1e-6


def test_trainable_phases_parse_and_refuse_clearly():
    assert trainable.parse_phases("all", 50) == [("all", 50)]
    assert trainable.parse_phases("adapter:0.1,all", 50) == [("adapter", 5), ("all", 50)]
    assert trainable.parse_phases("adapter:10,core:0.5,all", 50) == [("adapter", 10), ("core", 25), ("all", 50)]
    assert [trainable.phase_at([("adapter", 5), ("all", 50)], s) for s in (0, 4, 5, 49)] == \
        ["adapter", "adapter", "all", "all"]
    for bad, says in [("head", "choose among"), ("adapter,all", "needs an end"), ("adapter:0.5", "last phase"),
                      ("adapter:0.6,core:0.5,all", "must increase"), ("", "choose one of")]:
        with pytest.raises(LoopfitError, match=says):
            trainable.parse_phases(bad, 50)


def test_trainable_sets_select_the_parts_of_a_recurrent_model():
    model = tiny_models.recurrent()
    names = {n for n, _ in model.named_parameters()}
    adapter, core = trainable.selected(model, "adapter"), trainable.selected(model, "core")
    assert adapter == {"model.adapter.weight"}
    assert core and all(n.startswith("model.core.") for n in core)
    assert trainable.selected(model, "adapter+core") == adapter | core
    assert trainable.selected(model, "all") == names
    trainable.apply(model, "adapter")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapter
    with pytest.raises(LoopfitError, match="selects no parameter"):
        trainable.check(model, [("lora", 1)], recurrent=True)
    with pytest.raises(LoopfitError, match="needs a recurrent loopfit model"):
        trainable.check(tiny_models.llama(), [("core", 1)], recurrent=False)
