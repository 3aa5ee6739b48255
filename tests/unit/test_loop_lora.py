"""Per-loop LoRA (relaxed recursion) in the model package: each loop its own delta, saved and loaded with the
folder, decoding exactly (cached == uncached, speculative == greedy); and its truncated-SVD initialisation."""

import tiny_models
import torch

from loopfit import LoopfitForCausalLM
from loopfit.train import lora
from loopfit.train.config import LoraConfig

SPEC = {"rank": 4, "alpha": 8.0, "loops": 3, "targets": ["q_proj", "v_proj", "down_proj"]}


def relaxed(seed=0):
    torch.manual_seed(seed)
    model = tiny_models.recurrent(loop_lora=SPEC, mean_recurrence=4).eval()
    with torch.no_grad():  # deltas that differ per loop (a fresh model's are zero)
        for linear in model.model.loop_linears:
            linear.loop_lora_A.normal_(std=0.2)
            linear.loop_lora_B.normal_(std=0.2)
    return model


def test_each_loop_has_its_own_delta_and_later_loops_run_the_shared_weight():
    model = relaxed()
    assert len(model.model.loop_linears) == 2 * 3  # 2 core blocks x 3 targets
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        out = model(ids, num_steps=4).logits
        shared = tiny_models.recurrent(mean_recurrence=4).eval()
        shared.load_state_dict({k: v for k, v in model.state_dict().items() if "loop_lora" not in k})
        assert not torch.allclose(out, shared(ids, num_steps=4).logits, atol=1e-3)
        # with loop 1's delta alone zeroed, the output changes: loop 1 reads its own delta
        for linear in model.model.loop_linears:
            linear.loop_lora_B[1] = 0
        assert not torch.allclose(out, model(ids, num_steps=4).logits, atol=1e-4)
        # with every delta zeroed it is the shared model
        for linear in model.model.loop_linears:
            linear.loop_lora_B.zero_()
        torch.testing.assert_close(model(ids, num_steps=4).logits, shared(ids, num_steps=4).logits)


def test_relaxed_folder_saves_loads_and_decodes_exactly(tmp_path):
    model = relaxed()
    model.save_pretrained(tmp_path)
    loaded = LoopfitForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.loop_lora == SPEC
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, num_steps=5).logits, model(ids, num_steps=5).logits, atol=0, rtol=0)
    kw = dict(num_steps=4, max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = loaded.generate(ids, use_cache=True, **kw)
    assert torch.equal(cached, loaded.generate(ids, use_cache=False, **kw))
    for d in (1, 2):  # drafts at d loops run loops 0..d-1's deltas; verification resumes at loop d
        assert torch.equal(loaded.generate(ids, draft_steps=d, draft_tokens=3, **kw), cached), d


def test_svd_init_at_full_rank_makes_each_loop_the_base_layer_it_stands_for(tmp_path):
    """A 6-layer Llama converted (1,2,1): layers 1-2 dropped, core 3-4; loop 0 stands for layers 1-2, loop 1 for
    3-4 (the core itself: delta 0), loop 2 for none (zero)."""
    from loopfit.convert import convert

    torch.manual_seed(0)
    base = tiny_models.llama(num_hidden_layers=6)
    base.save_pretrained(tmp_path / "base")
    tiny_models.word_tokenizer().save_pretrained(tmp_path / "base")
    model, _ = convert(str(tmp_path / "base"), tmp_path / "conv", layers=(1, 2, 1), parity=False,
                       log=lambda line: None)
    assert lora.stands_for(model.config.source_layers, 3) == {(0, 0): 1, (0, 1): 2, (1, 0): 3, (1, 1): 4}
    # rank 64: the smaller side of each of these matrices, so the truncated SVD is exact
    cfg = LoraConfig(rank=64, alpha=32.0, targets=["q_proj", "o_proj", "down_proj"], per_loop=True, init="svd")
    lora.relax(model, cfg, loops=3)
    layers = base.model.layers
    for j, block in enumerate(model.model.core):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
            linear = block.get_submodule(name)
            effective = [linear.weight + linear.scale * linear.loop_lora_B[t] @ linear.loop_lora_A[t]
                         for t in range(3)]
            torch.testing.assert_close(effective[0], layers[1 + j].get_submodule(name).weight, atol=1e-5, rtol=0)
            torch.testing.assert_close(effective[1], linear.weight, atol=1e-6, rtol=0)
            assert linear.loop_lora_B[2].abs().max() == 0


def test_a_relaxed_folder_is_refused_by_the_vllm_check_in_one_line(tmp_path):
    """loopfit's vLLM model has one weight per core layer; the check vLLM runs before any engine starts says so."""
    from loopfit.serve.plugin import serving_problem

    relaxed().save_pretrained(tmp_path)
    problem = serving_problem(LoopfitForCausalLM.config_class.from_pretrained(tmp_path), tmp_path)
    assert "a low-rank delta per loop" in problem and "loopfit generate" in problem and "\n" not in problem
    assert serving_problem(tiny_models.recurrent().config) is None
