"""Muon: loopfit's batched subclass builds on private torch API (torch.optim._muon); on a torch without it the
trainer falls back to the public torch.optim.Muon. Run on every allowed torch (`make test-latest/test-oldest`)."""

import pytest
import tiny_models
import torch

from loopfit.train import optim
from loopfit.train.config import OptimConfig


def _step(opt_class, seed=0):
    torch.manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(48, 32))
    opt = opt_class([weight], lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="original")
    start = weight.detach().clone()
    for _ in range(2):
        weight.grad = torch.randn_like(weight)
        opt.step()
    return weight.detach() - start


def test_this_torch_has_the_private_api_and_the_batched_muon_matches_torchs():
    assert optim.batched_muon_available(), "torch.optim._muon._adjust_lr or Muon._init_group moved: see optim.py"
    ours, reference = _step(optim.Muon), _step(torch.optim.Muon)
    # torch orthogonalises in bf16, loopfit in fp32 on CPU: the same update up to bf16 rounding
    cosine = torch.nn.functional.cosine_similarity(ours.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.999 and float(ours.norm()) == pytest.approx(float(reference.norm()), rel=0.02)


def test_without_the_private_api_the_public_muon_trains(monkeypatch):
    monkeypatch.setattr(optim, "_adjust_lr", None)
    assert not optim.batched_muon_available()
    torch.manual_seed(0)
    model = tiny_models.recurrent()
    opts = optim.build_optimizers(model, OptimConfig())
    assert type(opts[0]) is torch.optim.Muon
    ids = torch.randint(0, 256, (2, 16))
    before = model.model.core[0].mlp.up_proj.weight.detach().clone()
    model(input_ids=ids, labels=ids, num_steps=2).loss.backward()
    for opt in opts:
        opt.step()
    assert not torch.equal(before, model.model.core[0].mlp.up_proj.weight)
