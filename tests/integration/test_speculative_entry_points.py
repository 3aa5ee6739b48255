"""Self-speculative decoding through its public entry points (`loopfit generate`, `loopfit eval`, lm-eval's
`--model_args`, the quickstart) and on a real converted SmolLM2: the same tokens as plain decoding, and bad
settings refused in one line."""

import json

import pytest
import tiny_models
import torch

from loopfit.convert import build_loopfit, plan_layers
from loopfit.eval import accuracy
from loopfit.eval.generation import generate, generate_sweep
from loopfit.eval.prompts import gsm8k_prompt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.real
def test_real_smollm2_speculative_equals_plain_greedy():
    """Converted SmolLM2-135M, every layer kept (prelude 0-23, core 24-25, coda 26-29, `mean` adapter, `embed`
    state: r = 1 is SmolLM2), r = 8, d = 2, k = 4, two prompts of different lengths left padded, 24 new tokens."""
    from loopfit.convert import LayerPlan
    from loopfit.loading import load_base

    base, tok = load_base("smollm2-135m")
    model = build_loopfit(base, LayerPlan(list(range(24)), [24, 25], [26, 27, 28, 29], 30), adapter_init="mean",
                          state_init="embed", recurrence=8).eval()
    del base
    batch = tok(["The capital of France is", "Q: Tom has 3 apples and buys 5 more. How many apples?\nA:"],
                return_tensors="pt", padding=True, padding_side="left")
    kw = dict(num_steps=8, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    plain = model.generate(**batch, **kw)
    cache = model.new_cache()
    assert torch.equal(model.generate(**batch, draft_steps=2, draft_tokens=4, cache=cache, **kw), plain)
    shallow = model.generate(**batch, **{**kw, "num_steps": 2})
    n = batch.input_ids.shape[1]
    assert (shallow[:, n:] != plain[:, n:]).any() and len(cache.drafts) < 23


@pytest.mark.real
def test_real_smollm2_eval_sweep_equals_generation_per_r():
    """Converted SmolLM2-135M in the quickstart's shape (5,10,5), `mean` adapter: the eval's GSM8K sweep over
    r = 1, 2, 4 gives each r's own greedy completions (3 test questions, 1-shot prompt, 12 new tokens)."""
    from loopfit.eval import items
    from loopfit.loading import load_base

    base, tok = load_base("smollm2-135m")
    model = build_loopfit(base, plan_layers(30, (5, 10, 5)), adapter_init="mean", state_init="embed",
                          recurrence=4).eval()
    del base
    tok.pad_token = tok.pad_token or tok.eos_token
    prompts = [gsm8k_prompt(it["question"], "1shot") for it in items.subset(items.gsm8k_test(), 3, seed=1234)]
    stop = accuracy.TASKS["gsm8k_1shot"].stop
    swept = generate_sweep(model, tok, prompts, [1, 2, 4], max_new_tokens=12, stop=stop)
    per_r = {r: generate(model, tok, prompts, num_steps=r, max_new_tokens=12, stop=stop) for r in (1, 2, 4)}
    assert swept == per_r
    assert per_r[1] != per_r[4]


# ---------------------------------------------------------------------------------------------------------------
# Entry points: `loopfit generate`, `loopfit eval`, lm-eval's `--model_args`, the quickstart


@pytest.fixture(scope="module")
def folders(smollm2_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    tok = smollm2_tokenizer
    for name, overrides in (("loop", {}), ("ring", {"cache_policy": "ring"})):
        torch.manual_seed(0)
        model = tiny_models.recurrent(len(tok), eos_token_id=tok.eos_token_id, adapter_init="mean",
                                      state_init="zeros", mean_recurrence=6, **overrides)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    torch.manual_seed(0)
    tiny_models.llama(len(tok), eos_token_id=tok.eos_token_id).save_pretrained(root / "plain")
    tok.save_pretrained(root / "plain")
    return root


def core_lengths(model):
    """Sequence lengths the core sees (a speculative verification pass feeds it the drafted tokens at once)."""
    lengths = []
    return lengths, model.model.core[0].register_forward_hook(lambda m, args, out: lengths.append(out.shape[1]))


def test_cli_generate_with_draft_loops_prints_the_plain_output(folders, capsys):
    from loopfit.cli import main

    base = ["generate", str(folders / "loop"), "--prompt", "Hello there", "--prompt", "Two", "--loops", "6",
            "--max-new-tokens", "12"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--draft-loops", "2", "--draft-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert out == plain and "drafted at 2 loops, 3 tokens a round" in err


@pytest.mark.parametrize("folder, args, message", [
    ("loop", ["--draft-loops", "6"], "--draft-loops 6 must be below --loops 6"),
    ("loop", ["--draft-loops", "2", "--draft-tokens", "0"], "must be >= 1"),
    ("loop", ["--draft-loops", "2", "--exit", "kl:1e-3"], "does not combine with --exit"),
    ("plain", ["--draft-loops", "2"], "needs a loopfit (recurrent) model"),
    ("ring", ["--draft-loops", "2"], "needs the exact cache"),
])
def test_cli_generate_refuses_bad_draft_settings(folders, capsys, folder, args, message):
    from loopfit.cli import main

    assert main(["generate", str(folders / folder), "--prompt", "x", "--loops", "6", *args]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]  # (the rest is the loading progress bar)
    assert "Traceback" not in err and len(errors) == 1 and message in errors[0], err


def test_eval_draft_loops_gives_the_same_completions_and_speculates_only_above_d(folders, tmp_path):
    from loopfit.eval.run import evaluate
    from loopfit.loading import load

    model, tok = load(folders / "loop")
    kw = dict(loops=[1, 2, 6], tasks=["gsm8k_1shot"], limit=2, max_new_tokens=10, batch_size=2, plot=False)
    plain = evaluate((model, tok), **kw)
    lengths, handle = core_lengths(model)
    try:
        fast = evaluate((model, tok), draft_loops=2, draft_tokens=4, out=tmp_path, **kw)
    finally:
        handle.remove()
    assert fast["rows"] == plain["rows"]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {s["loops"] for s in samples} == {1, 2, 6}
    assert any(1 < n <= 4 for n in lengths)  # verification passes of drafted tokens ran (only r = 6 > d)


def test_cli_eval_refuses_draft_loops_on_a_plain_model_and_at_or_above_every_r(folders, tmp_path, capsys):
    from loopfit.cli import main

    for folder, extra, message in (("plain", ["--draft-loops", "1"], "needs a loopfit (recurrent) model"),
                                   ("loop", ["--draft-loops", "4", "--loops", "2,4"], "must be below --loops 4")):
        assert main(["eval", str(folders / folder), "--tasks", "gsm8k_1shot", "--limit", "1",
                     "--out", str(tmp_path / folder), *extra]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / folder).exists()


def test_lm_eval_model_args_draft_steps(folders):
    import lm_eval

    from loopfit import LoopfitError
    from loopfit.eval.harness import LoopfitLM, task_manager

    def responses(args):
        lm = LoopfitLM.create_from_arg_string(args, {"batch_size": 2})
        out = lm_eval.simple_evaluate(model=lm, tasks=["gsm8k_loopfit_1shot"], limit=2, task_manager=task_manager(),
                                      gen_kwargs="max_gen_toks=8", log_samples=True)
        return lm, [s["resps"] for s in out["samples"]["gsm8k_loopfit_1shot"]]

    _, plain = responses(f"pretrained={folders / 'loop'},num_steps=6")
    lm, fast = responses(f"pretrained={folders / 'loop'},num_steps=6,draft_steps=2,draft_tokens=3")
    assert fast == plain and lm.draft_steps == 2 and lm.draft_tokens == 3
    with pytest.raises(LoopfitError, match="needs a loopfit"):
        LoopfitLM.create_from_arg_string(f"pretrained={folders / 'plain'},draft_steps=2", {})


def test_quickstart_refuses_a_negative_draft_loops(tmp_path, capsys):
    from loopfit.cli import main

    assert main(["quickstart", "--draft-loops", "-1", "--out", str(tmp_path / "qs")]) == 2
    assert "--draft-loops must be >= 0" in capsys.readouterr().err and not (tmp_path / "qs").exists()
