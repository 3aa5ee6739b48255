"""A sweep over r at the price of its deepest r: `sweep` (one run of the deepest r, the coda read at every r) and
`row_steps` (each row its own r, one batch) equal separate runs at each r, in every family, with left padding and
the cache; `loopfit eval`'s generation and loss sweeps give what one run per r gives; bad settings are refused.
Tiny models use the `mean` adapter so that their outputs change with r (the tests check they do)."""

import pytest
import tiny_models
import torch
from tiny_models import BASE_FAMILIES as FAMILIES
from tiny_models import VOCAB, padded_batch, random_base

from loopfit.convert import build_loopfit, plan_layers
from loopfit.eval import accuracy
from loopfit.eval.generation import generate, generate_at, generate_sweep, shared_prefix
from loopfit.eval.loss import evaluate as loss_evaluate
from loopfit.eval.prompts import gsm8k_prompt

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 2e-5  # fp32: the same sums in a different batch layout


def model_of(family, recurrence=5):
    return build_loopfit(random_base(family), plan_layers(4, (1, 2, 1)), adapter_init="mean", state_init="zeros",
                         recurrence=recurrence).eval()


def alone(model, ids, mask, row, r):
    """Logits of one row at r, run alone without its padding: the reference."""
    keep = mask[row].bool()
    return model(ids[row : row + 1, keep], num_steps=r).logits[0]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_sweep_and_row_steps_equal_one_run_per_r(family):
    """A left-padded batch of 3 at r = 5, 3, 1: `sweep` logits (row j * 3 + i is row i at sweep[j]) and the
    `row_steps` batch of the same 9 rows equal each row run alone at its r (2e-5); the logits differ across r."""
    model = model_of(family)
    ids, mask = padded_batch(length=10)
    sweep = [5, 3, 1]
    swept = model(ids, attention_mask=mask, sweep=sweep).logits
    rows = model(ids.repeat(3, 1), attention_mask=mask.repeat(3, 1), row_steps=[5] * 3 + [3] * 3 + [1] * 3).logits
    shared = model(ids, attention_mask=mask, row_steps=[(5, 3, 1)] * 3).logits  # row i read at r: i * 3 + j
    mixed = model(ids, attention_mask=mask, row_steps=[(5, 1), 5, (3, 1)]).logits  # rows 0@5, 0@1, 1@5, 2@3, 2@1
    mixed_rows = {(0, 5): 0, (0, 1): 1, (1, 5): 2, (2, 3): 3, (2, 1): 4}
    for j, r in enumerate(sweep):
        for i in range(3):
            ref = alone(model, ids, mask, i, r)
            keep = mask[i].bool()
            assert (swept[j * 3 + i, keep] - ref).abs().max() < TOL, (family, r, i)
            assert (rows[j * 3 + i, keep] - ref).abs().max() < TOL, (family, r, i)
            assert (shared[i * 3 + j, keep] - ref).abs().max() < TOL, (family, r, i)
            if (i, r) in mixed_rows:
                assert (mixed[mixed_rows[i, r], keep] - ref).abs().max() < TOL, (family, r, i)
    assert (swept[:3] - swept[6:]).abs().max() > 1e-2  # r changes the output, so a mix-up would show


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_packed_prompts_equal_each_prompt_alone_and_unpack_into_a_padded_batch(family):
    """Three prompts after a shared cached prefix, packed into one row (a 4D mask: each token sees the prefix and
    its own prompt's earlier tokens; positions continue the prefix) and swept at r = 5, 3, 1: the logits of every
    packed token equal its prompt run alone (2e-5), sliding windows included. `LoopfitCache.unpack` then lays the
    cache out as a left-padded batch, and one decoding step read at every r equals each prompt alone."""
    model, sweep = model_of(family), [5, 3, 1]
    g = torch.Generator().manual_seed(4)
    prefix, own = torch.randint(0, VOCAB, (6,), generator=g), [torch.randint(0, VOCAB, (n,), generator=g)
                                                               for n in (4, 9, 2)]
    cache = model.new_cache()
    model(prefix[None], past_key_values=cache, use_cache=True, sweep=sweep)
    segment = torch.cat([torch.full((len(x),), i) for i, x in enumerate(own)])
    sees = torch.cat([torch.ones(len(segment), 6, dtype=torch.bool),
                      torch.ones(len(segment), len(segment), dtype=torch.bool).tril()
                      & (segment[:, None] == segment)], 1)
    positions = torch.cat([torch.arange(6, 6 + len(x)) for x in own])[None]
    packed = model(torch.cat(own)[None], attention_mask=sees[None, None], position_ids=positions,
                   past_key_values=cache, use_cache=True, sweep=sweep).logits  # [r, tokens, vocab]
    starts = [0, 4, 13]
    for j, r in enumerate(sweep):
        for i, x in enumerate(own):
            ref = model(torch.cat([prefix, x])[None], num_steps=r).logits[0, 6:]
            assert (packed[j, starts[i]:starts[i] + len(x)] - ref).abs().max() < TOL, (family, r, i)
    n = 6 + 9
    cache.unpack([len(x) for x in own], n)
    nxt = torch.randint(0, VOCAB, (3, 1), generator=g)
    mask = torch.tensor([[1] * 6 + [0] * (9 - len(x)) + [1] * (len(x) + 1) for x in own])
    cache.select_rows(range(3), [j * 3 + i for i in range(3) for j in range(3)], [5] * 3)
    step = model(nxt, attention_mask=mask, past_key_values=cache, use_cache=True, row_steps=[tuple(sweep)] * 3).logits
    for i, x in enumerate(own):
        for j, r in enumerate(sweep):
            ref = model(torch.cat([prefix, x, nxt[i]])[None], num_steps=r).logits[0, -1]
            assert (step[i * 3 + j, -1] - ref).abs().max() < TOL, (family, r, i)
    with pytest.raises(ValueError, match="needs position_ids"):
        model(torch.cat(own)[None], attention_mask=sees[None, None])


@pytest.mark.parametrize("family", ["llama", "gemma3", "mistral-window"])
@torch.no_grad()
def test_sweep_prefill_then_row_steps_decoding_equals_cached_decoding_per_r(family):
    """A shared prefix cached once per r (batch 1) and repeated for 3 prompts, their own tokens swept with left
    padding, the cache rearranged to one row per (r, prompt) (`select_rows`), then 6 greedy tokens decoded for all
    rows at once by `generate`: equal to each r's own cached greedy decoding, token for token."""
    model = model_of(family)
    g = torch.Generator().manual_seed(1)
    prefix, own = torch.randint(0, VOCAB, (6,), generator=g), [torch.randint(0, VOCAB, (n,), generator=g)
                                                               for n in (5, 3, 4)]
    n, sweep = 6 + 5, [5, 2, 1]
    ids = torch.stack([torch.cat([prefix, torch.zeros(5 - len(o), dtype=torch.long), o]) for o in own])
    mask = torch.stack([torch.cat([torch.ones(6), torch.zeros(5 - len(o)), torch.ones(len(o))]) for o in own]).long()
    cache = model.new_cache()
    model(prefix[None], past_key_values=cache, use_cache=True, sweep=sweep)
    cache.repeat_rows(3)
    model(ids[:, 6:-1], attention_mask=mask[:, :-1], past_key_values=cache, use_cache=True, sweep=sweep)
    cache.select_rows([i for _ in sweep for i in range(3)], range(9), [r for r in sweep for _ in range(3)])
    got = model.generate(ids.repeat(3, 1), attention_mask=mask.repeat(3, 1), past_key_values=cache,
                         row_steps=[5] * 3 + [2] * 3 + [1] * 3, max_new_tokens=6, do_sample=False, pad_token_id=0)
    outs = []
    for j, r in enumerate(sweep):
        ref = model.generate(ids, attention_mask=mask, num_steps=r, max_new_tokens=6, do_sample=False,
                             pad_token_id=0)
        assert torch.equal(got[j * 3 : j * 3 + 3, n:], ref[:, n:]), (family, r)
        outs.append(ref[:, n:])
    assert not torch.equal(outs[0], outs[2])


@torch.no_grad()
def test_sweep_loss_equals_loss_per_r():
    """`sweep` with labels: one loss per r, equal to each r's own loss (1e-5), with no logits kept."""
    model = model_of("qwen2")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    out = model(ids, labels=ids, sweep=[4, 2, 1], return_logits=False)
    assert out.logits is None and out.loss.shape == (3,)
    for loss, r in zip(out.loss, [4, 2, 1]):
        assert abs(loss - model(ids, labels=ids, num_steps=r).loss) < 1e-5
    assert abs(out.loss[0] - out.loss[2]) > 1e-3


def tiny_with_prompts(tok, family="llama"):
    """A tiny `mean`-adapter model of `family` (tiny_models.FAMILIES) with the real tokenizer, and three 1-shot
    GSM8K prompts sharing the exemplar."""
    tok.pad_token = tok.pad_token or tok.eos_token
    torch.manual_seed(0)
    model = tiny_models.recurrent_family(family, vocab_size=len(tok), adapter_init="mean", state_init="zeros",
                                         eos_token_id=tok.eos_token_id)
    questions = ("What is 2 + 2?", "Tom has 3 cats and buys 12 more. How many?", "A")
    return model.eval(), tok, [gsm8k_prompt(q, "1shot") for q in questions]


def spy_row_steps(model, monkeypatch):
    """The `row_steps` of every per-row depth plan the model's forwards run (the real plans are built)."""
    from loopfit.model import DepthPlan

    seen, per_row = [], DepthPlan.per_row.__func__

    def recording(cls, row_steps, *args, **kwargs):
        seen.append(row_steps)
        return per_row(cls, row_steps, *args, **kwargs)

    monkeypatch.setattr(DepthPlan, "per_row", classmethod(recording))
    return seen


def record_forwards(model, monkeypatch):
    """(a verification?, the attention mask) of every forward the model's body runs (the real forward runs)."""
    calls, forward = [], model.model.forward

    def recording(*args, **kwargs):
        calls.append((kwargs.get("resume_from") is not None, kwargs["attention_mask"]))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", recording)
    return calls


def test_eval_generation_sweep_equals_generation_per_r(smollm2_tokenizer, monkeypatch):
    """`generate_sweep` (and so `loopfit eval`'s accuracy sweep) gives, at every r, the completions `generate`
    gives at that r: real tokenizer, 1-shot GSM8K prompts sharing the exemplar, 3 prompts in batches of 2, a stop
    string. The completions differ across r, so rows given the wrong r would fail. The r's of a prompt start as
    one shared row and split where their tokens differ; r = 4 and 5 agree on some prompts for a while, so rows
    that share loops past the first token are exercised too."""
    model, tok, prompts = tiny_with_prompts(smollm2_tokenizer)
    ids = tok(prompts)["input_ids"]
    assert shared_prefix(ids) > 50  # the exemplar is cached once
    seen = spy_row_steps(model, monkeypatch)
    swept = generate_sweep(model, tok, prompts, [1, 4, 5, 2], max_new_tokens=8, stop=["\n\n"], batch_size=2)
    monkeypatch.undo()
    for r in (1, 2, 4, 5):
        assert swept[r] == generate(model, tok, prompts, num_steps=r, max_new_tokens=8, stop=["\n\n"],
                                    batch_size=2), r
    assert swept[1] != swept[4]
    decoding = [steps for steps in seen if steps is not None]
    assert decoding[0] == [(5, 4, 2, 1)] * 2  # first step of the first batch: one row per prompt, read at every r
    shared_later = [steps for steps in decoding[1:] if any(isinstance(s, tuple) and len(s) > 1 for s in steps)]
    split = [steps for steps in decoding if len(steps) > 2]
    assert shared_later and split, decoding
    rows, samples = accuracy.evaluate(model, tok, "gsm8k_1shot", [4, 1], items=[
        {"id": i, "question": q, "answer": "4"} for i, q in enumerate(["What is 2 + 2?", "A"])], max_new_tokens=8)
    per_r = {r: generate_at(model, tok, [gsm8k_prompt(q, "1shot") for q in ("What is 2 + 2?", "A")], r, "t", 8,
                            accuracy.TASKS["gsm8k_1shot"].stop, 8)[0] for r in (4, 1)}
    assert [s["completion"] for s in samples] == per_r[4] + per_r[1]



@pytest.mark.parametrize("family", ["llama", "gemma3", "mistral"])
def test_speculative_sweep_equals_generation_per_r(smollm2_tokenizer, family, monkeypatch):
    """`generate_sweep(draft_loops=D)`: each r > D drafts at D loops inside the sweep's batch and is verified
    `draft_tokens` at a time; every (r, prompt) pair keeps its own agreeing prefix, the rest of the round left in
    the cache as holes the mask hides. The completions equal `generate` at each r, for D = 1, 2, 4 (real
    tokenizer, 3 prompts in batches of 2, a stop string, 12 new tokens; Gemma's and Mistral's sliding windows
    count tokens across the holes). The spy checks that verification passes ran and that holes were left."""
    model, tok, prompts = tiny_with_prompts(smollm2_tokenizer, family)
    per_r = {r: generate(model, tok, prompts, num_steps=r, max_new_tokens=12, stop=["\n\n"], batch_size=2)
             for r in (1, 2, 4, 5)}
    assert per_r[1] != per_r[5]
    holes = {}
    for d in (1, 2, 4):
        calls = record_forwards(model, monkeypatch)
        swept = generate_sweep(model, tok, prompts, [1, 4, 5, 2], max_new_tokens=12, stop=["\n\n"], batch_size=2,
                               draft_loops=d, draft_tokens=3)
        monkeypatch.undo()
        assert swept == per_r, (family, d)
        verifications = [mask for verify, mask in calls if verify]
        assert verifications, d
        padding = int((verifications[0][:, :-3] == 0).sum(1).max())
        holes[d] = max(int((mask == 0).sum(1).max()) for mask in verifications) > padding
    assert holes[1] or holes[2], holes  # some pair kept fewer than it was fed: a hole the mask hides


def test_speculative_sweep_stops_drafting_where_drafts_are_rejected(smollm2_tokenizer, monkeypatch):
    """A batch that has kept under MIN_DRAFTS_KEPT of at least MIN_DRAFTS_JUDGED drafts decodes on without drafts:
    with a share no batch can reach, each of the two batches verifies once and then decodes plainly; with a share of
    0 it keeps drafting. The completions are each r's own either way."""
    from loopfit.model import generation  # the rule every self-speculative loop follows (DraftPolicy)

    model, tok, prompts = tiny_with_prompts(smollm2_tokenizer)
    per_r = {r: generate(model, tok, prompts, num_steps=r, max_new_tokens=12, stop=["\n\n"], batch_size=2)
             for r in (1, 2, 5)}
    verifications = {}
    for share in (0.0, 1.01):
        calls = record_forwards(model, monkeypatch)
        monkeypatch.setattr(generation, "MIN_DRAFTS_JUDGED", 1)
        monkeypatch.setattr(generation, "MIN_DRAFTS_KEPT", share)
        swept = generate_sweep(model, tok, prompts, [1, 2, 5], max_new_tokens=12, stop=["\n\n"], batch_size=2,
                               draft_loops=2, draft_tokens=3)
        monkeypatch.undo()
        assert swept == per_r, share
        verifications[share] = sum(verify for verify, _ in calls)
    assert verifications[1.01] == 2 and verifications[0.0] > 2, verifications

@torch.no_grad()
def test_eval_loss_sweep_equals_loss_per_r():
    """`loopfit eval`'s held-out loss reads every r from one run of the deepest: equal to each r run alone."""
    model = model_of("qwen2")
    rows = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(3))
    got = {row["loops"]: row["value"] for row in loss_evaluate(model, rows, [1, 4, 2], batch_size=2)
           if row["metric"] == "loss"}
    for r in (1, 2, 4):
        want = sum(model(rows[i : i + 2], labels=rows[i : i + 2], num_steps=r).loss.item() * rows[i : i + 2].numel()
                   for i in (0, 2))
        want /= rows.numel()
        assert abs(got[r] - want) < 1e-5, r
    assert abs(got[1] - got[4]) > 1e-3


@torch.no_grad()
def test_bad_settings_are_refused():
    model = model_of("llama")
    ids, _ = padded_batch()
    for bad, match in (({"row_steps": [1, 2, 2]}, "deepest rows first"), ({"row_steps": [2, 2]}, "one r >= 1"),
                       ({"row_steps": [(2, 3), 2, 1]}, "several r, deepest first"),
                       ({"row_steps": [(1, 2), 2, 1]}, "several r, deepest first"), ({"row_steps": [0, 0, 0]}, ">= 1"),
                       ({"sweep": [1, 2]}, "deepest first"), ({"sweep": [2, 2]}, "distinct"),
                       ({"sweep": [2, 1], "row_steps": [2, 2, 2]}, "inference alone")):
        with pytest.raises(ValueError, match=match):
            model(ids, **bad)
    with pytest.raises(ValueError, match="generate cannot follow"):
        model.generate(ids, row_steps=[(2, 1)] * 3, max_new_tokens=2)
    model.train()
    with pytest.raises(ValueError, match="inference alone"):
        model(ids, sweep=[2, 1])
    model = tiny_models.recurrent(VOCAB, cache_policy="ring").eval()
    with pytest.raises(ValueError, match="needs cache_policy 'exact'"):
        model(ids, sweep=[2, 1], past_key_values=model.new_cache(), use_cache=True)


def test_lean_loss_does_no_gradient_work_under_no_grad():
    """Evaluation (no_grad) through `linear_cross_entropy` runs one head matmul per chunk, not the three that
    training's forward runs to form gradients; the loss is the same."""
    from loopfit.model import linear_cross_entropy

    weight = torch.nn.Parameter(torch.randn(300, 16))
    hidden, labels = torch.randn(2, 9, 16), torch.randint(0, 300, (2, 9))

    def matmuls(grad):
        with torch.set_grad_enabled(grad), torch.profiler.profile() as prof:
            loss = linear_cross_entropy(hidden, weight, labels, chunk_elements=300 * 4)  # 4 chunks of 4 rows
        return loss.detach(), sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))

    (eval_loss, eval_mm), (train_loss, train_mm) = matmuls(False), matmuls(True)
    assert eval_mm == 4 and train_mm == 8  # the weight's gradient only (hidden needs none): one more per chunk
    assert torch.allclose(eval_loss, train_loss)


def test_eval_generation_sweep_drops_rows_that_ended(smollm2_tokenizer):
    """Rows that hit a stop string leave the sweep's batch and cache at different steps (some after 2 tokens, some
    never): the completions stay those of one `generate` per r."""
    model, tok, prompts = tiny_with_prompts(smollm2_tokenizer)
    stop = ["apex", "crum"]  # words this tiny model produces early in some rows, late or never in others
    swept = generate_sweep(model, tok, prompts, [4, 2, 1], max_new_tokens=10, stop=stop, batch_size=3)
    per_r = {r: generate(model, tok, prompts, num_steps=r, max_new_tokens=10, stop=stop, batch_size=3)
             for r in (1, 2, 4)}
    assert swept == per_r
    assert len({len(c) for completions in per_r.values() for c in completions}) >= 3
