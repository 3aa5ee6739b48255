"""`loopfit generate` through the CLI: loops per token, adaptive exit report, plain models, bad input."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loopfit.cli import main
from loopfit.model import LoopfitConfig, LoopfitForCausalLM


@pytest.fixture(scope="module")
def folders(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    vocab = len(smollm2_tokenizer)
    LoopfitForCausalLM(LoopfitConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                     num_prelude_layers=1, num_core_layers=1, num_coda_layers=1,
                                     adapter_init="mean")).save_pretrained(root / "loop")
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4)).save_pretrained(root / "plain")
    for d in ("loop", "plain"):
        smollm2_tokenizer.save_pretrained(root / d)
    return root


def test_generate_reports_mean_loops_under_adaptive_exit(folders, capsys):
    rc = main(["generate", str(folders / "loop"), "--prompt", "Hello there", "--prompt", "Two", "--loops", "5",
               "--exit", "kl:1e9", "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.startswith("Hello there") and "Two" in out
    assert "mean loops per token 2.00 of at most 5 (kl:1e9)" in err


def test_generate_plain_model_and_prompt_file(folders, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n")
    assert main(["generate", str(folders / "plain"), "--prompt-file", str(prompts), "--max-new-tokens", "3"]) == 0
    out, _ = capsys.readouterr()
    assert "first prompt" in out and "second prompt" in out
    assert main(["generate", str(folders / "plain"), "--prompt", "x", "--exit", "kl:1e-3"]) == 2
    assert "need a loopfit (recurrent) model" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [(["--exit", "nonsense:1"], "unknown exit rule"),
                                           (["--loops", "0"], "--loops must be >= 1")])
def test_generate_bad_input(folders, capsys, args, message):
    assert main(["generate", str(folders / "loop"), "--prompt", "x", *args]) == 2
    assert message in capsys.readouterr().err
