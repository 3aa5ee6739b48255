"""Self-speculative decoding: greedy output equals r-loop greedy decoding token for token (every family, left
padding, EOS inside a draft, max_new_tokens mid-draft, stopping criteria, min_new_tokens), sampling keeps the
r-loop distribution, and bad settings are refused. Tiny models use the `mean` adapter so that their greedy tokens
change with r (a passthrough model ignores r and would accept every draft)."""


import json

import pytest
import tiny_models
import torch
from test_modeling import FAMILIES, VOCAB, padded_batch, random_base
from transformers import StoppingCriteria, StoppingCriteriaList

from loopfit.convert import build_loopfit, plan_layers

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = dict(do_sample=False, pad_token_id=0)


def tiny(**overrides):
    torch.manual_seed(0)
    return tiny_models.recurrent(VOCAB, adapter_init="mean", state_init="zeros", **overrides).eval()


def kept_and_rejected(cache):
    """Whether some round kept a drafted token and some round rejected one (both paths ran)."""
    return any(kept > 0 for _, _, kept in cache.drafts) and any(kept < q for q, _, kept in cache.drafts)


@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_greedy_equals_plain_greedy_in_every_family(family):
    """Batch of 3 with left padding (prompts of 14, 11 and 8 tokens), r = 6, d = 1 and 4, k = 3: the same tokens
    as transformers' generate at r = 6; the d-loop tokens differ from them, so the drafts are really checked."""
    model = build_loopfit(random_base(family), plan_layers(4, (1, 2, 1)), adapter_init="mean", state_init="zeros",
                          recurrence=6).eval()
    ids, mask = padded_batch()
    kw = dict(attention_mask=mask, num_steps=6, max_new_tokens=12, **GREEDY)
    plain = model.generate(ids, **kw)
    for d in (1, 4):
        assert torch.equal(model.generate(ids, draft_steps=d, draft_tokens=3, **kw), plain), (family, d)
    shallow = model.generate(ids, **{**kw, "num_steps": 1})
    assert (shallow[:, 14:] != plain[:, 14:]).float().mean() >= 0.2


def test_speculative_exercises_accept_and_reject_and_equals_recomputation():
    """r = 6, d = 5, k = 4, batch of 3 left padded, 20 tokens: equal to greedy decoding by full recomputation (no
    cache, no transformers) and to each row decoded alone; some rounds keep drafted tokens, some reject."""
    model = tiny()
    ids, mask = padded_batch(length=10)
    cache = model.new_cache()
    got = model.generate(ids, attention_mask=mask, num_steps=6, max_new_tokens=20, draft_steps=5, draft_tokens=4,
                         cache=cache, **GREEDY)
    seq, m = ids, mask
    with torch.no_grad():
        for _ in range(20):
            nxt = model(seq, attention_mask=m, num_steps=6).logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(got, seq)
    assert kept_and_rejected(cache), cache.drafts
    for b in range(3):
        alone = model.generate(ids[b:b + 1, mask[b].bool()], num_steps=6, max_new_tokens=20, draft_steps=5,
                               draft_tokens=4, **GREEDY)
        assert torch.equal(alone[0, -20:], got[b, -20:])


def test_eos_inside_a_draft_and_max_new_tokens_mid_draft():
    model = tiny()
    ids, mask = padded_batch(length=10)
    kw = dict(attention_mask=mask, num_steps=6, **GREEDY)
    free = model.generate(ids, max_new_tokens=16, **kw)
    eos = int(free[0, 10 + 5])  # row 0's sixth token ends it: later tokens become padding, other rows go on
    plain = model.generate(ids, max_new_tokens=16, eos_token_id=eos, **kw)
    assert (plain[0, 16:] == 0).all() and plain.shape[1] > 16
    for k in (3, 4, 8):
        cache = model.new_cache()
        got = model.generate(ids, max_new_tokens=16, eos_token_id=eos, draft_steps=4, draft_tokens=k, cache=cache, **kw)
        assert torch.equal(got, plain), k
    for n in (1, 2, 7):  # a budget that ends inside a draft cuts the draft short
        assert torch.equal(model.generate(ids, max_new_tokens=n, draft_steps=4, draft_tokens=4, **kw),
                           model.generate(ids, max_new_tokens=n, **kw)), n


def test_every_row_ending_stops_early_like_transformers():
    model = tiny()
    ids, mask = padded_batch(length=10)
    kw = dict(attention_mask=mask, num_steps=6, max_new_tokens=16, **GREEDY)
    free = model.generate(ids, **kw)
    eos = [int(free[b, 10 + 2 + b]) for b in range(3)]  # each row ends at its own token
    plain = model.generate(ids, eos_token_id=eos, **kw)
    got = model.generate(ids, eos_token_id=eos, draft_steps=2, draft_tokens=8, **kw)
    assert torch.equal(got, plain) and plain.shape[1] < 26


class StopAfter(StoppingCriteria):
    """Row b is done once token `token` appears in its continuation (stateless, as StopOnStrings)."""

    def __init__(self, token, prompt_len):
        self.token, self.prompt_len = token, prompt_len

    def __call__(self, input_ids, scores=None, **kwargs):
        return (input_ids[:, self.prompt_len:] == self.token).any(1)


def test_stopping_criteria_max_length_and_min_new_tokens_as_transformers_takes_them():
    model = tiny()
    ids, mask = padded_batch(length=10)
    kw = dict(attention_mask=mask, num_steps=6, **GREEDY)
    free = model.generate(ids, max_new_tokens=16, **kw)
    stop = StoppingCriteriaList([StopAfter(int(free[1, 10 + 4]), 10)])
    for extra in (dict(max_length=26, stopping_criteria=stop), dict(max_new_tokens=12, min_new_tokens=8,
                                                                      eos_token_id=int(free[0, 12]))):
        plain = model.generate(ids, **kw, **extra)
        assert torch.equal(model.generate(ids, draft_steps=3, draft_tokens=4, **kw, **extra), plain), extra


def test_speculative_sampling_keeps_the_r_loop_distribution():
    """Top-3 sampling at temperature 1, 3 new tokens: the empirical joint distribution of 6000 sampled
    continuations (one batch of one prompt repeated, d = 2, k = 2) is within total variation 0.06 of the exact
    r-loop distribution computed from forward passes (expected ~0.025 from sampling noise); the d-loop draft's own
    distribution is more than 0.15 away from it, so accepting every draft would fail."""
    model = tiny()
    prompt = padded_batch(length=6)[0][:1]
    warp = dict(do_sample=True, top_k=3, temperature=1.0)

    def exact(r):
        frontier = {(): 1.0}
        for _ in range(3):
            nxt = {}
            for prefix, p in frontier.items():
                seq = torch.cat([prompt, torch.tensor([prefix], dtype=torch.long).view(1, -1)], 1)
                with torch.no_grad():
                    logits = model(seq, num_steps=r).logits[0, -1]
                top = logits.topk(3)
                for t, q in zip(top.indices.tolist(), top.values.softmax(-1).tolist()):
                    nxt[prefix + (t,)] = p * q
            frontier = nxt
        return frontier

    target, draft = exact(6), exact(2)
    torch.manual_seed(1)
    n = 6000
    out = model.generate(prompt.expand(n, -1), num_steps=6, max_new_tokens=3, draft_steps=2, draft_tokens=2,
                         pad_token_id=0, **warp)[:, -3:]
    counts = {}
    for row in out.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    tv = lambda p: 0.5 * sum(abs(p.get(key, 0) - counts.get(key, 0) / n) for key in set(p) | set(counts))  # noqa: E731
    assert tv(target) <= 0.06, tv(target)
    assert tv(draft) >= 0.15, tv(draft)


@pytest.mark.parametrize("settings, message", [
    (dict(draft_steps=6), "draft_steps must be at least 1 and below num_steps"),
    (dict(draft_steps=0), "draft_steps must be at least 1"),
    (dict(draft_steps=2, draft_tokens=0), "draft_tokens must be at least 1"),
    (dict(draft_steps=2, exit_criterion="kl:1e-3"), "do not combine"),
    (dict(draft_steps=2, warm_start=True), "do not combine"),
    (dict(draft_steps=2, num_beams=2), "does not take num_beams"),
    (dict(draft_steps=2, repetition_penalty=1.3), "does not take repetition_penalty"),
    (dict(draft_steps=2, do_sample=True, temperature=0.0), "temperature > 0"),
])
def test_speculative_bad_settings_are_refused(settings, message):
    model = tiny()
    with pytest.raises(ValueError, match=message):
        model.generate(padded_batch()[0], num_steps=6, max_new_tokens=2, pad_token_id=0, **settings)


def test_ring_cache_is_refused():
    model = tiny(cache_policy="ring")
    with pytest.raises(ValueError, match="needs cache_policy 'exact'"):
        model.generate(padded_batch()[0], num_steps=6, max_new_tokens=2, draft_steps=2, pad_token_id=0)


def test_speculative_generate_stops_drafting_by_the_sweeps_rule(monkeypatch):
    """`generate(draft_steps=d)` follows the one drafting rule (DraftPolicy) the eval's sweep follows: with a kept
    share no batch can reach, one round is judged and the rest decodes plainly; with a share of 0 it drafts to the
    end. The tokens are r-loop greedy decoding's either way."""
    from loopfit.model import generation

    model = tiny()
    ids, mask = padded_batch(length=10)
    kw = dict(attention_mask=mask, num_steps=6, max_new_tokens=16, **GREEDY)
    plain = model.generate(ids, **kw)
    rounds = {}
    for share in (0.0, 1.01):
        monkeypatch.setattr(generation, "MIN_DRAFTS_JUDGED", 1)
        monkeypatch.setattr(generation, "MIN_DRAFTS_KEPT", share)
        cache = model.new_cache()
        assert torch.equal(model.generate(ids, draft_steps=2, draft_tokens=3, cache=cache, **kw), plain), share
        monkeypatch.undo()
        rounds[share] = len(cache.drafts)
    assert rounds[1.01] == 1 and rounds[0.0] > 1, rounds


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
