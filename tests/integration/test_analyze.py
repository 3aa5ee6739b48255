"""`loopfit analyze` on tiny Llama models: an identity layer scores zero, the suggestion has the paper's shape."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loopfit import LoopfitError
from loopfit.analyze import layer_importance, suggest_layers
from loopfit.cli import main as cli

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(vocab, layers=6):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=2, num_hidden_layers=layers)).eval()


def test_identity_layer_has_zero_influence_and_zero_loss_increase():
    model = tiny_llama(256)
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: it is the identity
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, 256, (2, 32))
    result = layer_importance(model, ids, torch.ones_like(ids), progress=False)
    assert len(result["block_influence"]) == len(result["loss_increase"]) == 6
    assert abs(result["block_influence"][2]) < 1e-6 and abs(result["loss_increase"][2]) < 1e-5
    assert all(0 < bi <= 2 for i, bi in enumerate(result["block_influence"]) if i != 2)
    assert any(abs(d) > 1e-4 for i, d in enumerate(result["loss_increase"]) if i != 2)


def test_suggestion_drops_the_cheapest_block_and_keeps_the_paper_shape():
    cost = [5, 1, 0, 0, 0, 1, 1, 1, 1, 3]  # layers 2-4 cost nothing when removed
    s = suggest_layers(cost, (2, 3, 2))
    assert s["dropped"] == [2, 3, 4] and s["prelude"] == [0, 1] and s["core"] == [5, 6, 7] and s["coda"] == [8, 9]
    assert s["dropped_loss_increase"] == 0
    # core right before the coda, all layers accounted for
    assert s["prelude"] + s["dropped"] + s["core"] + s["coda"] == list(range(10))
    with pytest.raises(LoopfitError, match="needs 13 layers"):
        suggest_layers(cost, (4, 5, 4))


def test_cli_on_a_model_folder(smollm2_tokenizer, tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_llama(len(smollm2_tokenizer), layers=8).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    out = tmp_path / "an"
    assert cli(["analyze", str(folder), "--samples", "2", "--seq-len", "32", "--layers", "2,3,2",
                "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "importance.json").read_text())
    assert len(result["block_influence"]) == 8 and result["tokens"] == 64
    s = result["suggestion"]
    assert (len(s["core"]), len(s["dropped"])) == (3, 1)
    assert f"loopfit convert {folder} --layers" in printed and "| 7 |" in printed
    assert (out / "importance.png").read_bytes()[:4] == b"\x89PNG"
    assert cli(["analyze", str(folder), "--layers", "4,4"]) == 2
